"""Commands on LLaVA models: ``init-llava`` (a tiny one to train on CPU), ``train-llava`` and
the ``eval`` tasks ``llava-vqa``, ``llava-mc``, ``llava-pope``, ``llava-mme`` (LLaVA's own files;
every multimodal-LLM family, one protocol: docs/protocol.md)."""

from __future__ import annotations

import argparse
import json
import os

import torch

from crossget.config import METHODS
from crossget.tools.cli.options import (
    budget_arguments,
    command_line,
    device_argument,
    int_at_least,
    positive_float,
    unit_float,
    vars_meta,
)
from crossget.tools.eval.llava import run_llava_eval
from crossget.tools.eval.llava.data import SHORT_ANSWER
from crossget.tools.llava_small import save_llava_small, write_by_image
from crossget.tools.train.jobs import train_llava_on
from crossget.tools.train.llava import TRAINABLE

LLAVA_TRAINABLE = TRAINABLE  # what train-llava can train (the name older scripts import)


def init_llava_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/llava-small", help="model folder to write (default runs/llava-small)")
    p.add_argument("--qa", default="data/shapes-qa",
                   help="LLaVA conversation JSON, or a folder of */llava_conversations.json (crossget data-qa), "
                        "whose words the tokenizer covers (default data/shapes-qa)")
    p.add_argument("--lm-width", type=int_at_least(1), default=256, help="Llama hidden size (default 256)")
    p.add_argument("--lm-layers", type=int_at_least(1), default=4,
                   help="Llama layers (default 4; FastV prunes after layer 2, so it needs 3 or more)")
    p.add_argument("--lm-heads", type=int_at_least(1), default=4, help="attention heads (default 4)")
    p.add_argument("--lm-intermediate", type=int_at_least(1), default=None, help="MLP size (default 4 x width)")
    p.add_argument("--by-image", default=None, metavar="CONVERSATIONS",
                   help="also write OUT/train_by_image.json: these LLaVA conversations regrouped into one multi-turn "
                        "conversation per image (faster training: one image encoding for all its questions)")
    p.add_argument("--seed", type=int, default=0)


def init_llava(args: argparse.Namespace) -> int:
    """Build a tiny LLaVA-1.5 to train on CPU: the shipped CLIP's vision tower (weights copied), a GELU
    MLP projector and a random small Llama, with a word-level LLaVA processor over the QA words."""
    sizes = dict(lm_width=args.lm_width, lm_layers=args.lm_layers, lm_heads=args.lm_heads,
                 lm_intermediate=args.lm_intermediate, seed=args.seed)
    # every setting spelt out, so the record rebuilds the model whatever the defaults become
    command = f"crossget init-llava --out {args.out} --qa {args.qa} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sizes.items() if v is not None)
    command += f" --by-image {args.by_image}" if args.by_image else ""
    out = save_llava_small(args.out, args.qa, command=command, **sizes)
    print(f"wrote {out} (train it: crossget train-llava --model {out} --method none --trainable projector+lm ...)")
    if args.by_image:
        path, images, questions = write_by_image(args.by_image, out, seed=args.seed)
        print(f"wrote {path}: {images} images, {questions} questions")
    return 0


