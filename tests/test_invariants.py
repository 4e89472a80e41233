"""Invariants the papers state, checked through the whole engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, load, max_rel_diff, random_state_dicts, write_set

from mergeflow.engine import merge_checkpoints
from mergeflow.methods.cart import centred_task_vectors


@pytest.fixture
def three_tasks(tmp_path: Path):
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=5)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    average = tmp_path / "avg.safetensors"
    merge_checkpoints("weight_average", base_path, paths, average, precision="float64")
    return tmp_path, base_path, paths, load(average), base, tuned


@pytest.mark.parametrize("ratio", [1.0, 0.0])
@pytest.mark.parametrize("scaling", [0.5, 2.0, 7.0])
def test_cart_full_or_zero_rank_is_weight_average(three_tasks, ratio: float, scaling: float) -> None:
    tmp, base_path, paths, average, _, _ = three_tasks
    out = tmp / "cart.safetensors"
    merge_checkpoints("cart", base_path, paths, out, {"rank_ratio": ratio, "scaling": scaling}, precision="float64")
    assert max_rel_diff(load(out), average) <= 1e-12


def test_cart_partial_rank_differs_from_weight_average(three_tasks) -> None:
    tmp, base_path, paths, average, _, _ = three_tasks
    out = tmp / "cart.safetensors"
    merge_checkpoints("cart", base_path, paths, out, {"rank_ratio": 0.3}, precision="float64")
    merged = load(out)
    assert max_rel_diff(merged, average) > 1e-3
    changed = {k for k in merged if not torch.equal(merged[k], average[k])}
    assert changed and all(("attn" in k or "mlp" in k) and "bias" not in k for k in changed)


def test_cart_with_two_tasks_is_weight_average(tmp_path: Path) -> None:
    """τ̄2 = −τ̄1, so SVD_k(τ̄1) + SVD_k(τ̄2) = 0 for every k."""
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=2, seed=6)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    merge_checkpoints("weight_average", base_path, paths, tmp_path / "a.safetensors", precision="float64")
    merge_checkpoints("cart", base_path, paths, tmp_path / "c.safetensors", {"rank_ratio": 0.2}, precision="float64")
    assert max_rel_diff(load(tmp_path / "c.safetensors"), load(tmp_path / "a.safetensors")) <= 1e-12


def test_task_arithmetic_with_one_over_t_is_weight_average(three_tasks) -> None:
    tmp, base_path, paths, average, _, _ = three_tasks
    out = tmp / "ta.safetensors"
    merge_checkpoints("task_arithmetic", base_path, paths, out, {"scaling": 1 / 3}, precision="float64")
    assert max_rel_diff(load(out), average) <= 1e-12


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"scaling": 1.0}),
        ("cart", {}),
        ("weight_average", {}),
        ("ties", {"density": 1.0, "merge": "sum"}),
    ],
)
def test_one_task_gives_the_fine_tune_back(tmp_path: Path, method: str, params: dict) -> None:
    base, tuned = random_state_dicts(LAYOUTS["hf_bert"](), tasks=1, seed=7)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    out = tmp_path / "out.safetensors"
    merge_checkpoints(method, base_path, paths, out, params, precision="float64")
    assert max_rel_diff(load(out), tuned[0]) <= 1e-12


def test_centred_vectors_sum_to_zero() -> None:
    tuned = [torch.randn(6, 4, dtype=torch.float64) for _ in range(5)]
    average, centred = centred_task_vectors(tuned)
    torch.testing.assert_close(centred.sum(0), torch.zeros(6, 4, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(average, torch.stack(tuned).mean(0))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("cart", {}),
        ("ties", {}),
        ("tsv", {}),
        ("iso_cts", {}),
        ("consensus", {"mask_lambda": (0.2, 0.4, 0.6), "min_tasks": 1}),
        ("cart_indexing", {}),
    ],
)
def test_order_of_fine_tunes_does_not_change_the_result(tmp_path: Path, method: str, params: dict) -> None:
    """Bit-for-bit, in float32: tasks are merged in a canonical (content-hash) order."""
    base, tuned = random_state_dicts(LAYOUTS["open_clip_wide"](), tasks=3, seed=8, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    perm = [2, 0, 1]
    permuted_params = dict(params)
    if "mask_lambda" in params:
        permuted_params["mask_lambda"] = tuple(params["mask_lambda"][i] for i in perm)
    suffix = "" if method == "cart_indexing" else ".safetensors"
    first = merge_checkpoints(method, base_path, paths, tmp_path / f"a{suffix}", params)
    second = merge_checkpoints(method, base_path, [paths[i] for i in perm], tmp_path / f"b{suffix}", permuted_params)
    if method == "cart_indexing":  # per-task files follow the user's order: compare task by task
        pairs = [(first.outputs[perm[j]], second.outputs[j]) for j in range(3)]
    else:
        pairs = [(first.outputs[0], second.outputs[0])]
    for a, b in pairs:
        got, want = load(a), load(b)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_cart_sweep_reuses_factors_and_matches_single_merges(tmp_path: Path) -> None:
    from mergeflow.engine import open_checkpoint_set, stream_merge
    from mergeflow.methods import parse_params

    base, tuned = random_state_dicts(LAYOUTS["open_clip_wide"](), tasks=3, seed=9)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    grid = [parse_params("cart", {"rank_ratio": r, "scaling": s}) for r in (0.05, 0.2, 0.5, 1.0) for s in (0.5, 2.0)]

    class Collect:
        def __init__(self) -> None:
            self.tensors: dict[str, torch.Tensor] = {}

        def write(self, key: str, tensor: torch.Tensor) -> None:
            self.tensors[key] = tensor.clone()

        def commit(self) -> None: ...

        def abort(self) -> None: ...

    sinks = [[Collect()] for _ in grid]
    checkpoints = open_checkpoint_set(base_path, paths)
    try:
        stream_merge(checkpoints, "cart", grid, sinks, device=torch.device("cpu"), dtype=torch.float64)
    finally:
        checkpoints.close()
    for params, (sink,) in zip(grid, sinks, strict=True):
        single = tmp_path / f"{params.rank_ratio}-{params.scaling}.safetensors"
        merge_checkpoints("cart", base_path, paths, single, params, precision="float64")
        assert max_rel_diff(sink.tensors, load(single)) <= 1e-10


def test_duplicate_fine_tunes_keep_order_independence(tmp_path: Path) -> None:
    """Identical files tie on the quick identity; the full hash breaks the tie (or proves equality)."""
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=10, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, [tuned[0], tuned[1], tuned[0], tuned[2]])
    first = merge_checkpoints("ties", base_path, paths, tmp_path / "a.safetensors")
    second = merge_checkpoints("ties", base_path, paths[::-1], tmp_path / "b.safetensors")
    got, want = load(first.outputs[0]), load(second.outputs[0])
    assert all(torch.equal(got[k], want[k]) for k in want)
