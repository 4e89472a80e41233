"""Prefect flows composing the tasks in ``tasks/``: ``flows.pipeline.pipeline`` is the main one."""
