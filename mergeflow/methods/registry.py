"""One registry of merge methods.

A method is a :class:`Merger` subclass registered under a public name together with a frozen
pydantic parameter model. That model is the single description of the method's parameters: it
validates ``params.yaml`` entries and ``--set`` overrides, becomes Prefect flow parameters, and its
``model_dump`` is what MLflow records and what is written into each output's metadata.

A method with a ``scaling`` parameter λ is *affine* in it and says so by construction: it implements
only ``affine(key, θ0, [θt]) -> (A, D)``, the anchor and direction of θ(λ) = A + λ·D for one key in the
compute dtype (D = None where the key does not move with λ). Its direct merge is ``compose`` of that
pair, and grid bases (mergeflow.grid) store the same pairs, so a grid point A + λ·D and a direct merge
are one computation. ``register`` refuses an affine method that overrides ``merge`` or a method
without ``scaling`` that does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from mergeflow.checkpoint import TensorMeta
from mergeflow.errors import ConfigError
from mergeflow.selectors import MatrixSelector, explain_empty_selection, make_selector


class MethodParams(BaseModel):
    """Base of every method's parameters: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def selector(self) -> MatrixSelector | None:
        return None


class MatrixParams(MethodParams):
    """Parameters shared by methods that factorize selected 2-D matrices."""

    selector_name: Literal["attn_mlp", "all_2d"] = Field(
        "all_2d", alias="selector", description="named rule choosing the matrices to factorize"
    )
    exclude: tuple[str, ...] = Field((), description="fnmatch globs of keys never treated as matrices")
    include: tuple[str, ...] = Field((), description="fnmatch globs: an explicit selection, instead of the rule")
    svd_solver: Literal["gram", "full"] = Field(
        "gram", description="'gram': Gram eigendecomposition + Rayleigh-Ritz (fast); 'full': LAPACK SVD"
    )

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)

    def selector(self) -> MatrixSelector:
        return make_selector(self.selector_name, self.exclude, self.include)


@dataclass(frozen=True)
class MergeContext:
    """What a merger knows about the run besides its parameters."""

    num_tasks: int
    layout: Mapping[str, TensorMeta]
    device: torch.device
    dtype: torch.dtype
    # task_order[i] = the user's index of the task in canonical position i (tasks are sorted by
    # content hash so that the result cannot depend on the order the user listed them in).
    task_order: tuple[int, ...]

    @property
    def float_keys(self) -> list[str]:
        return [k for k, m in self.layout.items() if m.is_float]


