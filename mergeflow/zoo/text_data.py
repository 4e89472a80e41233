"""Real text-classification tasks built from Debian packages (no network needed).

| task | package | input -> label |
|---|---|---|
| ``wordnet`` | wordnet-base | a noun gloss -> its lexicographer file (26 supersenses) |
| ``fortune_topic`` | fortunes | a quip -> one of ten topic files |
| ``language`` | fortunes, fortunes-de, fortunes-es, fortunes-it | a quip -> its language |
| ``emoji`` | unicode-data | an emoji's name -> its Unicode group (skin-tone variants dropped) |

Splits are drawn with a fixed seed and written as manifests whose sha256 identifies the data.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError

WORDNET = Path("/usr/share/wordnet/data.noun")
FORTUNES = Path("/usr/share/games/fortunes")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")

# WordNet's noun lexicographer files, by id (lexnames 03-28); shown as readable labels
NOUN_SUPERSENSES = {
    3: "top concept", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive",
    17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity",
    24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}  # fmt: skip
FORTUNE_TOPICS = (
    "art",
    "computers",
    "education",
    "food",
    "law",
    "love",
    "politics",
    "science",
    "sports",
    "songs-poems",
)
LANGUAGES = {"english": None, "german": "de", "spanish": "es", "italian": "it"}
MAX_CHARS = 300


class MissingDataError(MergeflowError):
    """A Debian data package is not installed."""


@dataclass(frozen=True)
class TextTask:
    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    templates: tuple[str, ...]  # label prompts for the zero-shot head; {label} is filled in
    source: str


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise MissingDataError(f"{path} not found: install it with `apt-get install {package}` (Debian/Ubuntu)")
    return path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


def read_fortunes(path: Path) -> list[str]:
    """Records of a fortune file (separated by lines holding only '%'), whitespace-normalised."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    return [t for t in (_clean(r) for r in re.split(r"^%\s*$", raw, flags=re.MULTILINE)) if len(t) >= 20]


def wordnet_supersense(path: Path = WORDNET) -> TextTask:
    texts, labels = [], []
    ids = sorted(NOUN_SUPERSENSES)
    for line in _need(path, "wordnet-base").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # license header
        fields = line.split(" ", 3)
        lex = int(fields[1])
        gloss = _clean(line.split(" | ", 1)[1].split(";")[0])
        if lex in NOUN_SUPERSENSES and len(gloss) >= 10:
            texts.append(gloss)
            labels.append(ids.index(lex))
    return TextTask(
        "wordnet", tuple(NOUN_SUPERSENSES[i] for i in ids), tuple(texts), tuple(labels),
        ("a definition of a kind of {label}", "this describes a {label}", "a dictionary entry about {label}"),
        "wordnet-base data.noun",
    )  # fmt: skip


def fortune_topic(root: Path = FORTUNES, topics: Sequence[str] = FORTUNE_TOPICS) -> TextTask:
    texts, labels = [], []
    for index, topic in enumerate(topics):
        for text in read_fortunes(_need(root / topic, "fortunes")):
            texts.append(text)
            labels.append(index)
    classes = tuple(t.replace("songs-poems", "songs and poems") for t in topics)
    return TextTask(
        "fortune_topic", classes, tuple(texts), tuple(labels),
        ("a quote about {label}", "a joke about {label}", "a text about {label}"),
        "fortunes: " + ", ".join(topics),
    )  # fmt: skip


def language_id(root: Path = FORTUNES) -> TextTask:
    texts, labels = [], []
    for index, folder in enumerate(LANGUAGES.values()):
        if folder is None:
            files = [_need(root / t, "fortunes") for t in FORTUNE_TOPICS]
        else:
            directory = _need(root / folder, f"fortunes-{folder}")
            files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8", ".txt"))
            files = [p.with_name(p.name + ".u8") if p.with_name(p.name + ".u8").exists() else p for p in files]
        for path in files:
            for text in read_fortunes(path):
                texts.append(text)
                labels.append(index)
    return TextTask(
        "language", tuple(LANGUAGES), tuple(texts), tuple(labels),
        ("a text written in {label}", "a sentence in the {label} language", "{label}"),
        "fortunes, fortunes-de, fortunes-es, fortunes-it",
    )  # fmt: skip


def emoji_group(path: Path = EMOJI_TEST) -> TextTask:
    groups: list[str] = []
    texts, labels = [], []
    group = None
    for line in _need(path, "unicode-data").read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            if group != "Component":
                groups.append(group)
        elif "; fully-qualified" in line and group not in (None, "Component"):
            name = re.sub(r"^\S+\s+E\d+\.\d+\s+", "", line.split("#", 1)[1].strip())
            if "skin tone" not in name:
                texts.append(name)
                labels.append(groups.index(group))
    classes = tuple(g.lower().replace("&", "and") for g in groups)
    return TextTask(
        "emoji", classes, tuple(texts), tuple(labels),
        ("an emoji of {label}", "a picture in the category {label}", "{label}"),
        "unicode-data emoji-test.txt",
    )  # fmt: skip


SOURCE_FILES: dict[str, Callable[[], list[Path]]] = {
    "wordnet": lambda: [WORDNET],
    "fortune_topic": lambda: [FORTUNES / t for t in FORTUNE_TOPICS],
    "language": lambda: (
        [FORTUNES / t for t in FORTUNE_TOPICS]
        + sorted(
            p for d in ("de", "es", "it") if (FORTUNES / d).is_dir() for p in (FORTUNES / d).iterdir() if p.is_file()
        )
    ),
    "emoji": lambda: [EMOJI_TEST],
}


def source_hashes(tasks: Sequence[str]) -> dict[str, str]:
    """sha256 of every Debian file the tasks are built from (content, not paths, identifies the data)."""
    from mergeflow.hashing import sha256_file_cached

    return {str(p): sha256_file_cached(p) for name in tasks for p in SOURCE_FILES[name]() if p.exists()}


TASK_BUILDERS: dict[str, Callable[[], TextTask]] = {
    "wordnet": wordnet_supersense,
    "fortune_topic": fortune_topic,
    "language": language_id,
    "emoji": emoji_group,
}


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: tuple[int, ...]


def make_splits(task: TextTask, sizes: dict[str, int], seed: int) -> dict[str, Split]:
    """Disjoint random splits (e.g. train/validation/test) of at most ``sizes[name]`` examples each."""
    order = list(range(len(task.texts)))
    random.Random(f"{task.name}:{seed}").shuffle(order)
    splits, start = {}, 0
    for name, size in sizes.items():
        chosen = order[start : start + size]
        start += len(chosen)
        splits[name] = Split(tuple(task.texts[i] for i in chosen), tuple(task.labels[i] for i in chosen))
    return splits


def manifest(task: TextTask, splits: dict[str, Split], seed: int) -> dict:
    """JSON-able description of a task's data, identified by the sha256 of its canonical form."""
    body = {
        "task": task.name,
        "classes": list(task.classes),
        "templates": list(task.templates),
        "source": task.source,
        "seed": seed,
        "splits": {name: {"texts": list(s.texts), "labels": list(s.labels)} for name, s in splits.items()},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {**body, "sha256": digest}
