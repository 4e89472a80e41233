"""The project's own DVC setup: `dvc repro` of a stage, metrics, and a push/pull round trip
through the default local remote (a copy of the project in a temporary directory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _project(tmp_path: Path) -> Path:
    """A copy of the checkout's files (what a fresh clone has) in its own git repository."""
    project = tmp_path / "project"
    listed = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file() and not name.startswith("out/"):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    _run("git", "init", "-q", cwd=project)
    return project


def test_repro_push_and_pull_through_the_default_remote(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _run("dvc", "repro", "-q", "demo", cwd=project)
    produced = _digests(project / "out" / "demo")
    assert "models/cart.safetensors" in produced and "metrics.json" in produced
    assert "out/demo/metrics.json" in _run("dvc", "metrics", "show", cwd=project)

    _run("dvc", "push", "-q", "demo", cwd=project)
    remote = tmp_path / "mergeflow-dvc-remote"  # .dvc/config: ../../mergeflow-dvc-remote from .dvc/
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    shutil.rmtree(project / "out" / "demo" / "models")
    shutil.rmtree(project / ".dvc" / "cache")
    _run("dvc", "pull", "-q", "demo", cwd=project)
    assert _digests(project / "out" / "demo") == produced  # every output back, byte for byte
    assert "up to date" in _run("dvc", "status", "demo", cwd=project)


def test_acquire_dvc_tracks_the_default_store_in_a_fresh_clone(tmp_path: Path) -> None:
    """`mergeflow acquire --dvc` with params.yaml's store (data/store): the .dvc file is committable, the
    store itself stays out of git."""
    project = _project(tmp_path)
    source = tmp_path / "theta0.safetensors"
    torch.manual_seed(0)
    save_file({"w": torch.randn(4, 4)}, source)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["acquire"]["sources"] = [{"kind": "path", "name": "theta0", "path": str(source)}]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run("mergeflow", "acquire", "--dvc", cwd=project, env={"HOME": str(tmp_path / "home")})
    assert "tracked: data/store.dvc" in out
    dvc_file = yaml.safe_load((project / "data" / "store.dvc").read_text())
    assert dvc_file["outs"][0]["path"] == "store" and dvc_file["outs"][0]["md5"].endswith(".dir")
    status = _run("git", "status", "--porcelain", "--untracked-files=all", cwd=project)
    assert "data/store.dvc" in status and "data/store/" not in status


TINY = {
    "device": "cpu",
    "precision": "float32",
    "zoo": {"dir": "out/zoo/tiny", "text_minilm": {"tasks": ["language", "emoji"], "train": 32, "validation": 16,
                                                 "test": 32, "layers": 2, "max_length": 32}},
    "methods": {"weight_average": {}, "cart": {"scaling": 1.0, "rank_ratio": 0.5}},
    "selection": {"grids": {"cart": {"scaling": [1.0, 2.0]}}},
    "adaptation": {},
}  # fmt: skip


WHO = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _git(project: Path, *args: str) -> str:
    return _run("git", *args, cwd=project, env=WHO)


def test_experiments_over_a_parameter_and_a_preset(tmp_path: Path) -> None:
    """The `run` stage is `mergeflow run`: a committed baseline, `dvc exp run -S methods.cart.rank_ratio=...`
    and `-S preset=...` experiments side by side in `dvc exp show`, and their curves in `dvc plots diff`."""
    project = _project(tmp_path)
    (project / "params.yaml").write_text(yaml.safe_dump({**TINY, "preset": None}))
    (project / "presets" / "narrow.yaml").write_text(
        yaml.safe_dump({"selection": {"grids": {"cart": {"scaling": [0.5, 0.75], "rank_ratio": [0.125, 0.5]}}}})
    )
    (tmp_path / "home").mkdir()
    env = {"HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "", **WHO}
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "baseline")
    _run("dvc", "repro", "-q", "run", cwd=project, env=env)
    assert (project / "out" / "report" / "metrics.json").is_file()
    assert (project / "out" / "report" / "plots" / "scaling" / "cart.json").is_file()
    _git(project, "add", "-A")  # what a team commits: dvc.lock, metrics and curves (models go to the DVC cache)
    committed = _git(project, "diff", "--cached", "--name-only").split()
    assert {"dvc.lock", "out/report/metrics.json", "out/report/plots/scaling/cart.json"} <= set(committed)
    assert not [name for name in committed if name.startswith(("out/zoo/", "out/report/merged/"))]
    _git(project, "commit", "-qm", "baseline results")

    _run("dvc", "exp", "run", "-q", "run", "-n", "rank", "-S", "methods.cart.rank_ratio=0.25", cwd=project, env=env)
    _git(project, "reset", "-q", "--hard")  # the next experiment starts from the baseline, not from "rank"
    _run("dvc", "exp", "run", "-q", "run", "-n", "narrow", "-S", "preset=narrow", cwd=project, env=env)
    runs = {}
    for commit in json.loads(_run("dvc", "exp", "show", "--json", cwd=project, env=env)):
        if commit["rev"] != "workspace":
            runs["baseline"] = commit["data"]
            runs |= {exp["name"]: exp["data"] for group in commit["experiments"] or [] for exp in group["revs"]}
    assert set(runs) == {"baseline", "rank", "narrow"}

    def params_and_cart(name: str) -> tuple[dict, dict]:
        data = runs[name]
        return data["params"]["params.yaml"]["data"], data["metrics"]["out/report/metrics.json"]["data"]["cart"]

    (_, base), (rank_params, rank), (narrow_params, _) = map(params_and_cart, ("baseline", "rank", "narrow"))
    assert rank_params["methods"]["cart"]["rank_ratio"] == 0.25 and rank_params["preset"] is None
    assert narrow_params["preset"] == "narrow" and narrow_params["methods"]["cart"]["rank_ratio"] == 0.5
    assert rank.keys() == base.keys() == {"mean", "normalized"}  # tiny splits: numbers may coincide,
    merged = {name: runs[name]["outs"]["out/report/merged"]["hash"] for name in runs}  # models do not (disjoint grids)
    assert len(set(merged.values())) == 3, merged
    report = json.loads((project / "out" / "report" / "results.json").read_text())  # the workspace holds "narrow"
    assert sorted({p["params"]["rank_ratio"] for p in report["sweeps"]["cart"]}) == [0.125, 0.5]

    plotted = json.loads(_run("dvc", "plots", "diff", "--json", "HEAD", "rank", "narrow", cwd=project, env=env))
    revisions = {
        name: {point["rev"] for plot in plots for point in plot["content"]["data"]["values"]}
        for name, plots in plotted["data"].items()
    }
    assert revisions["out/report/plots/scaling/cart.json"] == {"HEAD", "rank", "narrow"}  # overlaid
    assert revisions["CART validation score vs. rank"] == {"narrow"}  # only "narrow" searched over rank
