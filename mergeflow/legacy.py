"""Opt-in conversion of pickled *whole modules* (e.g. the original task-vectors release) to safetensors.

Such files need classes to unpickle (``src.modeling.ImageEncoder``, ``open_clip.model.*``), which
``torch.load(weights_only=True)`` rightly refuses. Here no class from the file is ever imported:
a restricted unpickler resolves only an allowlist of tensor-rebuilding functions and containers, and
turns every other global into an inert ``nn.Module`` stub that merely stores the pickled
attributes. ``nn.Module.state_dict()`` then walks the stubs' parameters and buffers. A payload that
names ``os.system`` (or anything else) gets a stub, whose construction with arguments fails, so
nothing runs. As a second wall the conversion happens in a separate ``python -I`` process with a
time limit; only tensors come back, through a safetensors file.

Run as ``python -I -m mergeflow.legacy SRC DST``; call :func:`convert_legacy_checkpoint` from code.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch

from mergeflow.errors import CheckpointError

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): getattr(torch._utils, "_rebuild_parameter_with_state", None),
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("copyreg", "_reconstructor"): None,  # filled below with a safe version
}
for _name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _ALLOWED[("torch", _name)] = getattr(torch, _name)


_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _fresh_module_state() -> dict[str, Any]:
    """The attributes ``nn.Module.__init__`` sets in this torch version, with fresh (unshared) values."""
    return dict(torch.nn.Module().__dict__)


class StubModule(torch.nn.Module):
    """Stands in for any pickled class: keeps the attributes it is given, runs no foreign code.

    Pickles written by older torch (e.g. 1.x, the original task-vectors release) lack attributes that
    today's ``nn.Module`` relies on (``_state_dict_pre_hooks``, ``_non_persistent_buffers_set``, ...);
    each one a fresh ``nn.Module`` has is filled in when missing. Hook containers are always reset to
    empty: a converted module never runs, and a pickled hook (a stub at best) must not be called by
    ``state_dict()``.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the pickled attributes over a fresh module's defaults; refuse a malformed module state."""
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__}: unexpected non-dict object state")
        for key in _MODULE_CONTAINERS:
            if key in state and not isinstance(state[key], dict):
                raise pickle.UnpicklingError(
                    f"{type(self).__name__}: pickled {key} is a {type(state[key]).__name__}, not a dict"
                )
        fresh = _fresh_module_state()
        hooks = {key: value for key, value in fresh.items() if "hook" in key}
        self.__dict__.update(fresh)
        self.__dict__.update(state)
        self.__dict__.update(hooks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a converted legacy module cannot be run")


def _safe_reconstructor(cls: type, base: type, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, StubModule)) or base is not object:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} from {base!r}")
    return object.__new__(cls)


_ALLOWED[("copyreg", "_reconstructor")] = _safe_reconstructor


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals; everything else becomes a named :class:`StubModule` subclass."""

    stubs: ClassVar[dict[str, type]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) use Python 2 names, e.g. "__builtin__.set"
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        key = f"{module}.{name}"
        if key not in self.stubs:
            self.stubs[key] = type(name, (StubModule,), {"__module__": "mergeflow.legacy.stubs"})
        return self.stubs[key]


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler class and ``load``."""

    Unpickler = RestrictedUnpickler
    __name__ = "mergeflow.legacy._PickleModule"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def load_legacy_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Unpickle with stubs (never importing the file's classes) and return its tensors."""
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach().clone() for k, v in obj.state_dict().items()}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, neither a module nor a state dict")


def convert_legacy_checkpoint(src: str | Path, dst: str | Path, timeout: float = 600.0) -> Path:
    """Convert ``src`` to safetensors at ``dst`` in an isolated subprocess (``python -I``)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    proc = subprocess.run(
        [sys.executable, "-I", "-m", "mergeflow.legacy", str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=dst.parent,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if proc.returncode != 0 or not dst.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{src}: legacy conversion failed ({last})")
    return dst


def _main(argv: list[str]) -> int:
    from mergeflow.writer import save_state_dict

    src, dst = argv
    tensors = load_legacy_state_dict(src)
    save_state_dict(dst, tensors, {"mergeflow.converted_from": Path(src).name, "mergeflow.converter": "legacy"})
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
