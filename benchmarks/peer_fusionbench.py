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
  removes the previous task's δ and adds the next, as at inference).
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path
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
}
PER_TASK = {"emr"}


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


def run_algorithm(method: str, params: dict[str, Any], pool) -> dict[str, torch.nn.Module]:
    """Run FusionBench's algorithm for ``method``; the merged module, or one module per task name."""
    if method == "magmax":
        from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

        return {"": MagMaxAlgorithm(scaling_factor=params["scaling"], inplace=False).run(pool)}
    if method == "dare":
        from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

        torch.manual_seed(int(params["seed"]))
        algorithm = DareTaskArithmetic(
            scaling_factor=params["scaling"],
            sparsity_ratio=params["drop_rate"],
            only_on_linear_weights=False,
            rescale=True,
        )
        return {"": algorithm.run(pool)}
    if method == "svc":
        from fusion_bench.method.singular_value_calibration.task_arithmetic import (
            SingularValueCalibrationArithmeticTask,
        )

        algorithm = SingularValueCalibrationArithmeticTask(
            scaling_factor=params["scaling"], alpha=params["alpha"], accelerator="cpu"
        )
        return {"": algorithm.run(pool)}
    if method == "wudi":
        from fusion_bench.method import WUDIMerging

        algorithm = WUDIMerging(iter_num=int(params["steps"]), exclude_keys=None)
        algorithm.fabric = _Fabric()
        with torch.enable_grad():
            return {"": algorithm.run(pool)}
    if method == "emr":
        from fusion_bench.method.emr_merging.emr_merging import EMRMerging

        model = EMRMerging().run(pool)
        models = {}
        for name in pool.model_names:
            model.set_task(name)
            models[name] = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        return models
    raise SystemExit(f"peer_fusionbench: error: no FusionBench algorithm for {method!r}; known: {sorted(DEFAULTS)}")


def state_of(model) -> dict[str, torch.Tensor]:
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().contiguous() for k, v in state.items()}


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
    start = time.perf_counter()
    with torch.no_grad():
        models = run_algorithm(args.method, params, file_pool(args.data / "pretrained.safetensors", finetuned))
    merged = time.perf_counter() - start
    if args.method in PER_TASK:
        args.output.mkdir(parents=True, exist_ok=True)
        for index, (path, model) in enumerate(zip(finetuned, models.values(), strict=True)):
            save_file(state_of(model), str(args.output / f"{index:02d}-{path.name.split('.')[0]}.safetensors"))
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_file(state_of(models[""]), str(args.output))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "fusionbench %s %s: merged in %.1f s, written in %.1f s, peak RSS %.0f MiB",
        args.method, params, merged, time.perf_counter() - start - merged, peak,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
