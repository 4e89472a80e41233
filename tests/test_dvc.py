"""The project's own DVC setup: `dvc repro` of a stage, metrics, and a push/pull round trip
through the default local remote (a copy of the project in a temporary directory)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_repro_push_and_pull_through_the_default_remote(tmp_path: Path) -> None:
    project = tmp_path / "project"
    listed = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    _run("git", "init", "-q", cwd=project)
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