class TensorSource:
    """Access to the inputs for methods that need a pass over the whole model before merging."""

    def iter_all(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """Yield ``(key, θ0, [θ1..θT])`` in compute dtype on the compute device."""
        raise NotImplementedError

    def iter_task(self, keys: Sequence[str], task: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield ``(key, θ0, θ_task)``: one fine-tune at a time keeps memory at one model."""
        raise NotImplementedError


@dataclass(frozen=True)
class StorageCost:
    """Bytes a per-task method stores beyond θ0 to rebuild every task's model: ``shared`` once
    (e.g. a merged τ), ``per_task`` for each task (its triplets, masks, rescalers)."""

    shared: int
    per_task: int

    def record(self, num_tasks: int) -> dict[str, int]:
        return {"shared_bytes": self.shared, "per_task_bytes": self.per_task, "tasks": num_tasks,
                "total_bytes": self.shared + num_tasks * self.per_task}  # fmt: skip


def per_task_values(value: float | Sequence[float], ctx: MergeContext, method: str, name: str) -> list[float]:
    """One value per task in canonical order, from one value for all or one per task in the user's order."""
    if isinstance(value, (int, float)):
        return [float(value)] * ctx.num_tasks
    if len(value) != ctx.num_tasks:
        raise ConfigError(f"{method}: {name} has {len(value)} values for {ctx.num_tasks} tasks")
    return [float(value[i]) for i in ctx.task_order]  # user order -> canonical order


def float_bytes(layout: Mapping[str, TensorMeta]) -> int:
    """Bytes of every float tensor of a layout in its own dtype (one whole model's weights)."""
    return sum(m.numel * m.dtype.itemsize for m in layout.values() if m.is_float)


Affine = tuple[torch.Tensor, torch.Tensor | None]
"""(A, D) of θ(λ) = A + λ·D for one key; D is None where the key does not depend on λ."""


def compose(parts: Affine, scaling: float) -> torch.Tensor:
    """θ(λ) = A + λ·D (A itself where D is None), in the dtype of A and D."""
    anchor, direction = parts
    return anchor if direction is None else anchor + scaling * direction


def is_affine(params: type[MethodParams]) -> bool:
    """Whether a method with these parameters is affine in λ: it has a ``scaling`` parameter."""
    return "scaling" in params.model_fields


class Merger:
    """Turns (θ0, [θt]) for one key into the merged tensor (or one tensor per task).

    ``merge`` / ``affine`` get float tensors in the compute dtype on the compute device, tasks in
    canonical order. Affine methods (those with ``scaling``) implement ``affine`` (and, to share work
    across grid points, ``affine_grid``); the others implement ``merge``.
    """

    per_task_outputs: ClassVar[bool] = False

    def __init__(self, params: MethodParams, ctx: MergeContext):
        self.params = params
        self.ctx = ctx
        selector = params.selector()
        self.selected: frozenset[str] = frozenset(selector.select(ctx.layout) if selector else ())
        if selector is not None and not self.selected and ctx.float_keys:
            raise ConfigError(explain_empty_selection(selector, ctx.layout))

    def prepare(self, source: TensorSource) -> None:
        """Optional pass over the inputs (global statistics) before the streaming merge."""

    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """θ(λ) = A + λ·D from ``affine`` (per task for per-task methods); non-affine methods override it."""
        scaling = float(self.params.scaling)  # type: ignore[attr-defined]
        parts = self.affine(key, base, tuned)
        if isinstance(parts, list):
            return [compose(p, scaling) for p in parts]
        return compose(parts, scaling)

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine | list[Affine]:
        """(A, D) of this key (one pair per task for per-task methods). A method without ``scaling``
        is constant in λ: its merge is the anchor."""
        if is_affine(type(self.params)):
            raise NotImplementedError(f"{type(self).__name__} has a scaling parameter but no affine()")
        result = self.merge(key, base, tuned)
        if isinstance(result, list):
            return [(t, None) for t in result]
        return result, None

    def storage_cost(self) -> StorageCost | None:
        """Storage beyond θ0 of a per-task method's outputs (None for methods with one output)."""
        return None

    def affine_grid(
        self, key: str, base: torch.Tensor, tuned: list[torch.Tensor], grid: Sequence[Merger]
    ) -> Iterator[Affine | list[Affine]]:
        """(A, D) of one key for several parameter sets of this method, lazily (default: one by one);
        methods override it to share work (CART: one factorization per task for every rank)."""
        return (merger.affine(key, base, tuned) for merger in grid)

    def merge_grid(
        self, key: str, base: torch.Tensor, tuned: list[torch.Tensor], grid: Sequence[Merger]
    ) -> Iterator[torch.Tensor | list[torch.Tensor]]:
        """Merge one key for several parameter sets, lazily: ``compose`` of ``affine_grid`` for affine
        methods, one ``merge`` per set otherwise."""
        if not is_affine(type(self.params)):
            return (merger.merge(key, base, tuned) for merger in grid)

        def composed(parts: Affine | list[Affine], merger: Merger) -> torch.Tensor | list[torch.Tensor]:
            scaling = float(merger.params.scaling)  # type: ignore[attr-defined]
            return [compose(p, scaling) for p in parts] if isinstance(parts, list) else compose(parts, scaling)

        return (composed(parts, m) for parts, m in zip(self.affine_grid(key, base, tuned, grid), grid, strict=True))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[MethodParams]
    merger: type[Merger]
    summary: str

    @property
    def per_task_outputs(self) -> bool:
        return self.merger.per_task_outputs

    def parameter_help(self) -> list[str]:
        lines = []
        for name, info in self.params.model_fields.items():
            public = info.alias or name
            default = info.get_default(call_default_factory=True)
            lines.append(f"{public}={default!r}: {info.description or ''}".rstrip(": "))
        return lines


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, params: type[MethodParams], summary: str) -> Callable[[type[Merger]], type[Merger]]:
    """Class decorator adding a merger to the registry under ``name``."""

    def decorate(cls: type[Merger]) -> type[Merger]:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        overrides_merge = cls.merge is not Merger.merge
        if is_affine(params) and (overrides_merge or cls.affine is Merger.affine):
            raise RuntimeError(f"merge method {name!r} has a scaling: it must implement affine() and not merge()")
        if not is_affine(params) and not overrides_merge:
            raise RuntimeError(f"merge method {name!r} has no scaling: it must implement merge()")
        _REGISTRY[name] = MethodSpec(name, params, cls, summary)
        return cls

    return decorate


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; known: {', '.join(_REGISTRY)}") from None


def parse_params(method: str, values: Mapping[str, Any] | MethodParams | None = None) -> MethodParams:
    """Validate raw parameter values for ``method``; any problem is one :class:`ConfigError` line."""
    spec = get_method(method)
    if isinstance(values, spec.params):
        return values
    if isinstance(values, MethodParams):
        values = values.model_dump(by_alias=True)
    try:
        return spec.params.model_validate(dict(values or {}))
    except PydanticValidationError as exc:
        known = ", ".join(info.alias or name for name, info in spec.params.model_fields.items()) or "none"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or method}: "
            + (f"unknown parameter (known: {known})" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors()
        )
        raise ConfigError(f"invalid parameters for {method}: {problems}") from None


def params_record(params: MethodParams) -> dict[str, Any]:
    """Plain JSON-able view of parameters under their public names (metadata, MLflow, reports)."""
    return params.model_dump(mode="json", by_alias=True)
