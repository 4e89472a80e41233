"""Time and peak memory of every merge method on ViT-B/32-shaped inputs.

    python benchmarks/bench_merge.py                      # full size: 8 tasks, open_clip ViT-B-32 image tower
    python benchmarks/bench_merge.py --model vit-tiny     # seconds-long smoke run

Each measurement runs in a fresh Python process (``--child``) so that peak RSS (``ru_maxrss``) belongs
to that measurement alone; the RSS of the imports alone is reported beside it. Results go to
``<out>/results.json`` and ``<out>/results.md``.

Measured side by side:
- every registered method (``force=True``) with its parameters from ``params.yaml``'s ``methods:``
  (``--params ''``: the registry defaults); a per-task method writes one model per fine-tune into a
  directory, and its row records how many files and bytes it wrote;
- CART with ``svd_solver=full`` (LAPACK SVD) to separate the solver's gain from streaming;
- ``straightforward_cart``: the procedure of the research code: every checkpoint in memory, a full
  ``torch.linalg.svd`` of every centred matrix per task; its output is compared with ours;
- ``cart_grid``: 8 rank ratios × 10 scalings from one streaming pass (80 merged models, each tensor
  materialised in full and reduced to a checksum rather than written: 80 × 351 MB of files would
  measure the disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RANK_RATIOS = (0.02, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5)
SCALINGS = tuple(round(0.3 * i, 2) for i in range(1, 11))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(data: Path) -> tuple[Path, list[Path]]:
    pretrained = data / "pretrained.safetensors"
    return pretrained, sorted(data.glob("task*.safetensors"))


def child_merge(method: str, data: Path, out: Path, device: str, params: dict) -> dict:
    from mergeflow.engine import merge_checkpoints

    baseline = _rss_mib()
    pretrained, finetuned = _inputs(data)
    start = time.perf_counter()
    result = merge_checkpoints(method, pretrained, finetuned, out, params, device=device, force=True)
    seconds = time.perf_counter() - start
    row = {
        "seconds": seconds,
        "peak_rss_mib": _rss_mib(),
        "import_rss_mib": baseline,
        "outputs": len(result.outputs),
        "written_bytes": sum(Path(p).stat().st_size for p in result.outputs),
    }
    from safetensors import safe_open

    with safe_open(str(result.outputs[0]), "pt") as handle:  # per-task methods: bytes kept beyond θ0
        storage = (handle.metadata() or {}).get("mergeflow.storage")
    if storage:
        row["storage"] = json.loads(storage)
    return row


def method_params(path: Path | None, method: str) -> dict:
    """The parameters ``params.yaml`` gives ``method`` under ``methods:`` ({} without a file: registry defaults)."""
    if path is None:
        return {}
    import yaml

    return dict((yaml.safe_load(path.read_text()).get("methods") or {}).get(method) or {})


def child_straightforward_cart(data: Path, out: Path, ratio: float = 0.12, scaling: float = 2.0) -> dict:
    """All checkpoints in memory, full SVD of every centred matrix (the research code's procedure)."""
    from safetensors.torch import load_file, save_file

    baseline = _rss_mib()
    pretrained, finetuned = _inputs(data)
    start = time.perf_counter()
    models = [load_file(str(p)) for p in finetuned]
    base = load_file(str(pretrained))
    merged = {}
    for key in base:
        average = sum(m[key] for m in models) / len(models)
        if average.ndim == 2 and ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key:
            k = max(1, int(ratio * min(average.shape)))
            low_rank = torch.zeros_like(average)
            for m in models:
                u, s, vh = torch.linalg.svd(m[key] - average, full_matrices=False)
                low_rank += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
            average = average + scaling * low_rank
        merged[key] = average.contiguous()
    save_file(merged, str(out))
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": _rss_mib(), "import_rss_mib": baseline}


def child_grid(data: Path, device: str) -> dict:
    from mergeflow.devices import resolve_device
    from mergeflow.engine import open_checkpoint_set, stream_merge
    from mergeflow.methods import parse_params

    class Checksum:
        def __init__(self) -> None:
            self.total = 0.0

        def write(self, key: str, tensor: torch.Tensor) -> None:
            if tensor.is_floating_point():
                self.total += float(tensor.double().sum())

        def commit(self) -> None: ...

        def abort(self) -> None: ...

    baseline = _rss_mib()
    pretrained, finetuned = _inputs(data)
    grid = [parse_params("cart", {"rank_ratio": r, "scaling": s}) for r in RANK_RATIOS for s in SCALINGS]
    sinks = [[Checksum()] for _ in grid]
    start = time.perf_counter()
    checkpoints = open_checkpoint_set(pretrained, finetuned)
    try:
        stream_merge(checkpoints, "cart", grid, sinks, device=resolve_device(device), dtype=torch.float32)
    finally:
        checkpoints.close()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _rss_mib(),
        "import_rss_mib": baseline,
        "points": len(grid),
    }


