"""Task runners for the pipeline: threads on this machine, or a Dask cluster (prefect-dask).

``dask_address`` is a scheduler address (``tcp://host:8786``) for a cluster spanning machines, or
``local`` for a Dask LocalCluster of ``workers`` single-threaded worker processes here. Workers
must see the same files (the zoo, the outputs, Prefect's result store): a shared filesystem.
"""

from __future__ import annotations

from typing import Any


def task_runner(workers: int, dask_address: str | None = None) -> Any:
    if not dask_address:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if dask_address == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=dask_address)
