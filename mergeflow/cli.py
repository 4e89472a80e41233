"""``mergeflow`` command line. Bad input ends with one ``mergeflow: error: ...`` line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.methods import get_method, method_names

log = logging.getLogger("mergeflow")


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are YAML scalars or lists (``0.3``, ``mean``, ``[0.3,0.5]``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MergeflowError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise MergeflowError(f"--set {key}: cannot parse {raw!r} ({exc.__class__.__name__})") from None
        values[key.strip()] = tuple(value) if isinstance(value, list) else value
    return values


def methods_help() -> str:
    lines = ["methods and parameters (--set NAME=VALUE):"]
    for name in method_names():
        spec = get_method(name)
        lines.append(f"  {name}: {spec.summary}")
        lines.extend(f"      {line}" for line in spec.parameter_help())
    return "\n".join(lines)


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergeflow.engine import merge_checkpoints

    result = merge_checkpoints(
        args.method,
        args.pretrained,
        args.finetuned,
        args.output,
        parse_assignments(args.set),
        device=args.device,
        precision=args.precision,
        trust_pickle=args.trust_pickle,
        force=args.force,
    )
    for path in result.outputs:
        sys.stdout.write(f"{path}\n")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from mergeflow.synthetic import write_example_checkpoints

    paths = write_example_checkpoints(args.output, args.model, args.tasks, seed=args.seed)
    sys.stdout.write(f"{paths.pretrained}\n")
    for path in paths.finetuned:
        sys.stdout.write(f"{path}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mergeflow.demo import run_demo

    run_demo(args.params, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Training-free merging of fine-tuned checkpoints.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser(
        "merge",
        help="merge a pretrained checkpoint and fine-tunes into one checkpoint",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--method", required=True, choices=method_names(), metavar="NAME")
    merge.add_argument("--pretrained", required=True, metavar="PATH", help="θ0 (.safetensors, or .pt/.bin)")
    merge.add_argument("--finetuned", required=True, nargs="+", metavar="PATH", help="θ1 ... θT")
    merge.add_argument("--output", required=True, metavar="PATH", help="output file (a directory for cart_indexing)")
    merge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    merge.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    merge.add_argument("--precision", default="float32", choices=("float32", "float64"))
    merge.add_argument("--trust-pickle", action="store_true", help="allow .pt files that unpickle arbitrary objects")
    merge.add_argument("--force", action="store_true", help="recompute even if the output is up to date")
    merge.set_defaults(func=_cmd_merge)

    example = sub.add_parser("example", help="write small synthetic θ0 + fine-tunes (open_clip or BERT shapes)")
    example.add_argument("--output", required=True, metavar="DIR")
    example.add_argument("--model", default="vit-tiny", help="vit-tiny | vit-b-32 | bert-tiny")
    example.add_argument("--tasks", type=int, default=4)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=_cmd_example)

    demo = sub.add_parser("demo", help="the offline demo: example checkpoints merged with every method")
    demo.add_argument("--params", default="params.yaml", metavar="FILE")
    demo.add_argument("--output", default="out/demo", metavar="DIR")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except MergeflowError as exc:
        sys.stderr.write(f"mergeflow: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
