"""Grid bases: every point A + λ·D equals a direct merge at that point, for every method
(float64 checkpoints, so that the comparison is not blurred by float32 SVD round-off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeflow.engine import merge_checkpoints
from mergeflow.grid import build_grid_basis, point_states, scaling_groups
from mergeflow.methods import get_method
from mergeflow.zoo.selection import grid_points
from tests.helpers import LAYOUTS, load, max_rel_diff, random_state_dicts, write_set

F64 = "float64"

GRIDS = {
    "weight_average": {},
    "task_arithmetic": {"scaling": [0.05, 0.3, 1.0, 3.0]},
    "ties": {"scaling": [0.5, 1.5], "density": [0.2, 0.5]},
    "consensus": {"scaling": [0.7, 1.3]},
    "cart": {"scaling": [0.5, 2.0, 3.0], "rank_ratio": [0.0, 0.1, 0.25, 0.5, 1.0]},
    "cart_indexing": {"scaling": [1.0, 2.0], "rank_ratio": [0.1, 0.5]},
    "tsv": {"scaling": [0.5, 1.0]},
    "iso_c": {"scaling": [0.5, 1.5]},
    "iso_cts": {"scaling": [1.0, 1.5]},
    "magmax": {"scaling": [0.5, 1.0]},
    "dare": {"scaling": [0.3, 1.0], "drop_rate": [0.2, 0.6], "combine": ["ta", "ties"]},
    "breadcrumbs": {"scaling": [0.4, 1.0], "density": [0.3, 0.6], "variant": ["official", "mergekit"]},
    "pcb": {"scaling": [0.8, 1.2], "variant": ["reference", "normalized_sum"]},
    "lines": {"beta": [0.2, 0.9], "base": ["ta", "ties"]},
    "svc": {"alpha": [0.1, 0.5]},
    "wudi": {"steps": [0, 3], "lr": [1e-3]},
    "tsv_c": {"scaling": [1.0, 1.5], "sv_reduction": [0.25, 0.5]},
    "tall_masks": {"scaling": [1.0, 0.5], "mask_lambda": [0.2, 0.6]},
    "emr": {"scaling": [1.0, 0.8]},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, list[Path]]:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=3, dtype=torch.float64)
    return write_set(tmp_path_factory.mktemp("ckpt"), base, tuned)


@pytest.mark.parametrize("method", sorted(GRIDS))
def test_every_grid_point_matches_a_direct_merge(method: str, checkpoints, tmp_path: Path) -> None:
    theta0, models = checkpoints
    points = grid_points({}, GRIDS[method])
    basis = build_grid_basis(method, theta0, models, points, tmp_path / "basis", device="cpu", precision=F64)
    groups = scaling_groups(method, points)
    assert sum(max(1, len(g["scalings"])) for g in groups) == len(points)
    for index, group in enumerate(basis["groups"]):
        for scaling in group["scalings"] or [None]:
            params = {**group["params"], **({} if scaling is None else {"scaling": scaling})}
            name = f"{index}-{scaling}" + ("" if get_method(method).per_task_outputs else ".safetensors")
            direct = merge_checkpoints(method, theta0, models, tmp_path / name, params, device="cpu", precision=F64)
            states = point_states(basis, index, scaling)
            assert len(states) == len(direct.outputs)
            for state, path in zip(states, direct.outputs, strict=True):
                assert max_rel_diff(state, load(path)) < 1e-12, (method, params)


def test_cart_grid_shares_its_factorization(checkpoints, tmp_path: Path) -> None:
    """All ranks of a CART sweep come from one truncated SVD per task and matrix."""
    from mergeflow import linalg

    theta0, models = checkpoints
    calls = []
    original = linalg.top_svd

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    import mergeflow.methods.cart as cart

    cart.top_svd = counting
    try:
        points = grid_points({}, {"scaling": [1.0, 2.0, 3.0], "rank_ratio": [0.1, 0.25, 0.5]})
        build_grid_basis("cart", theta0, models, points, tmp_path / "basis", device="cpu")
    finally:
        cart.top_svd = original
    matrices = 2 * 4  # two blocks, four attention/MLP matrices each
    assert len(calls) == matrices * len(models)  # not × 9 points, not × 3 ranks


def test_anchor_is_shared_and_directions_are_sparse(checkpoints, tmp_path: Path) -> None:
    theta0, models = checkpoints
    points = grid_points({}, {"scaling": [1.0], "rank_ratio": [0.1, 0.5]})
    basis = build_grid_basis("cart", theta0, models, points, tmp_path / "basis", device="cpu")
    for group in basis["groups"]:
        stored = load(Path(group["files"][0]))
        assert not [k for k in stored if k.startswith("anchor::")]  # θ_avg is common to every rank
        directions = {k.split("::", 1)[1] for k in stored}
        assert directions and all(("attn" in k or "mlp" in k) and "bias" not in k for k in directions)


# Methods whose grid basis comes from the same ``affine`` call as their direct merge (no shared work
# across settings): their grid points must equal direct merges bit for bit, in every checkpoint dtype.
ONE_CALL = {k: v for k, v in GRIDS.items() if k not in ("cart", "cart_indexing")} | {
    "cart": {"scaling": [0.5, 3.0], "rank_ratio": [0.25]},  # one rank: nothing shared across settings
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", sorted(ONE_CALL))
def test_grid_points_are_direct_merges_bit_for_bit(method: str, dtype: torch.dtype, tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=4, dtype=dtype)
    theta0, models = write_set(tmp_path / "in", base, tuned)
    points = grid_points({}, ONE_CALL[method])
    basis = build_grid_basis(method, theta0, models, points, tmp_path / "basis", device="cpu")
    for index, group in enumerate(basis["groups"]):
        for scaling in group["scalings"] or [None]:
            params = {**group["params"], **({} if scaling is None else {"scaling": scaling})}
            out = tmp_path / (f"{index}-{scaling}" + ("" if get_method(method).per_task_outputs else ".safetensors"))
            paths = merge_checkpoints(method, theta0, models, out, params, device="cpu").outputs
            states = point_states(basis, index, scaling)
            assert len(states) == len(paths)
            for state, path in zip(states, paths, strict=True):
                direct = load(path)
                assert state.keys() == direct.keys()
                for key, tensor in direct.items():
                    assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), (method, params, key)


def test_the_registry_holds_affine_methods_to_one_code_path() -> None:
    """A method with ``scaling`` implements affine() only; one without implements merge()."""
    from mergeflow.methods.registry import Merger, MethodParams, register

    class Scaled(MethodParams):
        scaling: float = 1.0

    class MergesDirectly(Merger):
        def merge(self, key, base, tuned):  # type: ignore[override]
            return base

    class NoAffine(Merger):
        pass

    class Unscaled(MethodParams):
        pass

    class AffineOnly(Merger):
        def affine(self, key, base, tuned):  # type: ignore[override]
            return base, None

    for params, cls, says in ((Scaled, MergesDirectly, "affine"), (Scaled, NoAffine, "affine"),
                              (Unscaled, AffineOnly, "merge()")):  # fmt: skip
        with pytest.raises(RuntimeError, match=says):
            register(f"test-{cls.__name__}-{params.__name__}", params, "test")(cls)
