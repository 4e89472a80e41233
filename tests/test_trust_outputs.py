"""Never destroy or corrupt a file: outputs that are inputs, outputs that are not regular files,
operating-system failures while writing, and partial files left by killed writers."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, random_state_dicts, write_set

import mergeflow.writer as writer
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import OutputError
from mergeflow.writer import check_output, remove_stale_partials, save_state_dict, write_text_atomic


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=1, dtype=torch.float32)
    return write_set(tmp_path / "in", base, tuned)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergeflow.cli", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _merge_args(base: Path, tuned: list[Path], output: Path | str, method: str = "cart") -> list[str]:
    return ["merge", "--method", method, "--pretrained", str(base), "--finetuned", *map(str, tuned),
            "--output", str(output), "--device", "cpu"]  # fmt: skip


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeflow: error: "), proc.stderr
    return lines[0]


def _no_partials(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(inputs, tmp_path: Path, spelling: str) -> None:
    base, tuned = inputs
    before = {p: _digest(p) for p in (base, *tuned)}
    target = {
        "same": base,
        "dotdot": base.parent / ".." / base.parent.name / base.name,
        "symlink": tmp_path / "link.safetensors",
        "hardlink": tmp_path / "hard.safetensors",
    }[spelling]
    if spelling == "symlink":
        target.symlink_to(tuned[1])
    if spelling == "hardlink":
        os.link(tuned[2], target)
    line = _one_error_line(_cli(*_merge_args(base, tuned, target)))
    assert str(target) in line and ("is the input" in line or "symbolic link" in line)
    assert {p: _digest(p) for p in (base, *tuned)} == before
    _no_partials(tmp_path)


def test_a_per_task_output_directory_that_holds_an_input_is_refused(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    folder = tmp_path / "per-task"
    folder.mkdir()
    os.link(tuned[0], folder / f"00-{tuned[0].name.split('.')[0]}.safetensors")  # where output 0 would go
    before = _digest(tuned[0])
    line = _one_error_line(_cli(*_merge_args(base, tuned, folder, method="cart_indexing")))
    assert "is the input" in line and _digest(tuned[0]) == before


def test_a_fifo_output_is_refused_without_being_opened(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    line = _one_error_line(_cli(*_merge_args(base, tuned, fifo), timeout=60))  # opening it would hang
    assert "a FIFO" in line
    assert fifo.is_fifo()


def test_a_device_output_is_never_replaced(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    link = tmp_path / "null"
    line = _one_error_line(_cli(*_merge_args(base, tuned, "/dev/null")))
    assert "/dev/null" in line and "character device" in line
    assert Path("/dev/null").is_char_device()
    with pytest.raises(OutputError, match="character device"):
        check_output("/dev/null")
    assert not link.exists()


def test_a_directory_where_a_file_is_expected_and_the_reverse(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    assert "a directory, not a regular file" in _one_error_line(_cli(*_merge_args(base, tuned, folder)))
    afile = tmp_path / "per-task"
    afile.write_text("keep me")
    line = _one_error_line(_cli(*_merge_args(base, tuned, afile, method="cart_indexing")))
    assert "expected a directory" in line and afile.read_text() == "keep me"


def test_a_parent_that_is_a_file_is_one_line(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    line = _one_error_line(_cli(*_merge_args(base, tuned, blocker / "sub" / "out.safetensors")))
    assert "is not a directory" in line and blocker.read_text() == "x"


def test_a_real_write_failure_keeps_the_previous_output(inputs, tmp_path: Path) -> None:
    """A file-size limit makes the kernel refuse the write (EFBIG): a real OS failure mid-file."""
    base, tuned = inputs
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"previous output")
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from mergeflow.cli import main\n"
        f"sys.exit(main({['-q', *_merge_args(base, tuned, out), '--force']!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    line = _one_error_line(proc)
    assert str(out) in line and "File too large" in line
    assert out.read_bytes() == b"previous output"
    _no_partials(out.parent)


@pytest.mark.parametrize(
    ("where", "code"),
    [("open", errno.EACCES), ("write", errno.ENOSPC), ("replace", errno.EROFS), ("fsync", errno.EIO)],
)
def test_os_failures_become_one_line_and_leave_nothing(tmp_path: Path, monkeypatch, where: str, code: int) -> None:
    """Failures root cannot provoke for real here (permissions, a full or read-only disk) are injected
    at the system call the writer makes."""
    target = tmp_path / "model.safetensors"
    save_state_dict(target, {"w": torch.ones(4)})
    previous = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "open":
        real_open = open

        def guarded(path, *args, **kwargs):
            if ".partial-" in str(path):
                fail()
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded)
    elif where == "write":
        monkeypatch.setattr(writer.SafetensorsWriter, "write", _failing_write(code))
    elif where == "replace":
        monkeypatch.setattr(writer.os, "replace", fail)
    else:
        monkeypatch.setattr(writer.os, "fsync", fail)
    with pytest.raises(OutputError) as info:
        save_state_dict(target, {"w": torch.zeros(4)})
    message = str(info.value)
    assert message.startswith(f"{target}: cannot write ({os.strerror(code)})") and "\n" not in message
    monkeypatch.undo()
    assert target.read_bytes() == previous
    _no_partials(tmp_path)


def _failing_write(code: int):
    original = writer.SafetensorsWriter.write

    def write(self, key, tensor):
        real_write = self._handle.write

        def boom(data):
            raise OSError(code, os.strerror(code))

        self._handle.write = boom
        try:
            original(self, key, tensor)
        finally:
            self._handle.write = real_write

    return write


def test_text_outputs_share_the_rules(tmp_path: Path) -> None:
    fifo = tmp_path / "report.md"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="a FIFO"):
        write_text_atomic(fifo, "x")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_partials_of_killed_writers_are_removed_by_the_next_run(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    dead = out.parent / f".{out.name}.partial-{_dead_pid()}"
    dead.write_bytes(b"half a model")
    alive = out.parent / f".{out.name}.partial-{os.getppid()}"  # a running process: maybe still writing
    alive.write_bytes(b"in progress")
    other = out.parent / f".other.safetensors.partial-{_dead_pid()}"  # another target's: not ours to judge
    other.write_bytes(b"x")
    proc = _cli(*_merge_args(base, tuned, out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and not dead.exists() and alive.exists() and other.exists()


def test_a_killed_merge_leaves_no_file_that_looks_complete_and_resumes(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    out = tmp_path / "merged.safetensors"
    script = (
        "import os, signal\n"
        "import mergeflow.writer as w\n"
        "original = w.SafetensorsWriter.write\n"
        "def write(self, key, tensor):\n"
        "    original(self, key, tensor)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.SafetensorsWriter.write = write\n"
        "from mergeflow.cli import main\n"
        f"main({['-q', *_merge_args(base, tuned, out)]!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == -9
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert _cli(*_merge_args(base, tuned, out)).returncode == 0
    assert out.is_file()
    _no_partials(tmp_path)
    assert remove_stale_partials(out) == []


def test_library_merge_refuses_an_input_as_output(inputs) -> None:
    base, tuned = inputs
    before = _digest(tuned[0])
    with pytest.raises(OutputError, match="is the input"):
        merge_checkpoints("weight_average", base, tuned, tuned[0], device="cpu")
    assert _digest(tuned[0]) == before