def train_llava_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local LLaVA folder (LlavaForConditionalGeneration + its processor)")
    p.add_argument("--data", required=True, help="LLaVA instruction-tuning JSON (id, image, conversations)")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--method", choices=("none", "crossget", "tome"), default="crossget",
                   help="visual-token reduction to train with (default crossget; none: the stock model)")
    budget_arguments(p, keep=True)
    p.add_argument("--trainable", choices=LLAVA_TRAINABLE, default="cross",
                   help="cross: the cross tokens; lora: LoRA on the LM's attention (+ cross tokens; needs peft); "
                        "projector+lm: projector and LM, vision tower frozen (default cross)")
    p.add_argument("--steps", type=int_at_least(1), default=1000)
    p.add_argument("--batch", type=int_at_least(1), default=16, help="samples per step and process (default 16)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: 1e-2 cross, 2e-4 lora, 2e-5 projector+lm)")
    p.add_argument("--cross-weight", type=unit_float, default=None, help="w in (1 - w) L_LM + w L_cross (default 0.001)")
    p.add_argument("--max-length", type=int_at_least(1), default=2048, help="tokens per sample, image included (default 2048)")
    p.add_argument("--checkpoint-every", type=int_at_least(1), default=200)
    p.add_argument("--log-every", type=int_at_least(1), default=10)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this much training")
    p.add_argument("--workers", type=int_at_least(0), default=0, help="data loader processes (default 0)")
    p.add_argument("--pad-square", action="store_true", help="pad images to squares first, as LLaVA-1.5 does")
    # no float16: AdamW on fp16 weights without a loss scaler turns untouched rows into NaN
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--out", default="runs/llava", help="checkpoints, trained weights and training.json (default runs/llava)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")


def train_llava(args: argparse.Namespace) -> int:
    """Train a LLaVA-1.5 model on LLaVA's conversation JSON through accelerate (resumable, safetensors):
    cross tokens, LoRA adapters or projector + LM, with the visual tokens reduced as given."""


    torch.set_num_threads(args.threads)
    _, log = train_llava_on(
        args.model, args.data, args.images, args.out, method=args.method, keep=args.keep, r=args.r, flops=args.flops,
        dtype=args.dtype, cross_weight=args.cross_weight, trainable=args.trainable, steps=args.steps,
        batch_size=args.batch, lr=args.lr, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, max_length=args.max_length,
        workers=args.workers, pad_square=args.pad_square or None,
    )
    step = log["loss"][-1]["step"] if log["loss"] else log["resumed_at"]
    wrote = sorted(n for n in os.listdir(args.out) if n != "state")  # state/: what --resume reads
    print(f"step {step}: wrote {', '.join(wrote)} in {args.out}")
    return 0


def eval_arguments(p: argparse.ArgumentParser, questions_help: str, annotations_help: str | None) -> None:
    p.add_argument("--model", required=True,
                   help="local model folder with its processor: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                        "Qwen3-VL (config.json's model_type picks the class)")
    p.add_argument("--questions", required=True, help=questions_help)
    p.add_argument("--images", default=None, help="image folder the questions' file names are relative to")
    if annotations_help is not None:
        p.add_argument("--annotations", default=None, help=annotations_help)
    p.add_argument("--method", choices=METHODS, default="none",
                   help="token reduction (default none: stock; each family runs its own subset)")
    budget_arguments(p, keep=True)
    p.add_argument("--fastv-layer", type=int_at_least(1), default=None,
                   help="FastV / DART: prune before this LM layer K (default 2)")
    p.add_argument("--site", choices=("tower", "projector"), default=None,
                   help="LLaVA-NeXT / OneVision: merge in the vision tower (keep per tile) or at the projector "
                        "(keep per image; default the family's)")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="questions per batch (left-padded; default 8)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N questions")
    p.add_argument("--pad-square", action="store_true", help="pad images to squares first, as LLaVA-1.5 does")
    p.add_argument("--flops-batches", type=int_at_least(1), default=1,
                   help="batches whose FLOPs are counted (and not timed; default 1)")
    device_argument(p)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--answers", default=None, help="LLaVA answers JSONL (default: <json>.answers.jsonl)")
    p.add_argument("--json", default=None, help="write the result JSON here")


def _evaluate(args: argparse.Namespace, task: str, **options) -> int:


    torch.set_num_threads(args.threads)
    answers = args.answers or (os.path.splitext(args.json)[0] + ".answers.jsonl" if args.json else None)
    result = run_llava_eval(
        task, args.model, args.questions, args.images, getattr(args, "annotations", None), method=args.method,
        keep=args.keep, r=args.r, flops=args.flops, fastv_layer=args.fastv_layer, site=args.site, device=args.device,
        dtype=args.dtype,
        answers_path=answers, json_path=args.json, meta=vars_meta(args) | {"command": command_line()},
        batch_size=args.batch, max_new_tokens=args.max_new_tokens, limit=args.limit,
        pad_square=args.pad_square or None, flops_batches=args.flops_batches, **options,
    )
    score = result["score"]
    if task == "mme":  # the headline numbers; the subtasks are in the JSON
        score = {k: score[k] for k in ("perception", "cognition")}
    print(json.dumps({"score": score} | {k: result[k] for k in ("visual_tokens", "gflops", "gflops_prefill",
                                                                "samples_per_s")}))
    if args.json:
        print(f"wrote {args.json}" + (f" and {answers}" if answers else ""))
    return 0


def eval_vqa_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "LLaVA question JSONL (question_id, image, text): VQAv2, GQA, TextVQA",
                   "ground truth: VQAv2 annotations, GQA questions JSON or TextVQA JSON (none: answers only)")
    p.add_argument("--metric", choices=("vqa", "textvqa", "exact"), default=None,
                   help="default from the annotations: vqa (VQAv2), textvqa (TextVQA), exact (GQA)")
    p.add_argument("--no-suffix", dest="suffix", action="store_const", const=None, default=SHORT_ANSWER,
                   help="send questions as they are (default: add LLaVA-1.5's short-answer instruction if missing)")


