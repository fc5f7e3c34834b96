"""Argument types and argument groups the ``crossget`` commands share, and the records they
write beside results (the command line, the parsed arguments)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence

import torch

TOWER_KINDS = ("vision", "text")


# --------------------------------------------------------------------------- argument types
def comma_list(convert: Callable[[str], object], what: str) -> Callable[[str], list]:
    """``"a,b"`` -> ``[convert("a"), convert("b")]``."""
    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [convert(s) for s in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}: {e}") from None

    return parse


def int_range(s: str) -> tuple[int, int]:
    """'2-3' -> (2, 3); a single integer n -> (n, n)."""
    try:
        low, _, high = s.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX integers such as 2-3, got {s!r}") from None


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError(f"{v} is negative")
    return v


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}")
        return v

    return parse


def ratio(s: str) -> float:
    v = float(s)
    if not 0 < v <= 1:
        raise ValueError(f"{v:g} is not in (0, 1]")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0 (learning rates): ``-1``, ``0``, ``nan`` and ``inf`` are refused."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return v


def unit_float(s: str) -> float:
    """A number in [0, 1] (loss weights); ``nan`` is refused."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    return v


def torch_device(s: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(s)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not a torch device") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: MPS is not available on this machine")
    return s


def choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
        return s

    return convert


# --------------------------------------------------------------------------- argument groups
def device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device, e.g. cuda (default cpu)")


def budget_arguments(p: argparse.ArgumentParser, keep: bool = False) -> None:
    """``--r`` / ``--flops`` (and ``--keep`` for multimodal LLMs), at most one of them."""
    budget = p.add_mutually_exclusive_group() if keep else p
    if keep:
        budget.add_argument("--keep", type=int_at_least(1), default=None, help="visual tokens per image for the LM")
    budget.add_argument("--r", type=non_negative_int, default=None,
                        help="tokens merged per vision layer" if keep else "tokens removed per layer")
    budget.add_argument("--flops", type=ratio, default=None,
                        help="target prefill FLOPs ratio, e.g. 0.5" if keep else "target GFLOPs ratio, e.g. 0.58")


def need_budget(args: argparse.Namespace) -> None:
    if args.method != "none" and args.r is None and args.flops is None and getattr(args, "keep", None) is None:
        raise ValueError("give --r or --flops for a reducing method")


# --------------------------------------------------------------------------- records
def command_line() -> str:
    """The command as typed (shell-quoted), for the records next to results."""
    return "crossget " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def vars_meta(args: argparse.Namespace) -> dict:
    """The parsed arguments, for the ``meta`` of a result file."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def save_training_log(args: argparse.Namespace, log: dict) -> None:
    """``out/training.json`` with the command and thread count the training function cannot know."""
    log["command"] = command_line()
    log["threads"] = args.threads
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(log, f, indent=2)


def print_file(path: str | os.PathLike) -> None:
    with open(path) as f:
        print(f.read())
