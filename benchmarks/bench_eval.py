"""Evaluation throughput and AdaMerging step cost on the text-minilm zoo (the main job's two loops).

    python benchmarks/bench_eval.py                       # needs a built zoo (`mergeflow zoo build`)
    python benchmarks/bench_eval.py --steps 20 --repeat 3 --out benchmarks/results/eval-text-minilm.json

Measures, in this process, after one warm-up of each:
- ``evaluation``: one validation evaluation of a fine-tune (every task's validation split, as each
  grid point costs), repeated ``--repeat`` times: seconds and texts per second;
- ``adamerging``: ``--steps`` AdaMerging steps (over task arithmetic and over CART) with the main
  job's settings (batches of 16 per task): seconds per step, and the entropy trajectory, so two
  versions of the code can be compared for equal results as well as for speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from mergeflow.adamerging import AdaMergingParams, adamerge, adaptation_vectors
from mergeflow.checkpoint import read_state_dict
from mergeflow.zoo.registry import make_evaluator

log = logging.getLogger("bench_eval")


def time_evaluation(zoo_dir: Path, zoo: dict, repeat: int) -> dict:
    engine = make_evaluator(zoo_dir)
    task = next(iter(zoo["tasks"]))
    state = read_state_dict(zoo["tasks"][task]["model"])
    texts = sum(len(engine.texts(t, "validation")[0]) for t in engine.tasks)  # type: ignore[attr-defined]
    first = engine.evaluate(state, "validation")  # warm-up: tokenisation, first-call costs
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = engine.evaluate(state, "validation")
        seconds.append(time.perf_counter() - start)
    assert result == first, "evaluation is not repeatable"
    best = min(seconds)
    return {"texts": texts, "seconds": [round(s, 3) for s in seconds], "texts_per_second": round(texts / best, 1),
            "accuracy": {t: r["accuracy"] for t, r in result.items()}}  # fmt: skip


def time_adamerging(zoo_dir: Path, zoo: dict, over: str, steps: int) -> dict:
    engine = make_evaluator(zoo_dir)
    tasks = list(zoo["tasks"])
    params = AdaMergingParams(over=over, steps=steps, batch_size=16, rank_ratio=0.12)
    base = read_state_dict(zoo["theta0"]["file"])
    anchor, vectors = adaptation_vectors(params, base, [read_state_dict(zoo["tasks"][t]["model"]) for t in tasks])
    module = engine.module  # type: ignore[attr-defined]
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)

    def task_logits(state, _step, generator):
        batches = [(t, engine.sample_unlabelled(t, params.batch_size, generator)) for t in tasks]  # type: ignore[attr-defined]
        if hasattr(engine, "logits_many"):  # as mergeflow.adaptation does
            return engine.logits_many(batches, state)
        return [engine.logits_with(t, b, state) for t, b in batches]  # type: ignore[attr-defined]

    adamerge(anchor, vectors, task_logits, params.model_copy(update={"steps": 1}), progress_every=0)  # warm-up
    start = time.perf_counter()
    _, _, history = adamerge(anchor, vectors, task_logits, params, progress_every=0)
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds_per_step": round(elapsed / steps, 3), "entropy": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="out/zoo/text-minilm")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", choices=["evaluation", "adamerging"], action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/eval-text-minilm.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    zoo_dir = Path(args.zoo)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
    }
    if "evaluation" not in args.skip:
        result["evaluation"] = time_evaluation(zoo_dir, zoo, args.repeat)
        log.info("evaluation: %s", result["evaluation"])
    if "adamerging" not in args.skip:
        for over in ("task_arithmetic", "cart"):
            result[f"adamerging_{over}"] = time_adamerging(zoo_dir, zoo, over, args.steps)
            log.info("adamerging over %s: %.3f s/step", over, result[f"adamerging_{over}"]["seconds_per_step"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
