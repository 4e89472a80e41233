"""The identity of the code that computes a result: one rule for every "is this already done?" check.

``code_identity("mergeflow.engine")`` is the sha256 of mergeflow's version and the source bytes of
``mergeflow/engine.py`` together with every project module it imports, directly or through others
(found statically in the source: module-level and function-level ``import`` statements alike,
relative imports included, plus the ``__init__.py`` of every package on the way, which Python runs
on import). Merge fingerprints, grid bases, evaluation and adaptation caches, the Prefect task keys
and the DVC stage dependencies all derive from this one function, so editing any module a result
depends on (``linalg.py`` under a merge, say) or upgrading mergeflow can never serve that result
from an older computation; editing an unrelated module keeps it.

The project's own packages are ``mergeflow``, ``tasks`` and ``flows`` (the latter two exist in a
checkout, beside the library); imports of anything else (torch, prefect, ...) are not followed.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import mergeflow

PROJECT_PACKAGES = ("mergeflow", "tasks", "flows")
ROOT = Path(mergeflow.__file__).resolve().parent.parent


def _module_file(name: str) -> Path | None:
    """The source file of a project module (``a.b`` -> a/b.py or a/b/__init__.py), None if none."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in ``path`` (the source of ``module``) may load."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            names.add(target)
            # ``from pkg import name``: name may be a submodule of pkg
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _closure(modules: tuple[str, ...]) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    pending = [parent for name in modules for parent in _with_parents(name)]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        for imported in _imported_names(path, name):
            pending.extend(parent for parent in _with_parents(imported) if parent not in seen)
    return tuple(sorted(set(seen.values())))


def code_files(*modules: str) -> list[Path]:
    """The project source files that ``modules`` run when imported (themselves included), sorted."""
    missing = [m for m in modules if _module_file(m) is None]
    if missing:
        raise ValueError(f"not a project module: {', '.join(missing)}")
    return list(_closure(tuple(sorted(modules))))


@cache
def _identity(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256(f"mergeflow {mergeflow.__version__}\n".encode())
    for path in code_files(*modules):
        digest.update(f"{path.relative_to(ROOT).as_posix()}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def code_identity(*modules: str) -> str:
    """sha256 of mergeflow's version and the sources of ``modules`` and everything they import.

    Computed once per process (the code a process runs does not change under it).
    """
    return _identity(tuple(sorted(modules)))


def relative_files(paths: Iterable[Path]) -> list[str]:
    """Paths relative to the checkout root, POSIX-style (what DVC stages list as deps)."""
    return [p.relative_to(ROOT).as_posix() for p in paths]


_MARKER = re.compile(r"^(?P<indent>\s*)# code: (?P<modules>[\w., ]+?)(?: \(.*\))?$")
_GENERATED = re.compile(r"^\s*- (?:mergeflow|tasks|flows)/\S+$")


def sync_dvc_deps(text: str) -> str:
    """``dvc.yaml`` text with every ``# code: MODULE[, MODULE]`` marker followed by exactly the
    files of those modules' code identity (the ``- mergeflow/...`` lines after it are replaced)."""
    out: list[str] = []
    lines = iter(text.splitlines())
    pending: str | None = None
    for line in lines:
        if pending is not None and _GENERATED.match(line):
            continue
        pending = None
        out.append(line)
        match = _MARKER.match(line)
        if match:
            modules = [m.strip() for m in match["modules"].split(",") if m.strip()]
            out.extend(f"{match['indent']}- {name}" for name in relative_files(code_files(*modules)))
            pending = line
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m mergeflow.codeid [--check] dvc.yaml``: write (or check) the code deps of DVC stages;
    ``python -m mergeflow.codeid MODULE...``: print a module's files and identity."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        path = Path(args[0])
        current = path.read_text()
        wanted = sync_dvc_deps(current)
        if current == wanted:
            return 0
        if check:
            sys.stderr.write(f"{path}: code deps are out of date; run: python -m mergeflow.codeid {path}\n")
            return 1
        path.write_text(wanted)
        return 0
    for name in relative_files(code_files(*args)):
        sys.stdout.write(f"{name}\n")
    sys.stdout.write(f"identity {code_identity(*args)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