def eval_vqa(args: argparse.Namespace) -> int:
    """LLaVA short-answer VQA (VQAv2/GQA/TextVQA files as LLaVA ships them): accuracy, GFLOPs, speed."""
    return _evaluate(args, "vqa", metric=args.metric, suffix=args.suffix)


def eval_mc_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "ScienceQA JSON/JSONL (llava_test_CQM-A.json) or MMBench TSV",
                   "ScienceQA problems.json (optional; answers may be in the question file)")
    p.add_argument("--circular", action="store_true", help="MMBench CircularEval: every rotation of the options")


def eval_mc(args: argparse.Namespace) -> int:
    """LLaVA multiple choice (ScienceQA-IMG, MMBench): option-letter accuracy, GFLOPs, speed."""
    return _evaluate(args, "mc", circular=args.circular)


def eval_pope_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "POPE question JSONL (llava_pope_test.jsonl)",
                   "folder of coco_pope_<category>.json label files, or one (none: labels in the questions)")
    p.add_argument("--no-suffix", dest="suffix", action="store_const", const=None, default=SHORT_ANSWER,
                   help="send questions as they are (default: add LLaVA-1.5's short-answer instruction if missing)")


def eval_pope(args: argparse.Namespace) -> int:
    """LLaVA on POPE: accuracy, precision, recall, F1, yes-ratio per category, GFLOPs, speed."""
    return _evaluate(args, "pope", suffix=args.suffix)



def eval_mme_arguments(p: argparse.ArgumentParser) -> None:
    eval_arguments(p, "MME's release folder (MME_Benchmark_release_version: one folder per subtask)", None)
    p.add_argument("--no-suffix", dest="suffix", action="store_const", const=None, default=SHORT_ANSWER,
                   help="send MME's questions as they are (default: LLaVA's MME prompt, MME's 'Please answer yes "
                        "or no.' replaced by the short-answer instruction)")
    p.add_argument("--mme-results", default=None, metavar="DIR",
                   help="also write MME's result files here (what its eval_tool/calculation.py --results_dir reads)")


def eval_mme(args: argparse.Namespace) -> int:
    """MME (14 yes/no subtasks): acc + acc+ per subtask, perception and cognition scores as MME's
    official calculation.py computes them, GFLOPs, speed."""
    return _evaluate(args, "mme", suffix=args.suffix, mme_results=args.mme_results)
