"""The ``mergeflow merge`` command-line contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from helpers import LAYOUTS, load, max_rel_diff, random_state_dicts, write_set

from mergeflow.cli import main
from mergeflow.engine import merge_checkpoints
from mergeflow.methods import method_names


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeflow.cli", *args], capture_output=True, text=True, check=False)


def test_help_lists_every_method_and_parameter() -> None:
    proc = _cli("merge", "--help")
    assert proc.returncode == 0
    for name in method_names():
        assert f"  {name}: " in proc.stdout
    for param in ("rank_ratio=0.12", "density=0.2", "common_fraction=0.8", "mask_lambda=0.4", "selector='attn_mlp'"):
        assert param in proc.stdout


def test_merge_with_overrides_matches_the_library(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=4, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    out = tmp_path / "cli.safetensors"
    args = ["-q", "merge", "--method", "consensus", "--pretrained", str(base_path), "--finetuned", *map(str, paths)]
    args += ["--output", str(out), "--set", "mask_lambda=[0.3,0.5,0.7]", "--set", "min_tasks=1", "--device", "cpu"]
    code = main(args)
    assert code == 0

    lib = merge_checkpoints(
        "consensus", base_path, paths, tmp_path / "lib.safetensors", {"mask_lambda": (0.3, 0.5, 0.7), "min_tasks": 1}
    )
    assert max_rel_diff(load(out), load(lib.outputs[0])) == 0.0


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["hf_bert"](), tasks=2, seed=4, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    paths[0].write_bytes(paths[0].read_bytes()[:-8])
    out = tmp_path / "o.safetensors"
    proc = _cli(
        "-q",
        "merge",
        "--method",
        "cart",
        "--pretrained",
        str(base_path),
        "--finetuned",
        *map(str, paths),
        "--output",
        str(out),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeflow: error: ") and "ft0.safetensors" in lines[0]
    assert not out.exists()
    proc = _cli("merge", "--method", "cart", "--pretrained", str(base_path), "--finetuned", str(paths[1]),
                "--output", str(out), "--set", "rank_ratio=2")  # fmt: skip
    assert proc.returncode == 2 and "rank_ratio" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_and_report_refuse_unknown_presets_and_bad_values_before_any_work(tmp_path: Path) -> None:
    proc = _cli("run", "--preset", "no-such-preset", "--no-mlflow")
    assert proc.returncode == 2 and "unknown run preset 'no-such-preset'" in proc.stderr
    assert "paper-recipe" in proc.stderr and "quick" in proc.stderr  # the known ones are listed
    proc = _cli("report", "--preset", "quick", "--no-mlflow", "--params", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml: cannot read" in proc.stderr
    bad = tmp_path / "params.yaml"
    bad.write_text("adaptation:\n  adamerging: {over: ties}\n")
    proc = _cli("run", "--params", str(bad), "--no-mlflow")
    assert proc.returncode == 2 and "adaptation.adamerging.over" in proc.stderr


def test_report_is_a_top_level_command() -> None:
    top, nested = _cli("report", "--help"), _cli("zoo", "report", "--help")
    assert top.returncode == nested.returncode == 0
    assert "--preset" in top.stdout and top.stdout.split("options:")[1] == nested.stdout.split("options:")[1]
