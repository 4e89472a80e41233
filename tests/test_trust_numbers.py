"""Never let a non-finite or meaningless number through: parameters, merged tensors, params.yaml,
and methods that could do nothing with the inputs given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, random_state_dicts, write_set

from mergeflow.config import load_config
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import ConfigError, NumericalError
from mergeflow.methods import method_names, parse_params

PROJECT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergeflow.cli", "-q", *args], capture_output=True, text=True, check=False, cwd=cwd
    )


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=2, dtype=torch.float32)
    return write_set(tmp_path / "in", base, tuned)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999"])
def test_non_finite_set_values_are_refused_and_nothing_is_written(inputs, tmp_path: Path, value: str) -> None:
    base, tuned = inputs
    out = tmp_path / "out.safetensors"
    proc = _cli("merge", "--method", "cart", "--pretrained", str(base), "--finetuned", *map(str, tuned),
                "--output", str(out), "--set", f"scaling={value}")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mergeflow: error: invalid parameters for cart: scaling: Input should be a finite number"
    ]
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_every_float_parameter_of_every_method_refuses_nan() -> None:
    for method in method_names():
        from mergeflow.methods import get_method

        for name, info in get_method(method).params.model_fields.items():
            if info.annotation in (float, float | tuple[float, ...]):
                with pytest.raises(ConfigError, match="finite"):
                    parse_params(method, {info.alias or name: float("nan")})


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "methods:\n  cart: {scaling: .nan}\n",
            "methods: invalid parameters for cart: scaling: Input should be a finite",
        ),
        ("selection:\n  grids:\n    ties: {scaling: [1.0, .inf]}\n", "selection.grids: invalid parameters for ties"),
        ("adaptation:\n  adamerging: {init: .nan}\n", "adaptation.adamerging"),
        ("analysis:\n  rank_curve: {scalings: [1.0, .nan]}\n", "analysis.rank_curve.scalings.1"),
    ],
)
def test_params_yaml_non_finite_values_name_file_and_section(tmp_path: Path, text: str, expected: str) -> None:
    path = _params(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_presets_and_overrides_are_checked_the_same_way(tmp_path: Path) -> None:
    path = _params(tmp_path, "methods:\n  cart: {}\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bad.yaml").write_text("methods:\n  cart: {rank_ratio: .nan}\n")
    with pytest.raises(ConfigError, match=r"with preset .*bad\.yaml: methods: invalid parameters for cart: rank_ratio"):
        load_config(path, preset="bad")
    with pytest.raises(ConfigError, match="--set overrides: methods: invalid parameters for cart: scaling"):
        load_config(path, {"methods.cart.scaling": float("inf")})  # what the Prefect flow's parameters go through


def test_duplicate_keys_and_yaml_errors_give_the_line(tmp_path: Path) -> None:
    path = _params(tmp_path, "workers: 1\nmethods:\n  cart: {scaling: 2}\n  cart: {scaling: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not valid YAML: line 4, column 3: duplicate key 'cart' (first on line 3)"
    path = _params(tmp_path, "methods:\n  cart: {scaling: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML: line 3, column 1: "):
        load_config(path)
    proc = _cli("report", "--params", str(path), "--no-mlflow")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "line 3" in proc.stderr


def test_the_shipped_params_and_presets_load(tmp_path: Path) -> None:
    load_config(PROJECT / "params.yaml")
    for preset in (PROJECT / "presets").glob("*.yaml"):
        load_config(PROJECT / "params.yaml", preset=preset.stem)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_overflowing_merge_is_refused_with_the_key_named(tmp_path: Path, dtype: torch.dtype) -> None:
    base, tuned = random_state_dicts(LAYOUTS["hf_bert"](), tasks=2, seed=3, dtype=dtype)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    out = tmp_path / "out.safetensors"
    scaling = {torch.float16: 1e6, torch.bfloat16: 1e40, torch.float32: 1e40}[dtype]
    with pytest.raises(NumericalError, match=r"task_arithmetic: merged key '[^']+' has \d+ non-finite value") as info:
        merge_checkpoints("task_arithmetic", base_path, paths, out, {"scaling": scaling}, device="cpu")
    assert str(dtype) in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_consensus_with_fewer_tasks_than_min_tasks_refuses(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    with pytest.raises(ConfigError, match=r"min_tasks=4 with 3 fine-tune\(s\).*would be θ0"):
        merge_checkpoints("consensus", base, tuned, tmp_path / "c.safetensors", {"min_tasks": 4}, device="cpu")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_selector_that_matches_nothing_refuses(tmp_path: Path) -> None:
    layout = {k: v for k, v in LAYOUTS["open_clip"]().items() if v.is_float}
    base, tuned = random_state_dicts(layout, tasks=2, seed=5, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    with pytest.raises(ConfigError, match=r"matches none of the .* float tensors .*selector=all_2d"):
        merge_checkpoints("cart", base_path, paths, tmp_path / "x.safetensors", {"exclude": ("*",)}, device="cpu")


def test_grid_points_refuse_non_finite_scalings() -> None:
    from mergeflow.grid import point_states

    with pytest.raises(ConfigError, match="not a finite number"):
        point_states({"groups": [{"files": []}], "anchor": "unused"}, 0, float("nan"))
