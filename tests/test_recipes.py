"""Recipe files (`mergeflow merge --config`): parity with mergekit 0.1.5's own `mergekit-yaml` on the
recipes in tests/parity/recipes/ (made by tests/parity/generate_recipes.py), validation errors, and
the dtype policy of `mergeflow merge` (compute dtype, --out-dtype, --cast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow import cli
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import ConfigError
from mergeflow.methods import parse_params
from mergeflow.recipe import read_recipe

RECIPES = Path(__file__).parent / "parity" / "recipes"
CASES = json.loads((RECIPES / "cases.json").read_text())["cases"]
# float32 round-off: |ours − mergekit's| ≤ 5e-7 · max |mergekit's| per key (about 4 float32 ulps);
# for a bfloat16 output, at most one bfloat16 ulp (2⁻⁷ relative) where a sum rounds the other way.
FLOAT32_TOLERANCE = 5e-7


def _merge(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["-q", "merge", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_recipe_matches_mergekit(tmp_path: Path, case: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged.safetensors"
    code, err = _merge(["--config", str(RECIPES / case["recipe"]), "--output", str(out)], capsys)
    assert code == 0, err
    got, want = load_file(out), load_file(RECIPES / case["expected"])
    assert set(got) == set(want)
    for key, expected in want.items():
        assert got[key].dtype == expected.dtype, key
        diff = float((got[key].double() - expected.double()).abs().max())
        scale = float(expected.double().abs().max())
        tolerance = 2**-7 if expected.dtype == torch.bfloat16 else FLOAT32_TOLERANCE
        assert diff <= tolerance * scale, (key, diff / scale)
    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    assert meta["mergeflow.recipe"] == (RECIPES / case["recipe"]).read_text()
    assert json.loads(meta["mergeflow.dtype"])["cast"] is True  # every parity recipe gives dtype: float32


def test_parity_recipes_exercise_the_mergekit_rules() -> None:
    """The recipes map onto mergekit's rule (per-model density and weight) and normalize matters."""
    ties = read_recipe(RECIPES / "ties_density_weight.yaml")
    assert ties.params["density"] == (0.3, 0.5, 0.7) and ties.params["weights"] == (1.0, 0.6, 0.8)
    assert ties.method == "ties" and ties.params["variant"] == "mergekit"
    with_norm = load_file(RECIPES / "expected" / "linear_normalize.safetensors")
    without = load_file(RECIPES / "expected" / "linear_no_normalize.safetensors")
    assert not torch.equal(with_norm["lm_head.weight"], without["lm_head.weight"])


def test_paper_ties_is_not_mergekit_ties(tmp_path: Path) -> None:
    """The same density through mergeflow's default TIES gives another result than the mergekit recipe."""
    recipe = read_recipe(RECIPES / "ties_no_normalize.yaml")
    out = tmp_path / "paper.safetensors"
    paper = {"density": 0.4, "merge": "sum", "scaling": 1.5}
    merge_checkpoints("ties", recipe.pretrained, recipe.finetuned, out, paper, device="cpu")
    want = load_file(RECIPES / "expected" / "ties_no_normalize.safetensors")
    got = load_file(out)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) > 1e-4


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    """The parity checkpoints copied next to the test's recipes (recipe paths are relative to the recipe)."""
    for name in ("base", "ft_a", "ft_b", "ft_c"):
        shutil.copytree(RECIPES / name, tmp_path / name)
    return tmp_path