def child_compare(a: Path, b: Path) -> dict:
    """Largest per-tensor relative difference ‖a − b‖/‖b‖, largest |a − b| and unequal entries over shared keys.

    Two directories (per-task outputs) are compared file by file, matched by name.
    """
    from mergeflow.checkpoint import open_checkpoint

    pairs = [(a / p.name, p) for p in sorted(b.glob("*.safetensors"))] if b.is_dir() else [(a, b)]
    worst, worst_key, worst_abs, abs_key, differing, entries = 0.0, "", 0.0, "", 0, 0
    for left, right in pairs:
        with open_checkpoint(left) as ra, open_checkpoint(right) as rb:
            for key in sorted(set(ra.keys()) & set(rb.keys())):
                x, y = ra.load(key).double(), rb.load(key).double()
                rel = float((x - y).norm() / y.norm().clamp(min=1e-30))
                largest = float((x - y).abs().max()) if x.numel() else 0.0
                differing += int((x != y).sum())
                entries += x.numel()
                if rel > worst:
                    worst, worst_key = rel, f"{right.name}:{key}" if len(pairs) > 1 else key
                if largest > worst_abs:
                    worst_abs, abs_key = largest, f"{right.name}:{key}" if len(pairs) > 1 else key
    return {
        "max_relative_difference": worst,
        "worst_key": worst_key,
        "max_abs_difference": worst_abs,
        "max_abs_key": abs_key,
        "differing_entries": differing,
        "entries": entries,
        "files": len(pairs),
    }


