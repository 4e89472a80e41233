#!/usr/bin/env python3
"""Run one FusionBench 0.2.33 merge algorithm on the benchmark's safetensors files, as a whole process.

Runs OUTSIDE the project venv, in a scratch venv with the peer:

    python3.11 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.14.1 fusion-bench==0.2.33 safetensors
    /usr/bin/time -v /tmp/peers/bin/python benchmarks/peer_fusionbench.py magmax \\
        --data build/bench/vit-b-32-8 --output build/bench/peer/magmax.safetensors --set scaling=0.5

The inputs are the files ``bench_merge.py`` merges (``pretrained.safetensors``, ``task*.safetensors``).
Each state dict becomes an ``nn.Module`` whose parameter names are the file's keys, and the model pool
reads a file afresh on every ``load_model`` (what a pool of checkpoints on disk does; FusionBench's
own pool would hand back one shared module, which several algorithms write into). The merged state
dict is written with ``safetensors``; per-task algorithms write ``NN-<input stem>.safetensors`` per
fine-tune into the ``--output`` directory, the names ``mergeflow merge`` gives them, so that
``bench_merge.py --child compare`` can pair them.

Parameters use mergeflow's names (``--set``) and map onto FusionBench's:

- ``magmax``: ``MagMaxAlgorithm(scaling_factor=scaling)``;
- ``dare``: ``DareTaskArithmetic(scaling_factor=scaling, sparsity_ratio=drop_rate, rescale=True,
  only_on_linear_weights=False)`` after ``torch.manual_seed(seed)`` (FusionBench draws from the global
  RNG, so its drop masks are not mergeflow's: compare by statistics, not entry by entry);
- ``svc``: ``SingularValueCalibrationArithmeticTask(scaling_factor=scaling, alpha=alpha)`` on the CPU;
- ``wudi``: ``WUDIMerging(iter_num=steps, exclude_keys=None)`` (Adam lr 1e-5 is fixed there);
- ``emr``: ``EMRMerging()``, then ``set_task`` per fine-tune on the one returned model (each call
  removes the previous task's δ and adds the next, as at inference);
- ``tsv_c``: FusionBench's ``TaskSingularVectorCompression.run`` raises NotImplementedError, so this
  runs the copy of the official ``compress_tv`` it ships (``task_singular_vector/utils/TSVC_utils.py``)
  on every task's τt with ``sv_reduction`` (default 1/T), then θ0 + U_k diag(s_k) V_kᵀ per task
  (the official evaluation's reconstruction; 1-D and 4-D keys keep τt).

Per-task models are written one at a time, as each is formed.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("peer_fusionbench")

DEFAULTS: dict[str, dict[str, Any]] = {
    "magmax": {"scaling": 0.5},
    "dare": {"scaling": 0.3, "drop_rate": 0.5, "seed": 0},
    "svc": {"scaling": 0.3, "alpha": 0.1},
    "wudi": {"steps": 100},
    "emr": {},
    "tsv_c": {"sv_reduction": None},
}
PER_TASK = {"emr", "tsv_c"}


def module_from_state_dict(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An ``nn.Module`` whose parameter names are exactly the state dict's keys (tensors not copied)."""
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(tensor))
    return root


def file_pool(pretrained: Path, finetuned: list[Path]):
    """A FusionBench model pool over files: ``load_model`` reads the named file into a fresh module."""
    from fusion_bench import BaseModelPool

    files = {"_pretrained_": pretrained, **{p.name.split(".")[0]: p for p in finetuned}}

    class FilePool(BaseModelPool):
        def load_model(self, name, *args, **kwargs):
            if isinstance(name, str) and name in files:
                return module_from_state_dict(load_file(str(files[name])))
            return super().load_model(name, *args, **kwargs)

    return FilePool({name: str(path) for name, path in files.items()})


class _Fabric:
    """What FusionBench's fabric-mixin algorithms read from a Lightning Fabric: the device and loggers."""

    device = torch.device("cpu")
    _loggers: tuple = ()


