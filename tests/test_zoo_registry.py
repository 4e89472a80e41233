"""The zoo registry and the zoo.json model: every configured zoo is registered, descriptions are
checked when written and read."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from mergeflow.config import ZooSection
from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.zoo.description import read_zoo, write_zoo
from mergeflow.zoo.registry import ZOOS, get_zoo


def test_every_zoo_params_yaml_accepts_is_registered() -> None:
    names = set(typing.get_args(ZooSection.model_fields["name"].annotation))
    assert names == set(ZOOS)
    for name, zoo in ZOOS.items():
        assert zoo.name == name and zoo.config().model_dump()  # settings with defaults
    with pytest.raises(ConfigError, match="unknown zoo 'nope'; known: text-minilm"):
        get_zoo("nope")


def _zoo(tmp_path: Path) -> dict:
    return {"name": "text-minilm", "theta0": {"file": str(tmp_path / "t.safetensors"), "sha256": "a" * 64},
            "config": {}, "tasks": {"x": {"classes": ["a", "b"], "model": "m", "head": "h", "data": "d",
                                          "data_sha256": "b" * 64}}}  # fmt: skip


def test_descriptions_are_checked_both_ways(tmp_path: Path) -> None:
    zoo = _zoo(tmp_path)
    write_zoo(tmp_path, zoo)
    assert read_zoo(tmp_path) == zoo
    with pytest.raises(MergeflowError, match="no zoo here; build it first"):
        read_zoo(tmp_path / "empty")
    bad = dict(zoo, tasks={})
    with pytest.raises(Exception, match="tasks"):
        write_zoo(tmp_path / "bad", bad)
    assert not (tmp_path / "bad" / "zoo.json").exists()
    (tmp_path / "zoo.json").write_text(json.dumps({**zoo, "theta0": {"file": "t"}}))
    with pytest.raises(MergeflowError, match=r"not a zoo description \(theta0.sha256: Field required"):
        read_zoo(tmp_path)
    (tmp_path / "zoo.json").write_text("{")
    with pytest.raises(MergeflowError, match="unreadable zoo description"):
        read_zoo(tmp_path)
