"""Successive halving on validation folds: folds partition a split, joined folds give the whole-split
scores, each rung keeps the best points of the one before, and the choice is made among points that
saw all of validation (the exhaustive grid's choice whenever its best survives)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from mergeflow.config import SelectionConfig
from mergeflow.zoo.evaluation import combine_parts, part_of, split_part
from mergeflow.zoo.registry import evaluate_checkpoint
from mergeflow.zoo.selection import Halving, normalized, score_grid_points, select_method
from mergeflow.zoo.text_evaluator import TextEvaluator
from mergeflow.zoo.text_zoo import TextZooConfig, build_text_zoo


def test_split_parts_name_folds_and_reject_nonsense() -> None:
    assert split_part("validation") == ("validation", 0, 1)
    assert split_part("validation:3/4") == ("validation", 3, 4)
    assert part_of("validation", 3, 4) == "validation:3/4" and part_of("test", 0, 1) == "test"
    with pytest.raises(ValueError, match=r"fold 4 is not in 0\.\.3"):
        split_part("validation:4/4")
    with pytest.raises(ValueError, match="name:fold/folds"):
        split_part("validation:half")


def test_joined_parts_count_correct_answers_not_mean_accuracies() -> None:
    parts = [{"a": {"accuracy": 1.0, "loss": 0.5, "n": 1}}, {"a": {"accuracy": 0.25, "loss": 1.0, "n": 4}}]
    joined = combine_parts(parts)
    assert joined == {"a": {"accuracy": 2 / 5, "loss": (0.5 + 4.0) / 5, "n": 5}}  # not (1 + 0.25) / 2


def test_halving_schedules_are_checked() -> None:
    assert Halving().rungs == (1, 2, 4)
    for bad in ({"rungs": [1, 2]}, {"rungs": [2, 1, 4]}, {"rungs": [0, 4]}, {"folds": 1, "rungs": [1]}, {"eta": 1}):
        with pytest.raises(ValidationError):
            Halving(**bad)
    assert SelectionConfig(search="halving").schedule() == Halving()
    assert SelectionConfig().schedule() is None  # the exhaustive grid unless asked
    with pytest.raises(ValidationError):
        SelectionConfig(search="random")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("halving") / "zoo"
    cfg = TextZooConfig(tasks=("language", "emoji"), train=32, validation=40, test=16, layers=2, max_length=32)
    build_text_zoo(directory, cfg)
    return directory


def test_the_folds_of_a_split_joined_are_the_whole_split(zoo: Path) -> None:
    theta0 = zoo / "models" / "pretrained.safetensors"
    whole = evaluate_checkpoint(zoo, theta0, "validation")
    folds = [evaluate_checkpoint(zoo, theta0, part_of("validation", f, 4)) for f in range(4)]
    assert [f["language"]["n"] for f in folds] == [10, 10, 10, 10]
    small = TextEvaluator(zoo, batch_size=12)  # a fold of 4 gets batches of 3: the whole split's length spread
    assert [len(labels) for _, labels in small.batches("language", "validation:0/4")] == [3, 3, 3, 1]
    assert [len(labels) for _, labels in small.batches("language", "validation")] == [12, 12, 12, 4]
    joined = combine_parts(folds)
    for task, scores in whole.items():
        assert joined[task]["accuracy"] == scores["accuracy"] and joined[task]["n"] == scores["n"] == 40
        assert joined[task]["loss"] == pytest.approx(scores["loss"], rel=1e-5)


def test_halving_keeps_the_best_of_each_rung_and_chooses_among_full_scores(zoo: Path, tmp_path: Path) -> None:
    scalings = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]
    grid = {"scaling": scalings}
    out = tmp_path / "report"
    individual = {"validation": {"language": 1.0, "emoji": 1.0}}
    halving = Halving(folds=4, rungs=(1, 2, 4), eta=3, min_keep=2, margin=0.0)
    chosen = select_method(zoo, "task_arithmetic", {}, grid, out, individual, halving=halving)
    sweep = chosen["sweep"]
    shares = [p["validation_share"] for p in sweep]
    assert sorted(shares) == [0.25] * 6 + [0.5] * 1 + [1.0] * 2  # 9 points -> 3 -> 2 (min_keep)
    assert chosen["row"]["validation_passes"] == pytest.approx(sum(shares)) and sum(shares) < len(scalings) / 2

    def ranked(split: str, among: list[int]) -> list[int]:
        """Grid indices by score on ``split``, best first, ties in grid order (what a rung keeps)."""
        points = [{"scaling": scalings[i]} for i in among]
        scored, _ = score_grid_points(zoo, "task_arithmetic", points, out, split)  # cached: halving asked the same
        values = [normalized({t: r[t]["accuracy"] for t in r}, individual["validation"]) for _, (r,) in scored]
        return [among[j] for j in sorted(range(len(among)), key=lambda j: -values[j])]

    before = sorted((out / "evaluations").iterdir())
    rung0 = ranked("validation:0/4", list(range(9)))
    went_on = sorted(i for i, s in enumerate(shares) if s >= 0.5)
    assert went_on == sorted(rung0[:3])
    joined_01 = []
    for i in went_on:
        point = [{"scaling": scalings[i]}]
        parts = [score_grid_points(zoo, "task_arithmetic", point, out, f"validation:{f}/4")[0][0][1][0] for f in (0, 1)]
        accuracy = {t: s["accuracy"] for t, s in combine_parts(parts).items()}
        joined_01.append(normalized(accuracy, individual["validation"]))
    order = sorted(range(3), key=lambda j: -joined_01[j])
    assert sorted(i for i, s in enumerate(shares) if s == 1.0) == sorted(went_on[j] for j in order[:2])
    assert sorted((out / "evaluations").iterdir()) == before  # every fold asked again was served from the cache

    # survivors carry their whole-validation scores: those of the exhaustive grid, to the digit
    exhaustive = select_method(zoo, "task_arithmetic", {}, grid, tmp_path / "exhaustive", individual)
    full = {p["params"]["scaling"]: p for p in exhaustive["sweep"]}
    for point in sweep:
        if point["validation_share"] == 1.0:
            assert point["validation"] == full[point["params"]["scaling"]]["validation"]
    complete = [p for p in sweep if p["validation_share"] == 1.0]
    assert chosen["row"]["params"] == max(complete, key=lambda p: p["score"])["params"]
    best = max(exhaustive["sweep"], key=lambda p: p["score"])
    if any(p["params"] == best["params"] for p in complete):  # the exhaustive best survived: the same choice
        assert chosen["row"]["params"] == exhaustive["row"]["params"]
        assert chosen["row"]["test"] == exhaustive["row"]["test"]
    assert math.isclose(sum(1.0 for _ in exhaustive["sweep"]), exhaustive["row"]["validation_passes"])


def test_points_within_the_margin_of_the_leader_go_on(zoo: Path, tmp_path: Path) -> None:
    """A margin wider than any score gap sends every point on: the exhaustive grid, to the digit;
    a zero margin on the same cached folds prunes."""
    grid = {"scaling": [0.1, 0.3, 0.7, 1.0, 1.5, 2.0]}
    individual = {"validation": {"language": 1.0, "emoji": 1.0}}
    out = tmp_path / "report"
    wide = select_method(zoo, "task_arithmetic", {}, grid, out, individual, halving=Halving(margin=200.0))
    assert [p["validation_share"] for p in wide["sweep"]] == [1.0] * 6
    exhaustive = select_method(zoo, "task_arithmetic", {}, grid, tmp_path / "exhaustive", individual)
    assert [p["validation"] for p in wide["sweep"]] == [p["validation"] for p in exhaustive["sweep"]]
    assert wide["row"]["params"] == exhaustive["row"]["params"] and wide["row"]["test"] == exhaustive["row"]["test"]
    narrow = select_method(zoo, "task_arithmetic", {}, grid, out, individual, halving=Halving(margin=0.0))
    assert sorted(p["validation_share"] for p in narrow["sweep"]) == [0.25] * 4 + [1.0] * 2


def test_a_grid_no_larger_than_min_keep_is_scored_whole(zoo: Path, tmp_path: Path) -> None:
    individual = {"validation": {"language": 1.0, "emoji": 1.0}}
    chosen = select_method(zoo, "task_arithmetic", {}, {"scaling": [0.3, 1.0]}, tmp_path / "r", individual,
                           halving=Halving())  # fmt: skip
    assert [p["validation_share"] for p in chosen["sweep"]] == [1.0, 1.0]