def run_algorithm(method: str, params: dict[str, Any], pool) -> Iterator[dict[str, torch.Tensor]]:
    """Run FusionBench's algorithm for ``method``: the merged state dict, or one per task, in pool order."""
    if method in ("emr", "tsv_c"):
        yield from (per_task_emr(pool) if method == "emr" else per_task_tsv_c(pool, params["sv_reduction"]))
        return
    yield state_of(single_model(method, params, pool))


def per_task_emr(pool) -> Iterator[dict[str, torch.Tensor]]:
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging

    model = EMRMerging().run(pool)
    for name in pool.model_names:
        model.set_task(name)
        yield state_of(model.backbone)


def per_task_tsv_c(pool, reduction: float | None) -> Iterator[dict[str, torch.Tensor]]:
    from fusion_bench.method.task_singular_vector.utils.TSVC_utils import compress_tv

    base = pool.load_pretrained_model().state_dict()
    vectors = {}
    for name in pool.model_names:
        tuned = pool.load_model(name).state_dict()
        vectors[name] = SimpleNamespace(vector={k: tuned[k] - base[k] for k in base})
        del tuned
    factors = compress_tv(vectors, reduction if reduction is not None else 1 / len(vectors))
    del vectors
    for name in pool.model_names:
        yield {
            k: base[k] + (f["u"] @ torch.diag_embed(f["s"]) @ f["v"] if "u" in f else f["dim1"])
            for k, f in factors.pop(name).items()
        }


def single_model(method: str, params: dict[str, Any], pool) -> torch.nn.Module:
    if method == "magmax":
        from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

        return MagMaxAlgorithm(scaling_factor=params["scaling"], inplace=False).run(pool)
    if method == "dare":
        from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

        torch.manual_seed(int(params["seed"]))
        algorithm = DareTaskArithmetic(
            scaling_factor=params["scaling"],
            sparsity_ratio=params["drop_rate"],
            only_on_linear_weights=False,
            rescale=True,
        )
        return algorithm.run(pool)
    if method == "svc":
        from fusion_bench.method.singular_value_calibration.task_arithmetic import (
            SingularValueCalibrationArithmeticTask,
        )

        algorithm = SingularValueCalibrationArithmeticTask(
            scaling_factor=params["scaling"], alpha=params["alpha"], accelerator="cpu"
        )
        return algorithm.run(pool)
    if method == "wudi":
        from fusion_bench.method import WUDIMerging

        algorithm = WUDIMerging(iter_num=int(params["steps"]), exclude_keys=None)
        algorithm.fabric = _Fabric()
        with torch.enable_grad():
            return algorithm.run(pool)
    raise SystemExit(f"peer_fusionbench: error: no FusionBench algorithm for {method!r}; known: {sorted(DEFAULTS)}")


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(DEFAULTS))
    parser.add_argument("--data", type=Path, required=True, help="pretrained.safetensors and task*.safetensors")
    parser.add_argument("--output", type=Path, required=True, help="a file, or a directory for per-task methods")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="mergeflow parameter name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fusion_bench").setLevel(logging.WARNING)

    params = dict(DEFAULTS[args.method])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in params:
            raise SystemExit(f"peer_fusionbench: error: {args.method} takes {sorted(params)}, not {key!r}")
        params[key] = parse_value(value)
    finetuned = sorted(args.data.glob("task*.safetensors"))
    if args.method in PER_TASK:
        args.output.mkdir(parents=True, exist_ok=True)
        paths = [args.output / f"{i:02d}-{p.name.split('.')[0]}.safetensors" for i, p in enumerate(finetuned)]
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        paths = [args.output]
    start = time.perf_counter()
    pool = file_pool(args.data / "pretrained.safetensors", finetuned)
    with torch.no_grad():
        for path, state in zip(paths, run_algorithm(args.method, params, pool), strict=True):
            save_file(state, str(path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "fusionbench %s %s: merged and wrote %d file(s) in %.1f s (algorithm imports included), peak RSS %.0f MiB",
        args.method, params, len(paths), time.perf_counter() - start, peak,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
