"""Prefect flows composing the tasks in ``tasks/`` (orchestration issue: not built yet).

The library in ``mergeflow/`` is complete without them: ``mergeflow merge`` and ``mergeflow demo``
run the merge engine directly.
"""
