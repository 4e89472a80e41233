"""AdaMerging on a user's own checkpoints and evaluator: the library call, the command line and the
Prefect flow give the same adapted model, reuse it when nothing changed, and refuse bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import prefect_harness
from toy_evaluator import make, write_checkpoints

from mergeflow.adamerging import AdaMergingParams, adaptation_vectors, combine
from mergeflow.adaptation import adapt_checkpoints, read_adaptation
from mergeflow.checkpoint import read_state_dict
from mergeflow.errors import ConfigError

TESTS = Path(__file__).parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "mergeflow.cli", "-q", "adapt", *args], capture_output=True,
                          text=True, check=False, env=env)  # fmt: skip


def test_library_adaptation_lowers_entropy_and_is_the_formula(tmp_path: Path) -> None:
    theta0, tuned = write_checkpoints(tmp_path / "in")
    params = AdaMergingParams(steps=30, lr=0.05, batch_size=32)
    out = tmp_path / "adapted.safetensors"
    result = adapt_checkpoints(theta0, tuned, make(), params, out, evaluator_id="toy", device="cpu")
    assert not result["reused"] and len(result["history"]) == 30
    assert result["history"][-1] < result["history"][0]  # the entropy went down
    # the written model is A + Σt clip(λ) v_t with the learned coefficients
    anchor, vectors = adaptation_vectors(params, read_state_dict(theta0), [read_state_dict(p) for p in tuned])
    lam = {k: torch.tensor(v) for k, v in result["coefficients"].items()}
    want = combine(anchor, vectors, lam, params.clip)
    got = read_state_dict(out)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert read_adaptation(out)["history"] == result["history"]
    again = adapt_checkpoints(theta0, tuned, make(), params, out, evaluator_id="toy", device="cpu")
    assert again["reused"] and again["coefficients"] == result["coefficients"]
    other = adapt_checkpoints(theta0, tuned, make(), params, out, evaluator_id="toy-v2", device="cpu")
    assert not other["reused"]  # another evaluator (or data) adapts again


def test_command_line_matches_the_library_and_refuses_bad_input(tmp_path: Path) -> None:
    theta0, tuned = write_checkpoints(tmp_path / "in")
    out = tmp_path / "cli.safetensors"
    args = ["--pretrained", theta0, "--finetuned", *tuned, "--evaluator", "toy_evaluator:make", "--output", str(out),
            "--set", "steps=10", "--set", "lr=0.05", "--evaluator-option", "shift=2.0", "--device", "cpu"]  # fmt: skip
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "entropy" in proc.stdout and str(out) in proc.stdout
    lib = adapt_checkpoints(theta0, tuned, make(2.0), AdaMergingParams(steps=10, lr=0.05), tmp_path / "lib.safetensors",
                            evaluator_id="x", device="cpu")  # fmt: skip
    got, want = read_state_dict(out), read_state_dict(lib["output"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    for bad, message in [
        (["--evaluator", "toy_evaluator"], "expected package.module:factory"),
        (["--evaluator", "no_such_module:make"], "cannot import no_such_module"),
        (["--evaluator", "toy_evaluator:nothing"], "has no 'nothing'"),
        (["--set", "steps=-1"], "invalid AdaMerging parameters: steps"),
        (["--set", "lr=nan"], "finite number"),
        (["--output", theta0], "is the input"),
    ]:
        trial = list(args)
        if bad[0] == "--set":
            trial += bad  # a later --set of the same name wins
        else:
            trial[trial.index(bad[0]) + 1] = bad[1]
        proc = _cli(*trial)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            bad,
            proc.stderr,
        )


def test_the_evaluator_must_have_one_task_per_fine_tune(tmp_path: Path) -> None:
    theta0, tuned = write_checkpoints(tmp_path / "in")
    with pytest.raises(ConfigError, match="2 tasks for 1 fine-tunes"):
        adapt_checkpoints(theta0, tuned[:1], make(), AdaMergingParams(steps=1), tmp_path / "o.safetensors",
                          evaluator_id="toy", device="cpu")  # fmt: skip


def test_the_flow_runs_caches_and_equals_the_library(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.adapt import adapt_flow

    theta0, tuned = write_checkpoints(tmp_path / "in")
    out = tmp_path / "flow.safetensors"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}), prefect_harness():
        first = adapt_flow(theta0, tuned, "toy_evaluator:make", str(out), {"steps": 5, "lr": 0.05}, device="cpu")
        second = adapt_flow(theta0, tuned, "toy_evaluator:make", str(out), {"steps": 5, "lr": 0.05}, device="cpu")
        out.unlink()
        third = adapt_flow(theta0, tuned, "toy_evaluator:make", str(out), {"steps": 5, "lr": 0.05}, device="cpu")
    assert (first["state"], second["state"], third["state"]) == ("Completed", "Cached", "Completed")
    assert out.is_file() and first["coefficients"] == third["coefficients"]
    lib = adapt_checkpoints(theta0, tuned, make(), AdaMergingParams(steps=5, lr=0.05), tmp_path / "lib.safetensors",
                            evaluator_id="x", device="cpu")  # fmt: skip
    assert lib["coefficients"] == first["coefficients"]
