#!/usr/bin/env python3
"""Generate recipe-parity fixtures: mergekit 0.1.5's own ``mergekit-yaml`` run on small checkpoints.

Runs OUTSIDE the project venv, in a scratch venv with mergekit:

    python3.11 -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.14.1 mergekit==0.1.5 safetensors
    /tmp/peers/bin/python tests/parity/generate_recipes.py

Writes tests/parity/recipes/: four tiny Llama-layout checkpoints as Hugging Face directories
(``base``, ``ft_a``, ``ft_b``, ``ft_c``: config.json + model.safetensors, float32), one recipe
``<case>.yaml`` per case (paths relative to the recipe, as a mergekit user writes them), mergekit's
merged ``expected/<case>.safetensors`` (copied from the directory ``mergekit-yaml`` writes) and
``cases.json``. Deterministic: fixed seed, CPU, one thread; mergekit is run with ``--random-seed 0``.
"""

# ruff: noqa: T201  (a script: progress goes to stdout)
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent / "recipes"
SEED = 20261203
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 16, 32, 2, 64
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# name -> recipe (mergekit's YAML format; `model:` paths are relative to the recipe file)
CASES: dict[str, dict] = {
    "linear_normalize": {
        "merge_method": "linear",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 2.0}},
            {"model": "ft_b", "parameters": {"weight": 1.0}},
            {"model": "ft_c", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    },
    "linear_no_normalize": {
        "merge_method": "linear",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.5}},
            {"model": "ft_b", "parameters": {"weight": 0.3}},
            {"model": "ft_c", "parameters": {"weight": 0.1}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "task_arithmetic_weights": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.7}},
            {"model": "ft_b", "parameters": {"weight": 0.3}},
            {"model": "ft_c", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
    },
    "task_arithmetic_normalize": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "ft_a", "parameters": {"weight": 1.0}},
            {"model": "ft_b", "parameters": {"weight": 3.0}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "ties_density_weight": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": "ft_b", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "ft_c", "parameters": {"weight": 0.8, "density": 0.7}},
        ],
        "parameters": {"int8_mask": True},
        "dtype": "float32",
    },
    "ties_no_normalize": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": "ft_b", "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": "ft_c", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"normalize": False, "lambda": 1.5, "density": 0.6},
        "dtype": "float32",
    },
    "breadcrumbs_ties_weights": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 1.0}},
            {"model": "ft_b", "parameters": {"weight": 0.5}},
            {"model": "ft_c", "parameters": {"weight": 0.8}},
        ],
        "parameters": {"density": 0.8, "gamma": 0.05},
        "dtype": "float32",
    },
    # DARE's masks are random (torch's global stream in mergekit): density 1 keeps every entry, so this
    # case compares the weighted sign consensus and normalisation of dare_ties, not the masks.
    "dare_ties_density1": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.9}},
            {"model": "ft_b", "parameters": {"weight": 0.4}},
            {"model": "ft_c", "parameters": {"weight": 0.7}},
        ],
        "parameters": {"density": 1.0, "normalize": True},
        "dtype": "float32",
    },
    "ties_rescale": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.2}},
            {"model": "ft_b", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "parameters": {"rescale": True},
        "dtype": "float32",
    },
    "breadcrumbs_rescale_normalize": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.6}},
            {"model": "ft_b", "parameters": {"weight": 0.3}},
            {"model": "ft_c", "parameters": {"weight": 0.9}},
        ],
        "parameters": {"density": 0.5, "gamma": 0.02, "rescale": True, "normalize": True, "lambda": 1.2},
        "dtype": "float32",
    },
    "task_arithmetic_out_bf16": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 0.5}},
            {"model": "ft_b", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
}


def layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tiny Llama (the names LlamaForCausalLM uses)."""
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[f"{p}self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        keys[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        keys[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        keys[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        keys[f"{p}input_layernorm.weight"] = (HIDDEN,)
        keys[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    keys["model.norm.weight"] = (HIDDEN,)
    keys["lm_head.weight"] = (VOCAB, HIDDEN)
    return keys


def write_inputs() -> None:
    """θ0 ~ 0.05·N(0, 1) (norms ~ 1 + small), τt ~ 2e-3·N(0, 1) with a few exact zeros, float32."""
    generator = torch.Generator().manual_seed(SEED)
    shapes = layout()
    base = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        base[key] = (1.0 + 0.05 * noise) if len(shape) == 1 else 0.05 * noise
    models = {"base": base}
    for name in ("ft_a", "ft_b", "ft_c"):
        tuned = {}
        for key, shape in shapes.items():
            tau = 2e-3 * torch.randn(shape, generator=generator, dtype=torch.float64)
            tuned[key] = base[key] + tau
        models[name] = tuned
    for name, tensors in models.items():
        folder = HERE / name
        folder.mkdir(parents=True, exist_ok=True)
        exact = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
        if name != "base":  # planted exact zeros of τ (θt = θ0 after rounding)
            zeros = exact["model.norm.weight"]
            zeros[:3] = base["model.norm.weight"][:3].to(torch.float32)
        save_file(exact, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def run_case(name: str, recipe: dict) -> dict:
    import yaml

    path = HERE / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        subprocess.run(
            [str(Path(sys.executable).with_name("mergekit-yaml")), path.name, str(out), "--random-seed", "0",
             "--quiet", "--no-cuda", "-j", "1", "--no-write-model-card"],
            cwd=HERE, check=True, env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                      "PATH": "/usr/bin:/bin", "HOME": scratch},
        )  # fmt: skip
        (HERE / "expected").mkdir(exist_ok=True)
        shutil.copyfile(out / "model.safetensors", HERE / "expected" / f"{name}.safetensors")
    print(f"{name}: ok")
    return {"name": name, "recipe": path.name, "expected": f"expected/{name}.safetensors"}


def main() -> None:
    import mergekit  # noqa: F401  (fail early outside the scratch venv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    write_inputs()
    cases = [run_case(name, recipe) for name, recipe in CASES.items()]
    versions = {"torch": torch.__version__, "mergekit": _version("mergekit"), "python": sys.version.split()[0]}
    text = json.dumps({"versions": versions, "cases": cases}, indent=2) + "\n"
    (HERE / "cases.json").write_text(text)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
