"""Recipe files (``mergeflow merge --config recipe.yaml``): mergekit's YAML merge configuration.

The methods mergeflow shares with mergekit get mergekit 0.1.5's meaning, mapped onto the registry's
parameters (docs/recipes.md states each rule); every other registry method (``cart``, ``tsv``,
``iso_c`` ...) takes its parameters under ``parameters:``. A key mergeflow does not know, and a
mergekit feature it does not implement (slices, per-layer gradients, filtered values, tokenizer
merging, LoRA references ...), is refused with one line naming the file and the field; nothing is
ignored. ``model:`` paths are relative to the recipe's directory.

Parameters resolve as in mergekit: a model's own ``parameters`` first, then the top-level ones,
then the method's default; ``weight`` has no default. A model listed under ``models`` that is the
``base_model`` is the base, not a fine-tune (``linear`` has no base: every listed model is an input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import ConfigError
from mergeflow.methods import method_names, parse_params

# mergekit 0.1.5 methods that mergeflow does not implement (mergekit/merge_methods/registry.py)
MERGEKIT_ONLY = (
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "sce", "model_stock", "karcher",
    "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl",
)  # fmt: skip

# mergekit method -> (shared parameters with their defaults, per-model parameters with defaults; None: required)
_SHARED_GTA = {"int8_mask": False, "lambda": 1.0, "rescale": False}
MERGEKIT_METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": None}),
    "task_arithmetic": ({**_SHARED_GTA, "normalize": False}, {"weight": None, "density": 1.0}),
    "ties": ({**_SHARED_GTA, "normalize": True}, {"weight": None, "density": 1.0}),
    "breadcrumbs": ({**_SHARED_GTA, "normalize": False}, {"weight": None, "density": 1.0, "gamma": 0.01}),
    "breadcrumbs_ties": ({**_SHARED_GTA, "normalize": False}, {"weight": None, "density": 1.0, "gamma": 0.01}),
    "dare_ties": ({**_SHARED_GTA, "normalize": False, "rescale": True}, {"weight": None, "density": 1.0}),
    "dare_linear": ({**_SHARED_GTA, "normalize": False, "rescale": True}, {"weight": None, "density": 1.0}),
}

TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
NOT_SUPPORTED = {
    "slices": "slices (layer ranges per model) are not supported by mergeflow; list whole models under models:",
    "modules": "modules are not supported by mergeflow; list whole models under models:",
    "tokenizer": "tokenizer merging is not supported by mergeflow (θ0's tokenizer files are carried over)",
    "chat_template": "chat templates are not supported by mergeflow (θ0's tokenizer files are carried over)",
}
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Recipe:
    """A recipe resolved to one mergeflow merge: registry method, typed parameters, paths and dtypes."""

    path: Path
    text: str
    method: str
    params: dict[str, Any]
    pretrained: Path
    finetuned: list[Path]
    precision: str | None = None
    out_dtype: str | None = None
    cast: bool = False
    notes: list[str] = field(default_factory=list)


class _Reader:
    """Reads one recipe file; every problem is one ``ConfigError`` line naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {problem}")

    def load(self) -> tuple[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the recipe ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: the recipe is not UTF-8 text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{self.path}: not valid YAML{at}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: a recipe is a mapping with merge_method and models")
        return text, data

    def scalar(self, where: str, value: Any) -> Any:
        """A plain parameter value; gradients, filtered values and non-finite numbers are refused."""
        if isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                raise self.fail(where, "filtered values (filter:/value:) are not supported by mergeflow")
            raise self.fail(where, "gradients (a list of values across layers) are not supported by mergeflow")
        if isinstance(value, dict):
            raise self.fail(where, "filtered values (filter:/value:) are not supported by mergeflow")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, f"{value} is not a finite number")
        if value is None:
            raise self.fail(where, "a value is needed")
        return value

    def number(self, where: str, value: Any) -> float:
        value = self.scalar(where, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number, got {value!r}")
        return float(value)

    def flag(self, where: str, value: Any) -> bool:
        value = self.scalar(where, value)
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def model_path(self, where: str, value: Any) -> Path:
        if isinstance(value, dict):
            raise self.fail(where, "give the model as a path (model: path/to/checkpoint)")
        if not isinstance(value, str) or not value:
            raise self.fail(where, "expected a path to a checkpoint")
        if "+" in value and not Path(value).exists():
            raise self.fail(where, f"{value}: LoRA references (model+adapter) are not supported by mergeflow")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.path.parent / path
        if not path.exists():
            raise self.fail(
                where,
                f"{value}: no such file or directory (relative to {self.path.parent}; Hugging Face Hub ids: fetch "
                "them with `mergeflow acquire` first)",
            )
        return path

    def mapping(self, where: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, "expected a mapping")
        return value


def _dtype(reader: _Reader, where: str, value: Any) -> str | None:
    if value is None:
        return None
    name = value[len("torch.") :] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise reader.fail(where, f"unknown dtype {value!r}; known: {', '.join(DTYPES)}")
    return name


def read_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file into the merge it describes (nothing is opened but the recipe
    and the existence of its model paths)."""
    reader = _Reader(Path(path))
    text, data = reader.load()
    for key in data:
        if key in NOT_SUPPORTED:
            raise reader.fail(str(key), NOT_SUPPORTED[key])
        if key not in TOP_LEVEL:
            raise reader.fail(str(key), f"unknown key (known: {', '.join(TOP_LEVEL)})")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise reader.fail("merge_method", "required: the name of a merge method")
    if method in MERGEKIT_ONLY:
        raise reader.fail("merge_method", f"mergekit's {method} is not implemented by mergeflow")
    if method not in MERGEKIT_METHODS and method not in method_names():
        known = sorted({*MERGEKIT_METHODS, *method_names()})
        raise reader.fail("merge_method", f"unknown merge method {method!r}; known: {', '.join(known)}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise reader.fail("models", "required: a list of `- model: PATH` entries")
    entries: list[tuple[Path, dict[str, Any]]] = []
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise reader.fail(where, "expected a mapping with model: and optional parameters:")
        for key in entry:
            if key not in ("model", "parameters"):
                raise reader.fail(f"{where}.{key}", "unknown key (known: model, parameters)")
        if "model" not in entry:
            raise reader.fail(f"{where}.model", "required")
        entries.append(
            (
                reader.model_path(f"{where}.model", entry["model"]),
                reader.mapping(f"{where}.parameters", entry.get("parameters")),
            )
        )
    base = None if data.get("base_model") is None else reader.model_path("base_model", data["base_model"])
    shared = reader.mapping("parameters", data.get("parameters"))
    dtype = _dtype(reader, "dtype", data.get("dtype"))
    out_dtype = _dtype(reader, "out_dtype", data.get("out_dtype")) or dtype
    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None and not (tokenizer == "base" and base is not None):
        raise reader.fail(
            "tokenizer_source", "only `base` (with a base_model) is supported: θ0's tokenizer files are carried over"
        )
    if method in MERGEKIT_METHODS:
        resolved = _mergekit(reader, method, base, entries, shared)
    else:
        resolved = _own(reader, method, base, entries, shared)
    name, params, pretrained, finetuned = resolved
    try:
        parse_params(name, params)
    except ConfigError as exc:
        where = "parameters" if method not in MERGEKIT_METHODS else f"parameters (as mergeflow's {name})"
        raise reader.fail(where, str(exc)) from None
    return Recipe(
        path=reader.path,
        text=text,
        method=name,
        params=params,
        pretrained=pretrained,
        finetuned=finetuned,
        precision="float64" if dtype == "float64" else None,
        out_dtype=out_dtype,
        cast=dtype is not None,
    )


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _split_base(
    reader: _Reader, method: str, base: Path | None, entries: Sequence[tuple[Path, dict[str, Any]]]
) -> list[tuple[int, Path, dict[str, Any]]]:
    """The fine-tunes (index, path, parameters): every entry that is not the base model."""
    if base is None:
        raise reader.fail("base_model", f"required by {method}")
    tuned = [(i, p, params) for i, (p, params) in enumerate(entries) if not _same(p, base)]
    if not tuned:
        raise reader.fail("models", "needs at least one model besides the base_model")
    return tuned


def _own(
    reader: _Reader, method: str, base: Path | None, entries: Sequence[tuple[Path, dict[str, Any]]],
    shared: Mapping[str, Any],
) -> tuple[str, dict[str, Any], Path, list[Path]]:  # fmt: skip
    """A mergeflow method: models without parameters, the method's typed parameters under parameters:."""
    tuned = _split_base(reader, method, base, entries)
    for index, _, params in tuned:
        if params:
            raise reader.fail(
                f"models[{index}].parameters", f"{method} takes its parameters under the top-level parameters: only"
            )
    values = {str(k): reader.scalar(f"parameters.{k}", v) if not isinstance(v, (list, dict)) else v
              for k, v in shared.items()}  # fmt: skip
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    assert base is not None
    return method, values, base, [p for _, p, _ in tuned]


def _resolve(
    reader: _Reader, method: str, tuned: Sequence[tuple[int, Path, dict[str, Any]]], shared: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """mergekit's parameter resolution: shared values and per-model values (model, then top level, then default)."""
    shared_spec, model_spec = MERGEKIT_METHODS[method]
    for key in shared:
        if key not in shared_spec and key not in model_spec:
            known = ", ".join([*shared_spec, *model_spec])
            raise reader.fail(f"parameters.{key}", f"unknown parameter for {method} (known: {known})")
    for index, _, params in tuned:
        for key in params:
            if key not in model_spec:
                raise reader.fail(
                    f"models[{index}].parameters.{key}", f"unknown per-model parameter for {method} (known: "
                    f"{', '.join(model_spec)})",
                )  # fmt: skip
    for key, value in shared.items():  # every value given is checked, used or not
        reader.scalar(f"parameters.{key}", value)
    for index, _, params in tuned:
        for key, value in params.items():
            reader.scalar(f"models[{index}].parameters.{key}", value)
    values: dict[str, Any] = {}
    for key, default in shared_spec.items():
        raw = shared.get(key, default)
        where = f"parameters.{key}"
        values[key] = reader.flag(where, raw) if isinstance(default, bool) else reader.number(where, raw)
    per_model = []
    for index, _, params in tuned:
        resolved = {}
        for key, default in model_spec.items():
            if key in params:
                resolved[key] = reader.number(f"models[{index}].parameters.{key}", params[key])
            elif key in shared:
                resolved[key] = reader.number(f"parameters.{key}", shared[key])
            elif default is None:
                raise reader.fail(
                    f"models[{index}].parameters.{key}", f"required by {method} (or give it under parameters:)"
                )
            else:
                resolved[key] = float(default)
        if resolved.get("density", 1.0) <= 0:
            raise reader.fail(f"models[{index}] density", "must be > 0 in mergeflow (mergekit drops the whole τ)")
        per_model.append(resolved)
    return values, per_model


def _normalized(weights: Sequence[float]) -> list[float]:
    """wt / Σs ws: mergekit's ``normalize`` without consensus (a sum below 1e-8 in magnitude counts as 1)."""
    total = sum(weights)
    return [w / (1.0 if abs(total) < 1e-8 else total) for w in weights]


def _mergekit(
    reader: _Reader, method: str, base: Path | None, entries: Sequence[tuple[Path, dict[str, Any]]],
    shared: Mapping[str, Any],
) -> tuple[str, dict[str, Any], Path, list[Path]]:  # fmt: skip
    """A method both tools have, with mergekit 0.1.5's meaning (see docs/recipes.md)."""
    if method == "linear":
        tuned = [(i, p, params) for i, (p, params) in enumerate(entries)]
        if base is not None and not any(_same(p, base) for p, _ in entries):
            raise reader.fail("base_model", "linear has no base model; list it under models with a weight, or drop it")
        pretrained = base if base is not None else entries[0][0]
    else:
        tuned = _split_base(reader, method, base, entries)
        assert base is not None
        pretrained = base
    values, per_model = _resolve(reader, method, tuned, shared)
    weights = [m["weight"] for m in per_model]
    finetuned = [p for _, p, _ in tuned]
    if method == "linear":
        if values["normalize"]:
            total = sum(weights)
            if total == 0:
                raise reader.fail("models", "the weights sum to 0, and normalize: true divides by their sum")
            weights = [w / total for w in weights]
        return "weight_average", {"weights": tuple(weights)}, pretrained, finetuned
    if method in ("dare_ties", "dare_linear"):
        return "dare", _dare(method, values, per_model, weights), pretrained, finetuned
    scaling = values["lambda"]
    if method == "task_arithmetic":
        if values["normalize"]:
            weights = _normalized(weights)
        return "task_arithmetic", {"weights": tuple(weights), "scaling": scaling}, pretrained, finetuned
    densities = [m["density"] for m in per_model]
    if method == "ties":
        params = {
            "variant": "mergekit", "scope": "tensor", "merge": "mean" if values["normalize"] else "sum",
            "density": tuple(min(d, 1.0) for d in densities), "weights": tuple(weights), "scaling": scaling,
            "rescale": values["rescale"],
        }  # fmt: skip
        return "ties", params, pretrained, finetuned
    # breadcrumbs, breadcrumbs_ties
    for name in ("density", "gamma"):
        if len({m[name] for m in per_model}) > 1:
            raise reader.fail(
                f"models[*].parameters.{name}", f"differs between models; mergeflow's breadcrumbs takes one {name}"
            )
    ties = method == "breadcrumbs_ties"
    if values["normalize"] and ties:
        raise reader.fail("parameters.normalize", "true is not supported for breadcrumbs_ties by mergeflow")
    if values["normalize"]:
        weights = _normalized(weights)
    params = {
        "variant": "mergekit", "density": min(densities[0], 1.0), "gamma": per_model[0]["gamma"],
        "sign_election": ties, "weights": tuple(weights), "scaling": scaling, "rescale": values["rescale"],
    }  # fmt: skip
    return "breadcrumbs", params, pretrained, finetuned


def _dare(
    method: str, values: Mapping[str, Any], per_model: Sequence[Mapping[str, float]], weights: list[float]
) -> dict:
    """dare_ties / dare_linear as mergeflow's dare, variant mergekit: p = 1 − density per model (0 where
    density ≥ 1), the L1 ``rescale``, the weights; masks are mergeflow's seeded ones (seed 0)."""
    ties = method == "dare_ties"
    if values["normalize"] and not ties:
        weights = _normalized(weights)
    return {
        "variant": "mergekit", "combine": "ties" if ties else "ta",
        "merge": "mean" if ties and values["normalize"] else "sum",
        "drop_rate": tuple(max(0.0, 1.0 - m["density"]) for m in per_model), "rescale": values["rescale"],
        "weights": tuple(weights), "scaling": values["lambda"], "seed": 0,
    }  # fmt: skip
