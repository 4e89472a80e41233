"""Merge methods. Importing this package registers every method."""

from __future__ import annotations

from mergeflow.methods import (  # noqa: F401  (registration)
    averaging,
    breadcrumbs,
    cart,
    compressed,
    consensus,
    dare,
    lines,
    magmax,
    pcb,
    singular,
    svc,
    ties,
    wudi,
)
from mergeflow.methods.registry import (
    MergeContext,
    Merger,
    MethodParams,
    MethodSpec,
    get_method,
    method_names,
    params_record,
    parse_params,
)

__all__ = [
    "MergeContext",
    "Merger",
    "MethodParams",
    "MethodSpec",
    "get_method",
    "method_names",
    "params_record",
    "parse_params",
]
