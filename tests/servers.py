"""Real servers for tests, on 127.0.0.1 and a free port: helpers to wait for them and stop them, and
``mlflow_server``, a real ``mlflow server`` (SQLite backend, artifacts proxied to a local folder)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll ``condition()`` every 0.5 s until it is truthy (returned); fail after ``timeout`` s or when
    ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited with {process.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def healthy(url: str) -> bool:
    """``GET <url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[Callable[[], str]]:
    """``mlflow server`` from this environment with its store in ``folder`` (``db`` and ``artifacts/``,
    served through the server: clients need no access to the folder). Yields at once a function that
    waits until the server answers and returns its URL (other setup can run while it starts)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"}
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]  # fmt: skip
    with (folder / "server.log").open("wb") as logfile:
        process = subprocess.Popen(command, env=env, cwd=folder, stdout=logfile, stderr=subprocess.STDOUT)

        def ready() -> str:
            wait_for(lambda: healthy(url), 180, "mlflow server /health", process)
            return url

        try:
            yield ready
        finally:
            stop(process)
