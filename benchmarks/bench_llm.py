"""LLM-shaped inputs for side-by-side merges with mergekit: θ0 and fine-tunes with TinyLlama-1.1B's
tensor shapes, bfloat16, as sharded Hugging Face directories, plus one mergekit recipe per method.

    python benchmarks/bench_llm.py --out build/bench-llm            # writes inputs and recipes once

Then each recipe runs through both tools as whole processes, on the same files:

    mergeflow merge --config build/bench-llm/ties.yaml --output build/bench-llm/out/mf-ties --format hf --force
    (cd build/bench-llm && mergekit-yaml ties.yaml out/mk-ties --no-copy-tokenizer --no-write-model-card)
                                     # in a venv with mergekit 0.1.5; it resolves `model:` from the cwd
    python benchmarks/bench_llm.py --out build/bench-llm --compare out/mf-ties out/mk-ties

Shapes (LlamaForCausalLM): hidden 2048, intermediate 5632, 22 layers, 32 query and 4 key/value
heads of 64, vocabulary 32 000, untied ``lm_head`` (1.10 G parameters, 2.2 GB in bfloat16). The
weights are not a trained model: θ0 ~ 0.02·N(0, 1) (norm weights 1 + 0.02·N), and fine-tune t is
θ0 + τt with τt = a shared part + a task part, each 2e-3·N(0, 1) in scale, rounded to bfloat16 —
what matters for a merge's cost is the shapes, the dtype and the file layout. Fixed seed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("bench-llm")

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS = 2048, 5632, 22, 32000, 32, 4
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 1_000_000_000
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
RECIPES = {  # mergekit's format; `model:` paths relative to the recipe file
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.3}},
    "ties": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.2}},
}


def layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape, in the order a Llama checkpoint stores them."""
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        keys[f"{p}self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        keys[f"{p}self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        keys[f"{p}self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        keys[f"{p}self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        keys[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        keys[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        keys[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        keys[f"{p}input_layernorm.weight"] = (HIDDEN,)
        keys[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    keys["model.norm.weight"] = (HIDDEN,)
    keys["lm_head.weight"] = (VOCAB, HIDDEN)
    return keys


def write_hf_dir(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """config.json, model-0000k-of-0000n.safetensors shards of ≤ SHARD_BYTES and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def _randn(shape: tuple[int, ...], *seeds: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(hash(seeds) & 0x7FFF_FFFF_FFFF))


def write_inputs(out: Path, tasks: int, seed: int) -> None:
    """θ0 and ``tasks`` fine-tunes (those missing), one model in memory at a time: every tensor is drawn
    from a generator seeded by (seed, key, part), so each model is rebuilt alone, the same every time."""
    for model in [-1, *range(tasks)]:  # -1: θ0
        name = "base" if model < 0 else f"ft_{model}"
        if (out / name / "model.safetensors.index.json").exists():
            continue
        tensors = {}
        for k, (key, shape) in enumerate(layout().items()):
            noise = _randn(shape, seed, k, 0)
            value = 1.0 + 0.02 * noise if len(shape) == 1 else 0.02 * noise
            if model >= 0:  # τt = a part shared by the tasks + the task's own
                value += 2e-3 * (_randn(shape, seed, k, 1) + _randn(shape, seed, k, 2 + model))
            tensors[key] = value.to(torch.bfloat16)
        log.info("writing %s", out / name)
        write_hf_dir(out / name, tensors)


def write_recipes(out: Path, tasks: int) -> None:
    import yaml

    for name, recipe in RECIPES.items():
        body = {
            "merge_method": recipe["merge_method"],
            "base_model": "base",
            "models": [{"model": f"ft_{t}", "parameters": dict(recipe["parameters"])} for t in range(tasks)],
            "dtype": "bfloat16",
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def _tensors(folder: Path) -> dict[str, Path]:
    """Key -> file of an HF directory: sharded (with its index) or one ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {key: folder / shard for key, shard in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(folder / "model.safetensors"), "pt") as single:
        return dict.fromkeys(single.keys(), folder / "model.safetensors")


def compare(left: Path, right: Path) -> dict[str, float | int | str]:
    """Largest |difference| relative to each key's largest |value|, over the keys both directories hold."""
    a, b = _tensors(left), _tensors(right)
    worst, worst_key, differing, entries = 0.0, "", 0, 0
    for key in sorted(set(a) & set(b)):
        with safe_open(str(a[key]), "pt") as fa, safe_open(str(b[key]), "pt") as fb:
            x, y = fa.get_tensor(key).double(), fb.get_tensor(key).double()
        rel = float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
        differing += int((x != y).sum())
        entries += x.numel()
        if rel > worst:
            worst, worst_key = rel, key
    return {"max_relative_to_key_max": worst, "worst_key": worst_key, "differing_entries": differing,
            "entries": entries, "keys_compared": len(set(a) & set(b)), "keys_only_left": len(set(a) - set(b)),
            "keys_only_right": len(set(b) - set(a))}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/bench-llm"))
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs=2, metavar=("LEFT", "RIGHT"), help="two merged directories under --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.compare:
        result = compare(args.out / args.compare[0], args.out / args.compare[1])
        log.info("%s", json.dumps(result))
        return 0
    write_inputs(args.out, args.tasks, args.seed)
    write_recipes(args.out, args.tasks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
