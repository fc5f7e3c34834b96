"""The ``crossget`` command line.

Every subcommand is two small functions, ``<name>_arguments(parser)`` (argparse
options) and ``<name>(args) -> int`` (runs it), registered in :data:`COMMANDS` at
the bottom of this file (``eval`` and ``train`` go there too). Errors a user can fix
(``ValueError``, ``TypeError``, ``OSError``) end the command with ``crossget <name>:
error: ...`` and exit status 2, like argparse's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


# --------------------------------------------------------------------------- argument types
def _comma_list(convert: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [convert(s) for s in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}: {e}") from None

    return parse


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError(f"{v} is negative")
    return v


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}")
        return v

    return parse


def _ratio(s: str) -> float:
    v = float(s)
    if not 0 < v <= 1:
        raise ValueError(f"{v:g} is not in (0, 1]")
    return v


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
        return s

    return convert


REDUCIBLE_METHODS = ("tome", "crossget")
TOWER_KINDS = ("vision", "text")


# --------------------------------------------------------------------------- bench / demo
def _add_run_arguments(p: argparse.ArgumentParser, *, batch: int, rounds: int, out: str | None) -> None:
    p.add_argument("--batch", type=_int_at_least(1), default=batch, help=f"batch size (default {batch})")
    p.add_argument("--threads", type=_int_at_least(1), default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=_int_at_least(1), default=rounds, help=f"timed rounds (default {rounds})")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed rounds first (default 1)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip batch-1 latency timing")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=out, help="output directory for results.json and results.md"
                   + (f" (default {out})" if out else " (default benchmarks/<model>-<tower>)"))


def _benchmark(args: argparse.Namespace, methods, rs, flops, reduce) -> int:
    import torch

    from .bench import build_configs, forward_for, load_model, make_inputs, run_benchmark

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.tower).to(args.device)
    if getattr(args, "attn", None):
        model.set_attn_implementation(args.attn)
    name = os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join("benchmarks", f"{name}-{args.tower}")
    configs = build_configs(methods, rs, flops, reduce)
    meta = {"model": args.model, "tower": args.tower, "reduce": list(reduce) if reduce else None}
    run_benchmark(
        model, make_inputs(model, args.tower, args.batch), configs,
        rounds=args.rounds, warmup=args.warmup, threads=args.threads, forward=forward_for(model, args.tower),
        latency=args.latency, out_dir=out, meta=meta,
    )
    md = os.path.join(out, "results.md")
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {os.path.join(out, 'results.json')}")
    return 0


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip-vit-b16",
                   help="named architecture with random weights (clip-vit-b16, clip-tiny) "
                        "or a local model directory (from_pretrained); default clip-vit-b16")
    p.add_argument("--tower", choices=("vision", "text", "both"), default="vision",
                   help="what runs: image features, text features, or the whole model (default vision)")
    p.add_argument("--reduce", type=_comma_list(_choice(TOWER_KINDS), "towers"), default=None,
                   help="towers to reduce, e.g. vision,text (default: the benchmarked tower; vision for both)")
    p.add_argument("--methods", type=_comma_list(_choice(REDUCIBLE_METHODS), "methods"), default=["tome", "crossget"],
                   help="comma-separated: tome, crossget (default both; the stock model always runs)")
    p.add_argument("--r", type=_comma_list(_non_negative_int, "non-negative integers"), default=[],
                   help="tokens removed per layer; one config per value, e.g. 8,12,16")
    p.add_argument("--flops", type=_comma_list(_ratio, "ratios in (0, 1]"), default=[],
                   help="target FLOPs ratios solved into schedules, e.g. 0.58,0.69")
    p.add_argument("--attn", choices=("sdpa", "eager"), default=None, help="attention implementation")
    _add_run_arguments(p, batch=8, rounds=5, out=None)


def bench(args: argparse.Namespace) -> int:
    """Benchmark merging configs against the stock model."""
    if not args.r and not args.flops:
        raise ValueError("give --r and/or --flops (e.g. --r 8,12,16 or --flops 0.58)")
    reduce = args.reduce
    if reduce is None and args.tower != "both":
        reduce = [args.tower]
    return _benchmark(args, args.methods, args.r, args.flops, reduce)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip-vit-b16", help="named architecture or model directory (default clip-vit-b16)")
    _add_run_arguments(p, batch=8, rounds=3, out="runs/demo")


def demo(args: argparse.Namespace) -> int:
    """A short benchmark: ToMe and CrossGET at r=16 on a random CLIP ViT-B/16 vision tower."""
    args.tower = "vision"
    return _benchmark(args, REDUCIBLE_METHODS, [16], [], ["vision"])


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: tuple[Command, ...] = (
    Command("bench", "benchmark FLOPs, tokens, speed and memory of merging configs", bench_arguments, bench),
    Command("demo", "short benchmark of a random CLIP ViT-B/16 vision tower", demo_arguments, demo),
    # Command("eval", ...), Command("train", ...): added by their modules' authors
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget", description="CrossGET token merging for Hugging Face vision-language transformers."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"crossget {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.run.__doc__ or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._command.run(args) or 0
    except (ValueError, TypeError, OSError) as e:
        args._parser.error(str(e))  # exits 2


if __name__ == "__main__":
    sys.exit(main())
