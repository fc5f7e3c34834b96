"""``crossget lmms-eval ...``: lmms-eval's own command with ``--model crossget`` registered."""

from __future__ import annotations

import argparse
import sys


def lmms_eval_arguments(p: argparse.ArgumentParser) -> None:
    # every argument is lmms-eval's: no option of ours, so '--model', '--tasks', '-h' reach it
    p.prefix_chars = "+"
    p.add_argument("lmms_args", nargs=argparse.REMAINDER,
                   help="lmms-eval's arguments, e.g. --model crossget --model_args pretrained=DIR,method=tome,keep=64 "
                        "--tasks mme --batch_size 8")


def lmms_eval(args: argparse.Namespace) -> int:
    """Run lmms-eval's command line (``lmms-eval ...``, its own argument parsing) with crossget's
    model registered as ``--model crossget`` (model_args: docs/lmms-eval.md). Needs the extra
    crossget[lmms]."""
    from crossget.tools.lmms_eval import register

    try:
        register()
    except ImportError as e:
        args._parser.error(str(e))  # exits 2
    from lmms_eval.cli.dispatch import main as lmms_main

    argv = sys.argv
    sys.argv = ["lmms-eval", *args.lmms_args]
    try:
        lmms_main()
    finally:
        sys.argv = argv
    return 0
