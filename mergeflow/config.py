"""``params.yaml``: the one place for run parameters, validated in full before any work starts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from mergeflow.errors import ConfigError
from mergeflow.methods import MethodParams, parse_params
from mergeflow.presets import get_preset
from mergeflow.sources import Source
from mergeflow.zoo.build import TextZooConfig


class DemoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Literal["vit-tiny", "vit-b-32", "bert-tiny"] = "vit-tiny"
    tasks: int = Field(4, ge=1, le=64)
    seed: int = 0


class AcquireConfig(BaseModel):
    """Checkpoints to fetch: a preset (pretrained + fine-tunes) and/or extra sources."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = "data/store"
    preset: str | None = None
    sources: list[Source] = Field(default_factory=list)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None:
            get_preset(value)
        return value


class ZooSection(BaseModel):
    """``zoo:`` in params.yaml: where the text zoo is built and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: str = "out/zoo/text-minilm"
    text_minilm: TextZooConfig = TextZooConfig()


class SelectionConfig(BaseModel):
    """``selection:``: parameter grids searched on validation; the best point is tested once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    criterion: Literal["normalized", "absolute"] = "normalized"
    grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)

    @field_validator("grids")
    @classmethod
    def _valid_points(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, grid in value.items():
            for name, values in grid.items():
                if not values:
                    raise ValueError(f"{method}.{name}: empty grid")
                for v in values:  # each value must be valid for the method on its own
                    parse_params(method, {name: v})
        return value


class TrackingConfig(BaseModel):
    """``tracking:``: where MLflow runs go (``MLFLOW_TRACKING_URI`` in the environment wins)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = "sqlite:///out/mlflow.db"


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "float64"] = "float32"
    workers: int = Field(1, ge=1, description="pipeline tasks run at once (threads)")
    demo: DemoConfig = DemoConfig()
    acquire: AcquireConfig = AcquireConfig()
    zoo: ZooSection = ZooSection()
    selection: SelectionConfig = SelectionConfig()
    tracking: TrackingConfig = TrackingConfig()
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, params in value.items():
            parse_params(name, params or {})  # raises ConfigError with the precise problem
        return value

    def method_params(self) -> dict[str, MethodParams]:
        return {name: parse_params(name, params or {}) for name, params in self.methods.items()}


def _tuples(value: Any) -> Any:
    """YAML lists become tuples (parameter models are immutable)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``methods.cart.scaling``) in a params.yaml mapping, creating levels as needed."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return result


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and validate ``params.yaml`` (with ``overrides`` applied first); any problem is one ConfigError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(_tuples(raw))
    except PydanticValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
