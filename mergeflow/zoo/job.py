"""The whole zoo job without Prefect (``mergeflow report``): baselines, every method's
validation-selected row, the AdaMerging rows, then the assembled report. The Prefect pipeline
(``flows/pipeline.py``) runs the same steps as cached tasks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.zoo.adapt import adapt_zoo
from mergeflow.zoo.report import assemble_report, render
from mergeflow.zoo.selection import Halving, evaluate_baselines, select_method

log = logging.getLogger("mergeflow.report")


def zoo_report(
    zoo_dir: str | Path,
    methods: Mapping[str, Mapping[str, Any]],
    grids: Mapping[str, Mapping[str, list[Any]]],
    out_dir: str | Path,
    criterion: str = "normalized",
    device: str = "auto",
    adaptation: Mapping[str, Any] | None = None,
    halving: Halving | None = None,
) -> dict[str, Any]:
    """Baselines, every method's validation-selected row, AdaMerging rows, then the assembled report."""
    start = time.perf_counter()
    baselines = evaluate_baselines(zoo_dir, out_dir)
    selections = {
        method: select_method(
            zoo_dir,
            method,
            base,
            grids.get(method, {}),
            out_dir,
            baselines["individual"],
            criterion,
            device,
            halving=halving,
        )
        for method, base in methods.items()
    }
    for name, params in (adaptation or {}).items():
        selections[name] = adapt_zoo(zoo_dir, name, params, out_dir, device)
    report = assemble_report(zoo_dir, baselines, selections, out_dir, criterion)
    log.info("zoo report in %s (%.0f s)\n%s", out_dir, time.perf_counter() - start, render(report))
    return report
