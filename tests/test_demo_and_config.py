"""params.yaml validation, the offline demo, and a smoke run of the benchmark script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeflow.config import load_config, run_presets
from mergeflow.demo import run_demo
from mergeflow.errors import ConfigError
from mergeflow.methods import method_names

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_is_valid_and_lists_every_method() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert set(cfg.methods) == set(method_names())
    assert cfg.method_params()["cart"].rank_ratio == 0.12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"methods": {"nope": {}}}, "unknown merge method 'nope'"),
        ({"methods": {"ties": {"density": 0}}}, "density"),
        ({"device": "tpu"}, "device"),
        ({"demo": {"tasks": 0}}, "demo.tasks"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_params_are_reported_before_any_work(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message):
        run_demo(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_demo_merges_every_method_and_writes_the_report(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demo"] = {"model": "bert-tiny", "tasks": 3, "seed": 1}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    rows = run_demo(path, tmp_path / "out")
    assert [r["method"] for r in rows] == list(params["methods"])
    for row in rows:
        assert len(row["cosine"]) == 3 and all(-1.0 <= c <= 1.0 for c in row["cosine"])
        assert all(Path(p).exists() for p in row["outputs"])
    by_method = {r["method"]: r for r in rows}
    # weight averaging's merged task vector is the mean task vector: norm ratio exactly 1
    assert by_method["weight_average"]["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert by_method["task_arithmetic"]["norm_ratio"] == pytest.approx(0.3 * 3, rel=1e-6)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()).keys() == set(params["methods"])
    assert "| cart |" in (out / "report.md").read_text()
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_demo(path, out)  # second run: every merge is found up to date
    assert all(r["cached"] for r in again)


def test_benchmark_script_runs_on_a_tiny_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--model", "vit-tiny", "--tasks", "3",
         "--data", str(tmp_path / "data"), "--out", str(tmp_path / "res"), "--methods", "cart", "ties"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    rows = report["rows"]
    assert {"cart", "ties", "cart grid 8 ratios x 10 scalings"} <= set(rows)
    assert rows["straightforward CART (in memory, full SVD)"]["max_relative_difference"] < 1e-5
    assert "| cart |" in (tmp_path / "res" / "results.md").read_text()


def test_dotted_overrides_are_applied_then_validated() -> None:
    from mergeflow.config import load_config

    cfg = load_config(ROOT / "params.yaml", {"methods.cart.scaling": 1.5, "zoo.text_minilm.epochs": 2})
    assert cfg.method_params()["cart"].scaling == 1.5 and cfg.zoo.text_minilm.epochs == 2
    assert load_config(ROOT / "params.yaml").method_params()["cart"].scaling == 2.0  # file untouched
    with pytest.raises(ConfigError, match="rank_ratio"):
        load_config(ROOT / "params.yaml", {"methods.cart.rank_ratio": 3})
    with pytest.raises(ConfigError, match="not a section"):
        load_config(ROOT / "params.yaml", {"device.x": 1})


def test_cli_run_rejects_bad_overrides_before_any_work(tmp_path: Path) -> None:
    from mergeflow.cli import main

    assert main(["-q", "run", "--params", str(ROOT / "params.yaml"), "--set", "methods.nope={}"]) == 2


def test_run_presets_overlay_params_and_overrides_win(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "methods: {cart: {scaling: 2.0}}\nselection: {grids: {cart: {scaling: [1.0]}, ties: {scaling: [1.0]}}}\n"
    )
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "wide.yaml").write_text("selection: {grids: {cart: {scaling: [1.0, 2.0, 3.0]}}}\n")
    assert run_presets(params) == {"wide": tmp_path / "presets" / "wide.yaml"}
    cfg = load_config(params, {"methods.cart.rank_ratio": 0.5}, preset="wide")
    assert list(cfg.selection.grids["cart"]["scaling"]) == [1.0, 2.0, 3.0]  # the preset's grid
    assert list(cfg.selection.grids["ties"]["scaling"]) == [1.0]  # untouched sections stay
    assert cfg.methods["cart"] == {"scaling": 2.0, "rank_ratio": 0.5}
    with pytest.raises(ConfigError, match="unknown run preset 'narrow'; known: wide"):
        load_config(params, preset="narrow")


def test_the_preset_named_in_params_yaml_applies_and_the_cli_one_wins(tmp_path: Path) -> None:
    """`preset:` in params.yaml (what `dvc exp run -S preset=NAME` sets) lays the overlay; --preset and
    an override of `preset` win; an overlay naming a preset itself is refused."""
    params = tmp_path / "params.yaml"
    params.write_text("preset: wide\nmethods: {cart: {scaling: 2.0}}\nselection: {grids: {cart: {scaling: [1.0]}}}\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "wide.yaml").write_text("selection: {grids: {cart: {scaling: [1.0, 2.0, 3.0]}}}\n")
    (tmp_path / "presets" / "one.yaml").write_text("selection: {grids: {cart: {scaling: [4.0]}}}\n")
    (tmp_path / "presets" / "loop.yaml").write_text("preset: wide\n")
    assert load_config(params).selection.grids["cart"]["scaling"] == [1.0, 2.0, 3.0]
    assert load_config(params).preset == "wide"
    assert load_config(params, preset="one").selection.grids["cart"]["scaling"] == [4.0]
    by_override = load_config(params, {"preset": "one"})
    assert by_override.preset == "one" and by_override.selection.grids["cart"]["scaling"] == [4.0]
    assert load_config(params, {"preset": None}).selection.grids["cart"]["scaling"] == [1.0]
    with pytest.raises(ConfigError, match="a run preset cannot name another"):
        load_config(params, preset="loop")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown run preset 'gone'"):
        load_config(params, {"preset": "gone"})


def test_the_report_directory_is_the_zoo_s_unless_report_dir_says(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("zoo: {dir: z}\n")
    assert load_config(params).report_path() == Path("z") / "report"
    assert load_config(params, {"report_dir": "out/report"}).report_path() == Path("out/report")


def test_the_shipped_presets_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    presets = run_presets(root / "params.yaml")
    assert {"quick", "paper-recipe"} <= set(presets)
    recipe = load_config(root / "params.yaml", preset="paper-recipe")
    cart = recipe.selection.grids["cart"]
    assert len(cart["scaling"]) * len(cart["rank_ratio"]) == 80
    assert recipe.adaptation["adamerging"].steps == 500 and recipe.adaptation["adamerging_cart"].over == "cart"


def test_adaptation_names_must_not_shadow_methods(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("methods: {cart: {}}\nadaptation: {cart: {over: cart}}\n")
    with pytest.raises(ConfigError, match="also merge methods"):
        load_config(params)
