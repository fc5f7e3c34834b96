"""Commands on BLIP models: ``train-blip`` and the ``eval`` tasks ``itm-retrieval``, ``caption``,
``vqa``, ``nlvr2`` (official file formats, one method config against the unreduced GFLOPs)."""

from __future__ import annotations

import argparse

import torch

from crossget.tools.cli.options import (
    TOWER_KINDS,
    budget_arguments,
    choice,
    comma_list,
    device_argument,
    int_at_least,
    need_budget,
    positive_float,
    save_training_log,
)
from crossget.tools.eval.blip_common import summary_line
from crossget.tools.eval.caption import CAPTION, GenerationSettings
from crossget.tools.eval.itm_retrieval import ITMRetrievalTask
from crossget.tools.eval.nlvr2 import NLVR2
from crossget.tools.eval.runner import BlipTask, run_task
from crossget.tools.eval.vqa import VQATask
from crossget.tools.train.jobs import train_blip_on


def train_blip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("caption", "vqa"), required=True)
    p.add_argument("--data", required=True, help="caption: shapes Karpathy JSON (train split); vqa: VQAv2 questions.json "
                   "(crossget data-qa; annotations.json beside it)")
    p.add_argument("--images", default=None, help="vqa: image folder (default: the questions' folder)")
    p.add_argument("--image-pattern", default=None, help="vqa: image file name from image_id (default shapes_{image_id:06d}.png)")
    p.add_argument("--clip", default=None, help="CLIP whose vision tower starts BLIP's (default: the shipped model)")
    p.add_argument("--out", required=True, help="where the model, processor and training.json are saved")
    p.add_argument("--steps", type=int_at_least(1), default=550)
    p.add_argument("--batch", type=int_at_least(1), default=32)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="text side; the vision tower gets 0.2x (default 1e-3)")
    p.add_argument("--text-layers", type=int_at_least(1), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the step that passes this")


def train_blip(args: argparse.Namespace) -> int:
    """Train a small BLIP captioner or VQA model on the shapes data, its vision tower from the shipped CLIP."""


    torch.set_num_threads(args.threads)
    _, log = train_blip_on(args.task, args.data, args.out, images=args.images, image_pattern=args.image_pattern,
                           clip=args.clip, text_layers=args.text_layers, steps=args.steps, batch_size=args.batch,
                           lr=args.lr, seed=args.seed, max_minutes=args.max_minutes)
    save_training_log(args, log)
    print(f"saved the model to {args.out} after {log['train_seconds'] / 60:.1f} min "
          f"({log['seconds_per_step']:.2f} s/step), last loss {log['loss'][-1]:.3f}")
    return 0


def eval_arguments(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", required=True, help="local BLIP model folder (save_pretrained layout, with its processor)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N items of the data file")
    p.add_argument("--method", choices=("none", "tome", "crossget"), default="none")
    budget_arguments(p)
    p.add_argument("--towers", type=comma_list(choice(TOWER_KINDS), "towers"), default=None,
                   help="towers to reduce, e.g. vision,text (default vision)")
    p.add_argument("--batch", type=int_at_least(1), default=16)
    p.add_argument("--threads", type=int_at_least(1), default=2)
    device_argument(p)
    p.add_argument("--json", default=None, help="write the result JSON here")


def _evaluate(args: argparse.Namespace, task: BlipTask, **options) -> int:
    need_budget(args)
    torch.set_num_threads(args.threads)
    result = run_task(task, args.model, args.data, image_root=args.images, limit=args.limit, method=args.method,
                      r=args.r, flops=args.flops, towers=args.towers, json_path=args.json, device=args.device,
                      batch_size=args.batch, **options)
    print(summary_line(result, [*task.result_keys, "gflops", "gflops_ratio"]))
    if args.json:
        print(f"wrote {args.json}" + (f" and {result['results_file']}" if result.get("results_file") else ""))
    return 0


def eval_itm_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "Karpathy-format annotation JSON (dataset_flickr30k.json, dataset_coco.json)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--k", type=int_at_least(1), default=128, help="ITM re-ranks the ITC top k (BLIP: 128 Flickr, 256 COCO)")
    p.add_argument("--pair-batch", type=int_at_least(1), default=128, help="ITM pairs per forward")
    p.add_argument("--first-token", choices=("enc", "cls"), default="enc", help="first token of the ITM text")


def eval_itm_retrieval(args: argparse.Namespace) -> int:
    """BLIP retrieval: ITC ranking, ITM re-ranking of the top k, Recall@1/5/10 both ways, GFLOPs, images/s."""
    return _evaluate(args, ITMRetrievalTask(args.split), k=args.k, pair_batch=args.pair_batch,
                     first_token=args.first_token)


def eval_caption_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "COCO-caption annotation JSON (images + annotations)")
    p.add_argument("--prompt", default="a picture of ", help="decoder prompt, cut from the captions")
    p.add_argument("--num-beams", type=int_at_least(1), default=3)
    p.add_argument("--max-length", type=int_at_least(2), default=20)
    p.add_argument("--min-length", type=int_at_least(0), default=5)
    p.add_argument("--tokenizer", choices=("ptb", "basic"), default="ptb",
                   help="caption tokenizer for scoring: ptb (pycocoevalcap, java) or basic (Python)")


def eval_caption(args: argparse.Namespace) -> int:
    """BLIP captioning: generate, BLEU-4 and CIDEr (pycocoevalcap), GFLOPs, images/s; COCO results JSON."""
    settings = GenerationSettings(args.prompt, args.num_beams, args.max_length, min(args.min_length, args.max_length))
    return _evaluate(args, CAPTION, settings=settings, tokenizer=args.tokenizer)


def eval_vqa_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "VQAv2 question JSON")
    p.add_argument("--annotations", default=None, help="VQAv2 annotation JSON (none: answers only, e.g. test-dev)")
    p.add_argument("--image-pattern", default="COCO_{data_subtype}_{image_id:012d}.jpg",
                   help="image file name from image_id and data_subtype")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=10)
    p.add_argument("--num-beams", type=int_at_least(1), default=1)


def eval_vqa(args: argparse.Namespace) -> int:
    """BLIP VQA: generate answers, official VQA accuracy, GFLOPs, questions/s; official results JSON."""
    return _evaluate(args, VQATask(args.annotations, args.image_pattern), max_new_tokens=args.max_new_tokens,
                     num_beams=args.num_beams)


def eval_nlvr2_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "NLVR2 JSON-lines file (dev.json, test1.json)")
    p.add_argument("--combine", choices=("mean", "min", "max"), default="mean",
                   help="how the two images' ITM match probabilities combine")
    p.add_argument("--threshold", type=float, default=0.5, help="True when the combined probability reaches this")


def eval_nlvr2(args: argparse.Namespace) -> int:
    """NLVR2 with a BLIP ITM model (zero-shot proxy: ITM against each image), accuracy, GFLOPs, examples/s."""
    return _evaluate(args, NLVR2, combine=args.combine, threshold=args.threshold)