TIES = {"merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "ft_b", "parameters": {"weight": 1.0, "density": 0.5}}]}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"surprise": 1}, "surprise", "unknown key"),
        ({"slices": []}, "slices", "slices (layer ranges per model) are not supported"),
        ({"tokenizer": {"source": "union"}}, "tokenizer", "tokenizer merging is not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source", "only `base`"),
        ({"merge_method": "della"}, "merge_method", "mergekit's della is not implemented by mergeflow"),
        ({"merge_method": "dare_ties", "parameters": {"rescale": 1}}, "parameters.rescale", "expected true or false"),
        ({"merge_method": "nope"}, "merge_method", "unknown merge method 'nope'"),
        ({"base_model": None}, "base_model", "required by ties"),
        ({"dtype": "float8"}, "dtype", "unknown dtype 'float8'"),
        ({"parameters": {"lambda": [0.5, 1.0]}}, "parameters.lambda", "gradients"),
        ({"parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}}, "parameters.weight", "filtered values"),
        ({"parameters": {"lambda": float("nan")}}, "parameters.lambda", "not a finite number"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon", "unknown parameter for ties"),
        ({"parameters": {"rescale": "yes"}}, "parameters.rescale", "expected true or false"),
        ({"models": [{"model": "ft_a", "parameters": {"density": 0.5}}]}, "models[0].parameters.weight", "required"),
        ({"models": [{"model": "ft_a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "models[0].parameters.gamma",
         "unknown per-model parameter"),
        ({"models": [{"model": "ft_a", "parameters": {"weight": 1, "density": 0}}]}, "models[0] density",
         "must be > 0"),
        ({"models": [{"model": "missing"}]}, "models[0].model", "no such file or directory"),
        ({"models": [{"model": "ft_a+lora"}]}, "models[0].model", "LoRA references"),
        ({"models": [{"model": "base"}]}, "models", "at least one model besides the base_model"),
        ({"merge_method": "cart", "models": ["ft_a"], "parameters": {"rank_ratio": 2}}, "parameters",
         "invalid parameters for cart"),
        ({"merge_method": "cart"}, "models[0].parameters", "cart takes its parameters under the top-level"),
        ({"merge_method": "breadcrumbs", "models": [{"model": "ft_a", "parameters": {"weight": 1, "density": 0.5}},
                                                    {"model": "ft_b", "parameters": {"weight": 1, "density": 0.6}}]},
         "models[*].parameters.density", "differs between models"),
        ({"merge_method": "linear"}, "base_model", "linear has no base model"),
    ],
)  # fmt: skip
def test_bad_recipe_is_one_line_naming_file_and_field(
    models: Path, change: dict, field: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write(models / "recipe.yaml", {**TIES, **change})
    out = models / "out.safetensors"
    code, err = _merge(["--config", str(recipe), "--output", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mergeflow: error: {recipe}: {field}: "), lines[0]
    assert says in lines[0]
    assert not out.exists()


def test_recipe_flags_that_conflict_are_refused(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _write(models / "r.yaml", {**TIES, "out_dtype": "bfloat16"})
    code, err = _merge(["--config", str(recipe), "--output", str(models / "o.safetensors"), "--out-dtype", "float16"],
                       capsys)  # fmt: skip
    assert code == 2 and "--out-dtype float16 contradicts the recipe's dtype (bfloat16)" in err
    code, err = _merge(["--config", str(recipe), "--method", "ties", "--output", str(models / "o.safetensors")], capsys)
    assert code == 2 and "drop --method" in err


def test_mergeflow_method_in_a_recipe_runs_with_its_typed_parameters(models: Path) -> None:
    """`merge_method: cart` with `parameters:`; the base model listed among the models is the base only."""
    recipe = _write(models / "cart.yaml", {
        "merge_method": "cart", "base_model": "base",
        "models": [{"model": "base"}, {"model": "ft_a"}, {"model": "ft_b"}, {"model": "ft_c"}],
        "parameters": {"scaling": 1.5, "rank_ratio": 0.25, "selector": "attn_mlp", "exclude": ["*.down_proj.*"]},
    })  # fmt: skip
    parsed = read_recipe(recipe)
    assert parsed.finetuned == [models / "ft_a", models / "ft_b", models / "ft_c"]
    assert parse_params("cart", parsed.params).exclude == ("*.down_proj.*",)
    out, direct = models / "cart.safetensors", models / "direct.safetensors"
    assert cli.main(["-q", "merge", "--config", str(recipe), "--output", str(out)]) == 0
    params = {"scaling": 1.5, "rank_ratio": 0.25, "selector": "attn_mlp", "exclude": ("*.down_proj.*",)}
    merge_checkpoints("cart", models / "base", [models / f for f in ("ft_a", "ft_b", "ft_c")], direct, params)
    got, want = load_file(out), load_file(direct)
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = load_file(models / "base" / "model.safetensors")
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_per_model_weights_follow_the_models_not_the_listing_order(models: Path) -> None:
    """Weights are given in the user's order; tasks are merged in content order: listing the models the
    other way round, weights with them, gives the same bytes."""
    listed = [{"model": "ft_a", "parameters": {"weight": 0.9}}, {"model": "ft_c", "parameters": {"weight": -0.2}}]
    first = {"merge_method": "task_arithmetic", "base_model": "base", "models": listed}
    second = {**first, "models": first["models"][::-1]}
    outs = []
    for name, data in (("one", first), ("two", second)):
        out = models / f"{name}.safetensors"
        assert (
            cli.main(["-q", "merge", "--config", str(_write(models / f"{name}.yaml", data)), "--output", str(out)]) == 0
        )
        outs.append(load_file(out))
    a, c, base = (load_file(models / n / "model.safetensors") for n in ("ft_a", "ft_c", "base"))
    key = "lm_head.weight"
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    expected = base[key] + (0.9 * (a[key] - base[key]) - 0.2 * (c[key] - base[key]))
    assert torch.allclose(outs[0][key], expected, rtol=0, atol=1e-7)


def test_ties_weights_need_variant_mergekit() -> None:
    with pytest.raises(ConfigError, match="need variant mergekit"):
        parse_params("ties", {"weights": (1.0, 2.0)})
    with pytest.raises(ConfigError, match="set scope tensor"):
        parse_params("ties", {"variant": "mergekit"})


# ------------------------------------------------------------------ dtype policy of `mergeflow merge`
def _pair(tmp_path: Path, tuned_dtype: torch.dtype = torch.float32) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 6, generator=g), "n": torch.arange(3, dtype=torch.int64)}
    tuned = {"w": (base["w"] + 0.1 * torch.randn(4, 6, generator=g)).to(tuned_dtype), "n": base["n"].clone()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def test_mixed_dtypes_are_refused_with_the_key_named_unless_cast(tmp_path: Path, capsys) -> None:
    base, tuned, b, t = _pair(tmp_path, torch.bfloat16)
    out = tmp_path / "out.safetensors"
    argv = ["--method", "task_arithmetic", "--pretrained", str(base), "--finetuned", str(tuned), "--output", str(out),
            "--set", "scaling=0.5"]  # fmt: skip
    code, err = _merge(argv, capsys)
    assert code == 2 and "key 'w' has dtype torch.bfloat16, pretrained has torch.float32" in err and "--cast" in err
    code, err = _merge([*argv, "--cast"], capsys)
    assert code == 0, err
    got = load_file(out)
    assert got["w"].dtype == torch.float32 and torch.equal(got["n"], b["n"])
    assert torch.allclose(got["w"], b["w"] + 0.5 * (t["w"].float() - b["w"]), rtol=0, atol=1e-6)
    with safe_open(out, "pt") as handle:
        assert json.loads(handle.metadata()["mergeflow.dtype"]) == {"compute": "float32", "output": "pretrained",
                                                                    "cast": True}  # fmt: skip


def test_non_float_dtype_mismatch_is_refused_even_with_cast(tmp_path: Path, capsys) -> None:
    base, tuned, _, t = _pair(tmp_path)
    save_file({**t, "n": t["n"].to(torch.int32)}, tuned)
    code, err = _merge(["--method", "weight_average", "--pretrained", str(base), "--finetuned", str(tuned),
                        "--output", str(tmp_path / "o.safetensors"), "--cast"], capsys)  # fmt: skip
    assert code == 2 and "key 'n' has dtype torch.int32" in err


def test_out_dtype_and_compute_dtype_are_applied_and_recorded(tmp_path: Path, capsys) -> None:
    base, tuned, b, t = _pair(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = ["--method", "task_arithmetic", "--pretrained", str(base), "--finetuned", str(tuned), "--output", str(out),
            "--set", "scaling=0.7", "--precision", "float64", "--out-dtype", "bfloat16"]  # fmt: skip
    assert _merge(argv, capsys)[0] == 0
    got = load_file(out)
    expected = (b["w"].double() + 0.7 * (t["w"].double() - b["w"].double())).to(torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], expected)
    assert got["n"].dtype == torch.int64  # non-float keys keep θ0's dtype
    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["mergeflow.dtype"]) == {"compute": "float64", "output": "bfloat16", "cast": False}
    # another output dtype is another result: not skipped as up to date
    assert _merge([*argv[:-1], "float16"], capsys)[0] == 0
    assert load_file(out)["w"].dtype == torch.float16


def test_recipe_to_a_model_directory_carries_the_recipe_in_its_card(models: Path) -> None:
    recipe = _write(models / "r.yaml", {**TIES, "out_dtype": "bfloat16", "tokenizer_source": "base"})
    out = models / "merged"
    assert cli.main(["-q", "merge", "--config", str(recipe), "--output", str(out), "--format", "hf"]) == 0
    card = (out / "README.md").read_text()
    assert "## Recipe" in card and recipe.read_text().rstrip("\n") in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # θ0's config carried over
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model-00001-of-00001.safetensors").values())


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear_recipe_drops_at_the_density_and_rescales_to_the_l1_norm(models: Path, rescale: bool) -> None:
    """DARE's masks are random, so mergekit's outputs cannot be matched: mergeflow draws them from its
    seeded generator. What the recipe means is checked instead: each entry kept with probability
    density, the survivors scaled to τ's L1 norm (mergekit's rescale, not 1/density), bit-reproducible."""
    data = {"merge_method": "dare_linear", "base_model": "base",
            "models": [{"model": "ft_a", "parameters": {"weight": 1.0, "density": 0.3}}],
            "parameters": {"rescale": rescale}}  # fmt: skip
    recipe = _write(models / "dare.yaml", data)
    outs = [models / "one.safetensors", models / "two.safetensors"]
    for out in outs:
        assert cli.main(["-q", "merge", "--config", str(recipe), "--output", str(out)]) == 0
    got, again = load_file(outs[0]), load_file(outs[1])
    assert all(torch.equal(got[k], again[k]) for k in got)
    base, tuned = load_file(models / "base" / "model.safetensors"), load_file(models / "ft_a" / "model.safetensors")
    key = "model.embed_tokens.weight"  # 1024 entries
    tau, merged = (tuned[key] - base[key]).double(), (got[key] - base[key]).double()
    kept = merged != 0
    assert 0.22 < float(kept.double().mean()) < 0.38
    if rescale:
        assert float(merged.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-4)
        ratio = float(tau.abs().sum() / tau[kept].abs().sum())
        assert torch.allclose(merged[kept], tau[kept] * ratio, rtol=1e-5, atol=3e-8)  # θ0 + τ̃ rounded to float32
    else:
        assert torch.allclose(merged[kept], tau[kept], rtol=1e-5, atol=3e-8)
    with safe_open(outs[0], "pt") as handle:
        params = json.loads(handle.metadata()["mergeflow.params"])
    assert params["variant"] == "mergekit" and params["seed"] == 0 and params["drop_rate"] == [0.7]
