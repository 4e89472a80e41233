"""``params.yaml``: the one place for run parameters, validated in full before any work starts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from mergeflow.adamerging import AdaMergingParams
from mergeflow.analysis.vision import VisionAnalysisConfig
from mergeflow.clip.zoo import ClipZooConfig
from mergeflow.errors import ConfigError
from mergeflow.methods import MethodParams, parse_params
from mergeflow.mlflow_models import ModelsToLog
from mergeflow.presets import get_preset
from mergeflow.sources import Source
from mergeflow.zoo.selection import Halving
from mergeflow.zoo.text_zoo import TextZooConfig
from mergeflow.zoo.vision_zoo import VisionZooConfig


class DemoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: Literal["vit-tiny", "vit-b-32", "bert-tiny"] = "vit-tiny"
    tasks: int = Field(4, ge=1, le=64)
    seed: int = 0


class AcquireConfig(BaseModel):
    """Checkpoints to fetch: a preset (pretrained + fine-tunes) and/or extra sources."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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
    """``zoo:`` in params.yaml: which zoo the pipeline uses, where it is built, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: Literal["text-minilm", "vision-tiny", "clip"] = "text-minilm"
    dir: str = "out/zoo/text-minilm"
    text_minilm: TextZooConfig = TextZooConfig()
    vision_tiny: VisionZooConfig = VisionZooConfig()
    clip: ClipZooConfig = ClipZooConfig()

    def settings(self) -> dict[str, Any]:
        """The active zoo's build settings, as JSON."""
        chosen = {"text-minilm": self.text_minilm, "vision-tiny": self.vision_tiny, "clip": self.clip}[self.name]
        return chosen.model_dump(mode="json")


class SelectionConfig(BaseModel):
    """``selection:``: parameter grids searched on validation; the best point is tested once.
    ``search: grid`` scores every point on the whole validation split; ``search: halving`` runs
    successive halving on validation folds (:class:`~mergeflow.zoo.selection.Halving`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    criterion: Literal["normalized", "absolute"] = "normalized"
    search: Literal["grid", "halving"] = "grid"
    halving: Halving = Field(default_factory=Halving)
    grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)

    def schedule(self) -> Halving | None:
        """The halving schedule when ``search`` is halving, else None (the exhaustive grid)."""
        return self.halving if self.search == "halving" else None

    @field_validator("grids")
    @classmethod
    def _valid_points(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, grid in value.items():
            for name, values in grid.items():
                if not values:
                    raise ValueError(f"{method}.{name}: empty grid")
                for v in values:  # each value must be valid for the method on its own
                    try:
                        parse_params(method, {name: v})
                    except ConfigError as exc:
                        raise ValueError(str(exc)) from None
        return value


class TrackingConfig(BaseModel):
    """``tracking:``: where MLflow runs go (``MLFLOW_TRACKING_URI`` in the environment wins), and which
    merged models are uploaded as MLflow logged models (``champion``: only the one registered)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    uri: str = "sqlite:///out/mlflow.db"
    models: ModelsToLog = "all"


class RankCurveConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rank_ratios: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)
    scalings: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


class AnalysisConfig(BaseModel):
    """``analysis:``: where `mergeflow analyze` writes, and the settings of each analysis."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    dir: str = "out/analysis"
    rank_curve: RankCurveConfig = RankCurveConfig()
    vision: VisionAnalysisConfig = VisionAnalysisConfig()


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "float64"] = "float32"
    workers: int = Field(1, ge=1, description="pipeline tasks run at once (threads, or local Dask workers)")
    dask_address: str | None = Field(None, description="Dask scheduler (tcp://host:8786) or 'local'; None: threads")
    preset: str | None = Field(None, description="the run preset applied over this file (presets/NAME.yaml)")
    report_dir: str | None = Field(None, description="where `mergeflow run` writes the report; None: <zoo.dir>/report")
    demo: DemoConfig = DemoConfig()
    acquire: AcquireConfig = AcquireConfig()
    zoo: ZooSection = ZooSection()
    selection: SelectionConfig = SelectionConfig()
    tracking: TrackingConfig = TrackingConfig()
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    adaptation: dict[str, AdaMergingParams] = Field(default_factory=dict)
    analysis: AnalysisConfig = AnalysisConfig()

    @model_validator(mode="after")
    def _distinct_names(self) -> RunConfig:
        clash = set(self.adaptation) & set(self.methods)
        if clash:
            raise ValueError(f"adaptation names {sorted(clash)} are also merge methods: rename them")
        return self

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, params in value.items():
            try:
                parse_params(name, params or {})
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    def report_path(self) -> Path:
        """The report directory: ``report_dir``, or ``report`` inside the zoo's directory."""
        return Path(self.report_dir) if self.report_dir else Path(self.zoo.dir) / "report"

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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (plain YAML keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: what`` for a YAML error (the first line of its text when it has no position)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file strictly: duplicate keys refused; every problem one ConfigError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``: mappings merge key by key, anything else replaces."""
    result = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def run_presets(params_file: str | Path = "params.yaml") -> dict[str, Path]:
    """Run presets: ``presets/<name>.yaml`` beside ``params_file``, each an overlay of params.yaml."""
    folder = Path(params_file).parent / "presets"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> RunConfig:
    """Read and validate ``params.yaml``, then the ``preset`` overlay, then dotted ``overrides``.

    Any problem (unknown preset, method, parameter; invalid value) is one ConfigError.
    """
    path = Path(path)
    raw = _read_yaml(path)
    where = str(path)
    if preset is None:  # the file's own ``preset:`` entry (or an override of it: `dvc exp run -S preset=quick`)
        preset = (overrides or {}).get("preset", raw.get("preset"))
    if preset is not None:
        presets = run_presets(path)
        if not isinstance(preset, str) or preset not in presets:
            raise ConfigError(f"{where}: unknown run preset {preset!r}; known: {', '.join(presets) or 'none'}")
        overlay = _read_yaml(presets[preset])
        if "preset" in overlay:
            raise ConfigError(
                f"{presets[preset]}: a run preset cannot name another preset (preset: {overlay['preset']!r})"
            )
        raw = {**_deep_merge(raw, overlay), "preset": preset}
        where += f" with preset {presets[preset]}"
    overrides = {k: v for k, v in (overrides or {}).items() if k != "preset"}
    if overrides:
        raw = apply_overrides(raw, overrides)
        where += " and --set overrides"
    try:
        return RunConfig.model_validate(_tuples(raw))
    except PydanticValidationError as exc:
        problems = "; ".join(_located(e) for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _located(error: Any) -> str:
    """``section.key: message`` for one pydantic error (the section is where in params.yaml it is)."""
    loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{loc}: {message}"