def _run_child(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repeat(times: int, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run a child ``times`` times in fresh processes; keep every run, report min and max."""
    runs = [_run_child(*args, env=env) for _ in range(times)]
    row = dict(runs[0])
    row["runs"] = runs
    for field in ("seconds", "peak_rss_mib"):
        row[field] = min(r[field] for r in runs)
        row[field + "_max"] = max(r[field] for r in runs)
    return row


def _machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem} RAM, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    parser.add_argument("--skip-straightforward", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="fresh-process runs per row (min and max reported)")
    parser.add_argument(
        "--params", default="params.yaml", help="methods' parameters from this file's methods: ('' = registry defaults)"
    )
    parser.add_argument("--skip-cold", action="store_true", help="no row without the hash cache")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "merge":
            method, data, out, device, params = rest
            result = child_merge(method, Path(data), Path(out), device, json.loads(params))
        elif kind == "straightforward_cart":
            result = child_straightforward_cart(Path(rest[0]), Path(rest[1]))
        elif kind == "grid":
            result = child_grid(Path(rest[0]), rest[1])
        elif kind == "compare":
            result = child_compare(Path(rest[0]), Path(rest[1]))
        else:
            raise SystemExit(f"unknown child {kind}")
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench")
    from mergeflow.methods import get_method, method_names
    from mergeflow.synthetic import write_example_checkpoints

    data = args.data / f"{args.model}-{args.tasks}"
    if not (data / "pretrained.safetensors").exists() or len(list(data.glob("task*.safetensors"))) != args.tasks:
        log.info("writing %d synthetic %s fine-tunes to %s", args.tasks, args.model, data)
        write_example_checkpoints(data, args.model, args.tasks, seed=0)
    size = sum(p.stat().st_size for p in data.glob("*.safetensors"))
    outdir = args.data / "merged"
    outdir.mkdir(parents=True, exist_ok=True)
    methods = list(args.methods or method_names())
    params_file = Path(args.params) if args.params else None
    chosen = {m: method_params(params_file, m) for m in methods}

    def output(method: str, name: str | None = None) -> str:
        """A file for a single-model method, a directory (one model per fine-tune) for a per-task one."""
        per_task = get_method(method).per_task_outputs
        return str(outdir / (name or method)) if per_task else str(outdir / f"{name or method}.safetensors")

    # Input hashes live in a cache of the benchmark's own; the first row shows the cost without it.
    os.environ["MERGEFLOW_CACHE_DIR"] = str(args.data / "hash-cache")
    rows: dict[str, dict] = {}
    n = args.repeat
    first = methods[0]
    if not args.skip_cold:
        cold = f"{first} (inputs hashed, no hash cache)"
        rows[cold] = _repeat(
            n, "merge", first, str(data), output(first, "cold"), args.device, json.dumps(chosen[first]),
            env={"MERGEFLOW_HASH_CACHE": "0"},
        )  # fmt: skip
        log.info("  %s: %s", cold, rows[cold])
    _run_child("merge", first, str(data), output(first, "prime"), args.device, json.dumps(chosen[first]))  # the cache
    for method in methods:
        log.info("merging with %s %s", method, chosen[method])
        rows[method] = _repeat(n, "merge", method, str(data), output(method), args.device, json.dumps(chosen[method]))
        rows[method]["params"] = chosen[method]
        log.info("  %s", rows[method])
    if "cart" in methods:
        rows["cart (svd_solver=full)"] = _repeat(
            n, "merge", "cart", str(data), str(outdir / "cart_full.safetensors"), args.device, '{"svd_solver": "full"}'
        )
        log.info("  cart full: %s", rows["cart (svd_solver=full)"])
        rows["cart grid 8 ratios x 10 scalings"] = _repeat(n, "grid", str(data), args.device)
        log.info("  grid: %s", rows["cart grid 8 ratios x 10 scalings"])
        if not args.skip_straightforward:
            rows["straightforward CART (in memory, full SVD)"] = _repeat(
                n, "straightforward_cart", str(data), str(outdir / "cart_straightforward.safetensors")
            )
            log.info("  straightforward: %s", rows["straightforward CART (in memory, full SVD)"])
            rows["straightforward CART (in memory, full SVD)"].update(
                _run_child(
                    "compare", str(outdir / "cart.safetensors"), str(outdir / "cart_straightforward.safetensors")
                )
            )
    report = {
        "machine": _machine(),
        "model": args.model,
        "tasks": args.tasks,
        "input_bytes": size,
        "device": args.device,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Machine: {report['machine']}. Inputs: synthetic {args.model}, {args.tasks} fine-tunes + θ0, "
        f"{size / 2**30:.2f} GiB in all, warm page cache, device {args.device}.",
        "",
        f"Each row: {n} run(s), each in a fresh process; min–max shown.",
        "",
        "| run | parameters | wall time (s) | peak RSS (MiB) | RSS of imports alone (MiB) | written |",
        "|---|---|---|---|---|---|",
    ]

    def span(row: dict, field: str, fmt: str) -> str:
        low, high = row[field], row.get(field + "_max", row[field])
        return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}–{high:{fmt}}"

    for name, row in rows.items():
        params = ", ".join(f"{k} {v}" for k, v in row.get("params", {}).items())
        count = row.get("outputs", 0)
        written = f"{count} × {row['written_bytes'] / count / 1e6:.0f} MB" if count else ""
        if "storage" in row:
            written += f" (stored beyond θ0: {row['storage']['total_bytes'] / 1e6:.0f} MB)"
        cells = [
            name, params, span(row, "seconds", ".1f"), span(row, "peak_rss_mib", ".0f"),
            f"{row['import_rss_mib']:.0f}", written,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if "cart" in rows and "cart grid 8 ratios x 10 scalings" in rows:
        ratio = rows["cart grid 8 ratios x 10 scalings"]["seconds"] / rows["cart"]["seconds"]
        lines.append(f"\nCART grid (80 points) / one CART merge: {ratio:.2f}×")
    straight = rows.get("straightforward CART (in memory, full SVD)")
    if straight and "cart" in rows:
        lines.append(
            f"Straightforward CART / mergeflow CART: {straight['seconds'] / rows['cart']['seconds']:.2f}× the time; "
            f"max relative difference per tensor {straight['max_relative_difference']:.2e} ({straight['worst_key']})."
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
