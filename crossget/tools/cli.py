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


def _int_range(s: str) -> tuple[int, int]:
    """'2-3' -> (2, 3); a single integer n -> (n, n)."""
    try:
        low, _, high = s.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX integers such as 2-3, got {s!r}") from None


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


def _torch_device(s: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(s)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not a torch device") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: MPS is not available on this machine")
    return s


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}")
        return s

    return convert


REDUCIBLE_METHODS = ("tome", "crossget")
LLAVA_PEERS = ("fastv", "visionzip")  # visual-token reduction peers, LLaVA only
TOWER_KINDS = ("vision", "text")


# --------------------------------------------------------------------------- bench / demo
def _add_run_arguments(p: argparse.ArgumentParser, *, batch: int, rounds: int, out: str | None) -> None:
    p.add_argument("--batch", type=_int_at_least(1), default=batch, help=f"batch size (default {batch})")
    p.add_argument("--threads", type=_int_at_least(1), default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=_int_at_least(1), default=rounds, help=f"timed rounds (default {rounds})")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed rounds first (default 1)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip batch-1 latency timing")
    _device_argument(p)
    p.add_argument("--out", default=out, help="output directory for results.json and results.md"
                   + (f" (default {out})" if out else " (default benchmarks/<model>-<tower>)"))


def _benchmark(args: argparse.Namespace, methods, rs, flops, reduce) -> int:
    import torch

    from crossget.tools.bench import build_configs, forward_for, load_model, make_inputs, run_benchmark

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.tower).to(args.device)
    if getattr(args, "attn", None):
        model.set_attn_implementation(args.attn)
    name = os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join("benchmarks", f"{name}-{args.tower}")
    configs = build_configs(methods, rs, flops, reduce)
    meta = {"model": args.model, "tower": args.tower, "reduce": list(reduce) if reduce else None}
    new_tokens = getattr(args, "max_new_tokens", 10)
    if args.tower == "caption":
        meta["max_new_tokens"] = new_tokens
    run_benchmark(
        model, make_inputs(model, args.tower, args.batch), configs,
        rounds=args.rounds, warmup=args.warmup, threads=args.threads,
        forward=forward_for(model, args.tower, new_tokens),
        latency=args.latency, out_dir=out, meta=meta,
    )
    md = os.path.join(out, "results.md")
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {os.path.join(out, 'results.json')}")
    return 0


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip-vit-b16",
                   help="named architecture with random weights (clip-vit-b16, blip-vit-b16, blip2-vit-g, "
                        "clip-tiny, blip-tiny, blip2-tiny) or a local model directory (from_pretrained); "
                        "default clip-vit-b16")
    p.add_argument("--tower", choices=("vision", "text", "both", "caption"), default="vision",
                   help="what runs: image features, text features, the whole model, or a captioning "
                        "model's whole generate call (BLIP, BLIP-2) (default vision)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=10,
                   help="tokens each caption generates, exactly (--tower caption; default 10)")
    p.add_argument("--reduce", type=_comma_list(_choice(TOWER_KINDS), "towers"), default=None,
                   help="towers to reduce, e.g. vision,text (default: the benchmarked tower; vision for both)")
    p.add_argument("--methods", type=_comma_list(_choice(REDUCIBLE_METHODS + LLAVA_PEERS), "methods"), default=None,
                   help="comma-separated: tome, crossget (default both; the stock model always runs); "
                        "for --model llava-1.5 also fastv, visionzip (default all four)")
    p.add_argument("--r", type=_comma_list(_non_negative_int, "non-negative integers"), default=[],
                   help="tokens removed per layer; one config per value, e.g. 8,12,16")
    p.add_argument("--flops", type=_comma_list(_ratio, "ratios in (0, 1]"), default=[],
                   help="target FLOPs ratios solved into schedules, e.g. 0.58,0.69")
    p.add_argument("--attn", choices=("sdpa", "eager"), default=None, help="attention implementation")
    p.add_argument("--keep", type=_comma_list(_int_at_least(1), "positive integers"), default=[],
                   help="--model llava-1.5: visual tokens per image for the LM, one config per value "
                        "(default 64,128,192,288; with --r 13)")
    p.add_argument("--lm-layers", type=_int_at_least(1), default=3,
                   help="--model llava-1.5: layers of the timed scaled-down Llama (default 3; FastV prunes after 2)")
    p.add_argument("--prompt-tokens", type=_int_at_least(1), default=64,
                   help="--model llava-1.5: prompt text tokens besides the image (default 64)")
    _add_run_arguments(p, batch=8, rounds=5, out=None)


def bench(args: argparse.Namespace) -> int:
    """Benchmark merging configs against the stock model."""
    if args.model.startswith("llava"):
        return _bench_llava(args)
    if set(args.methods or ()) & set(LLAVA_PEERS) or args.keep:
        raise ValueError("--methods fastv/visionzip and --keep are for --model llava-1.5")
    args.methods = args.methods or ["tome", "crossget"]
    if not args.r and not args.flops:
        raise ValueError("give --r and/or --flops (e.g. --r 8,12,16 or --flops 0.58)")
    reduce = args.reduce
    if reduce is None and args.tower not in ("both", "caption"):
        reduce = [args.tower]
    return _benchmark(args, args.methods, args.r, args.flops, reduce)


def _bench_llava(args: argparse.Namespace) -> int:
    """LLaVA-1.5: FLOPs of the real 7B/13B and timings of a scaled-down model, every method
    at every visual-token budget (see crossget.tools.bench_llava)."""
    from crossget.tools.bench_llava import DEFAULT_KEEPS, DEFAULT_RS, METHODS, run_llava_benchmark

    if args.model not in ("llava-1.5", "llava-1.5-7b"):
        raise ValueError(f"the LLaVA benchmark builds LLaVA-1.5 itself: --model llava-1.5, got {args.model!r}")
    if args.flops:
        raise ValueError("--flops is not a LLaVA budget here: give --keep and/or --r")
    keeps, rs = (args.keep, args.r) if (args.keep or args.r) else (DEFAULT_KEEPS, DEFAULT_RS)
    out = args.out or os.path.join("benchmarks", "llava")
    run_llava_benchmark(
        methods=args.methods or METHODS, keeps=keeps, rs=rs, prompt_tokens=args.prompt_tokens,
        new_tokens=args.max_new_tokens, rounds=args.rounds, threads=args.threads, lm_layers=args.lm_layers, out_dir=out,
    )
    md = os.path.join(out, "results.md")
    with open(md) as f:
        print(f.read())
    print(f"wrote {md}, {os.path.join(out, 'results.json')} and {os.path.join(out, 'tradeoff.png')}")
    return 0


def demo_arguments(p: argparse.ArgumentParser) -> None:
    _eval_common(p)
    _device_argument(p)
    p.add_argument("--flops", type=_ratio, default=0.58, help="GFLOPs target of the reduced rows (default 0.58)")
    p.add_argument("--cross-tokens", default="default", help="trained cross tokens (default: the model's own)")
    p.add_argument("--json", default="runs/demo/demo.json", help="where the table goes (JSON + .md)")


def demo(args: argparse.Namespace) -> int:
    """The shipped model on the generated test split: unreduced vs ToMe vs CrossGET at ~58% GFLOPs."""
    import torch

    from crossget.tools.eval.harness import evaluate_configs, results_table, write_results

    torch.set_num_threads(args.threads)
    model, _, split, inputs = _model_and_inputs(args)
    print(f"{len(split)} test images, {len(split.captions)} captions, {args.threads} threads")
    configs = [{"method": "tome", "flops": args.flops}, {"method": "crossget", "flops": args.flops}]
    trained = _cross_tokens_path(args)
    if trained:
        configs.append({"method": "crossget", "flops": args.flops, "cross_tokens": trained})
    rows = evaluate_configs(model, inputs, split, configs, args.batch)
    print(results_table(rows))
    print(f"wrote {write_results(rows, args.json, vars_meta(args))}")
    return 0


# --------------------------------------------------------------------------- data / training
def data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/shapes", help="output folder (default data/shapes)")
    p.add_argument("--train", type=_int_at_least(0), default=8000, help="training images (default 8000)")
    p.add_argument("--val", type=_int_at_least(0), default=400, help="validation images (default 400)")
    p.add_argument("--test", type=_int_at_least(0), default=1000, help="test images (default 1000)")
    p.add_argument("--image-size", type=_int_at_least(32), default=96, help="pixels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_int_at_least(1), default=1, help="processes drawing images (same files for any number)")
    p.add_argument("--object-scale", type=float, default=1.0, help="shape size factor, 1 to 1.25 (default 1)")
    p.add_argument("--clutter", type=_int_at_least(0), default=0, help="coloured specks per image (default 0)")
    p.add_argument("--entities", type=_int_range, default=(2, 3), metavar="MIN-MAX",
                   help="entities per scene, 2 to 4 (default 2-3)")


def data(args: argparse.Namespace) -> int:
    """Generate the shapes retrieval data set (PNG images + Karpathy-format JSON)."""
    from crossget.tools.data.shapes import generate_dataset

    path = generate_dataset(args.out, args.train, args.val, args.test, args.image_size, seed=args.seed,
                            n_entities=args.entities, object_scale=args.object_scale, clutter=args.clutter,
                            workers=args.workers)
    print(f"wrote {path}")
    return 0


def data_qa_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/shapes/dataset_shapes.json", help="shapes Karpathy JSON (crossget data)")
    p.add_argument("--out", default="data/shapes-qa", help="output folder, one subfolder per split")
    p.add_argument("--seed", type=int, default=0, help="question sampling seed (default 0)")


def data_qa(args: argparse.Namespace) -> int:
    """Question-answer pairs about the shapes scenes, in VQAv2, COCO-caption and LLaVA files per split."""
    from crossget.tools.data.shapes_qa import IMAGE_PATTERN, write_qa

    summary = write_qa(args.data, args.out, seed=args.seed)
    for split, s in summary.items():
        print(f"{split}: {s['questions']} questions about {s['images']} images -> {os.path.join(args.out, split)}")
    images = os.path.join(os.path.dirname(args.data), "images")
    print(f"evaluate with --images {images} (VQA: --image-pattern '{IMAGE_PATTERN}')")
    return 0


def train_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/shapes/dataset_shapes.json", help="Karpathy-format annotation file")
    p.add_argument("--out", default="crossget/assets/default", help="where the model is saved")
    p.add_argument("--epochs", type=_int_at_least(1), default=8)
    p.add_argument("--batch", type=_int_at_least(2), default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), default=2)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that passes this")
    p.add_argument("--init", default=None, help="go on from this saved model (and its tokenizer) instead of scratch")
    p.add_argument("--scene-weight", type=float, default=0.0,
                   help="weight of the auxiliary loss that names each grid cell's contents (generated data only)")
    p.add_argument("--sincos-positions", type=float, default=0.0,
                   help="add 2-D sine-cosine codes of this amplitude to the vision position embeddings first")
    p.add_argument("--scene-only-steps", type=int, default=0,
                   help="train the scene losses alone for this many first steps (needs a scene weight)")
    p.add_argument("--text-scene-weight", type=float, default=0.0,
                   help="weight of the same loss read from the text tower's pooled EOT state (generated data only)")
    p.add_argument("--text-warmup-steps", type=int, default=0,
                   help="first train the text tower on that loss alone for this many steps (needs --text-scene-weight)")


def train_base(args: argparse.Namespace) -> int:
    """Train the small default CLIPModel from scratch on generated data (CPU is enough)."""
    import json

    import torch

    from crossget.tools.data.karpathy import load_karpathy
    from crossget.tools.train.clip import BaseModelConfig, base_processor, pair_data
    from crossget.tools.train.clip import train_base as run

    torch.set_num_threads(args.threads)
    cfg = BaseModelConfig()
    split = load_karpathy(args.data, split="train")
    if args.init:
        from transformers import CLIPProcessor

        processor = CLIPProcessor.from_pretrained(args.init)
    else:
        processor = base_processor(split.captions, cfg.image_size)
    pairs = pair_data(split, processor, cfg.max_text_len)
    _, log = run(pairs, processor.tokenizer, processor.image_processor, args.out, cfg, epochs=args.epochs,
                 batch_size=args.batch, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes, init_from=args.init,
                 scene_weight=args.scene_weight, sincos_positions=args.sincos_positions,
                 scene_only_steps=args.scene_only_steps, text_scene_weight=args.text_scene_weight,
                 text_warmup_steps=args.text_warmup_steps)
    previous = os.path.join(args.init, "training.json") if args.init else None
    if previous and os.path.isfile(previous):
        with open(previous) as f:
            log["previous_stage"] = json.load(f)
    _save_training_log(args, log)
    print(f"saved the model to {args.out} after {log['train_seconds'] / 60:.1f} min")
    return 0


def train_blip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("caption", "vqa"), required=True)
    p.add_argument("--data", required=True, help="caption: shapes Karpathy JSON (train split); vqa: VQAv2 questions.json "
                   "(crossget data-qa; annotations.json beside it)")
    p.add_argument("--images", default=None, help="vqa: image folder (default: the questions' folder)")
    p.add_argument("--image-pattern", default=None, help="vqa: image file name from image_id (default shapes_{image_id:06d}.png)")
    p.add_argument("--clip", default=None, help="CLIP whose vision tower starts BLIP's (default: the shipped model)")
    p.add_argument("--out", required=True, help="where the model, processor and training.json are saved")
    p.add_argument("--steps", type=_int_at_least(1), default=550)
    p.add_argument("--batch", type=_int_at_least(1), default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="text side; the vision tower gets 0.2x (default 1e-3)")
    p.add_argument("--text-layers", type=_int_at_least(1), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the step that passes this")


def train_blip(args: argparse.Namespace) -> int:
    """Train a small BLIP captioner or VQA model on the shapes data, its vision tower from the shipped CLIP."""

    import torch
    from transformers import CLIPConfig

    from crossget.tools.default import ASSETS
    from crossget.tools.train.blip import BlipSmallConfig, caption_data, vqa_data
    from crossget.tools.train.blip import train_blip as run

    torch.set_num_threads(args.threads)
    if args.task == "caption":
        data = caption_data(args.data)
    else:
        data = vqa_data(args.data, image_root=args.images, image_pattern=args.image_pattern)
    config = BlipSmallConfig.from_clip(CLIPConfig.from_pretrained(args.clip or ASSETS), text_layers=args.text_layers)
    _, log = run(args.task, data, args.out, clip=args.clip, config=config, steps=args.steps, batch_size=args.batch,
                 lr=args.lr, seed=args.seed, max_minutes=args.max_minutes)
    _save_training_log(args, log)
    print(f"saved the model to {args.out} after {log['train_seconds'] / 60:.1f} min "
          f"({log['seconds_per_step']:.2f} s/step), last loss {log['loss'][-1]:.3f}")
    return 0


# --------------------------------------------------------------------------- evaluation
def _model_and_inputs(args: argparse.Namespace):
    """The model (default or a directory), its processor, the split and its preprocessed inputs."""
    from crossget.tools.data.karpathy import load_karpathy, preprocess
    from crossget.tools.default import default_annotation, load_default

    model, processor = load_default(None if args.model == "default" else args.model)
    annotation = default_annotation() if args.data == "default" else args.data
    split = load_karpathy(annotation, split=args.split, limit=args.limit)
    max_len = model.config.text_config.max_position_embeddings
    inputs = preprocess(split, processor, max_len)
    device = getattr(args, "device", "cpu")  # evaluation only: training places the model through accelerate
    return model.to(device), processor, split, {k: v.to(device) for k, v in inputs.items()}


def _eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (shipped) or a CLIPModel directory")
    p.add_argument("--data", default="default", help="'default' (generated shapes) or a Karpathy JSON")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="first N images of the split")
    p.add_argument("--batch", type=_int_at_least(1), default=64)
    p.add_argument("--threads", type=_int_at_least(1), default=2)


def _device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_torch_device, default="cpu", help="torch device, e.g. cuda (default cpu)")


def _cross_tokens_path(args: argparse.Namespace) -> str | None:
    """``--cross-tokens``: a file, or 'default' = the model folder's cross_tokens.safetensors (if any)."""
    from crossget.tools.default import ASSETS

    if args.cross_tokens != "default":
        return args.cross_tokens
    path = os.path.join(ASSETS if args.model == "default" else args.model, "cross_tokens.safetensors")
    return path if os.path.isfile(path) else None


def eval_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    _eval_common(p)
    _device_argument(p)
    p.add_argument("--method", choices=("none", "tome", "crossget"), default="crossget")
    p.add_argument("--r", type=_non_negative_int, default=None, help="tokens removed per vision layer")
    p.add_argument("--flops", type=_ratio, default=None, help="target GFLOPs ratio, e.g. 0.58")
    p.add_argument("--cross-tokens", default=None, help="trained cross tokens: a file, or 'default' (the model's own)")
    p.add_argument("--json", default=None, help="write results here (and a .md table beside it)")


def eval_retrieval(args: argparse.Namespace) -> int:
    """Image-text retrieval (Recall@1/5/10 both ways), fidelity, GFLOPs and speed vs unreduced."""
    import torch

    from crossget.tools.eval.harness import evaluate_configs, results_table, write_results

    if args.method != "none" and args.r is None and args.flops is None:
        raise ValueError("give --r or --flops for a reducing method")
    torch.set_num_threads(args.threads)
    model, _, split, inputs = _model_and_inputs(args)
    cfg = {"method": args.method, "r": args.r, "flops": args.flops, "cross_tokens": _cross_tokens_path(args)}
    rows = evaluate_configs(model, inputs, split, [cfg], args.batch)
    print(results_table(rows))
    if args.json:
        print(f"wrote {write_results(rows[-1:] if args.method != 'none' else rows, args.json, vars_meta(args))}")
    return 0


def command_line() -> str:
    """The command as typed (shell-quoted), for the records next to results."""
    import shlex

    return "crossget " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _save_training_log(args: argparse.Namespace, log: dict) -> None:
    """``out/training.json`` with the command and thread count the training function cannot know."""
    import json

    log["command"] = command_line()
    log["threads"] = args.threads
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(log, f, indent=2)


def vars_meta(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def eval_sweep_arguments(p: argparse.ArgumentParser) -> None:
    _eval_common(p)
    _device_argument(p)
    p.add_argument("--levels", type=_comma_list(_ratio, "ratios"), default=[0.8, 0.7, 0.58, 0.5],
                   help="GFLOPs targets (default 0.8,0.7,0.58,0.5)")
    p.add_argument("--cross-tokens", default="default", help="trained cross tokens (default: the model's own)")
    p.add_argument("--out", default="benchmarks/shapes-sweep", help="folder for sweep.json/.md/.png")
    p.add_argument("--unguided", action="store_true", help="also complete-graph matching without cross tokens (ablation)")


def eval_sweep(args: argparse.Namespace) -> int:
    """Recall@1 and fidelity against GFLOPs: ToMe, CrossGET training-free and trained."""
    import torch

    from crossget.tools.eval.harness import evaluate_configs, write_results
    from crossget.tools.eval.plot import plot_sweep

    torch.set_num_threads(args.threads)
    model, _, split, inputs = _model_and_inputs(args)
    trained = _cross_tokens_path(args)
    configs = []
    for level in args.levels:
        configs.append({"method": "tome", "flops": level})
        configs.append({"method": "crossget", "flops": level})
        if args.unguided:
            configs.append({"method": "crossget", "flops": level, "importance": "none"})
        if trained:
            configs.append({"method": "crossget", "flops": level, "cross_tokens": trained})
    rows = evaluate_configs(model, inputs, split, configs, args.batch)
    path = write_results(rows, os.path.join(args.out, "sweep.json"), vars_meta(args))
    png = plot_sweep(rows, os.path.join(args.out, "sweep.png"))
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')} and {png}")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    _eval_common(p)
    p.set_defaults(split="train")
    p.add_argument("--method", choices=("crossget",), default="crossget")
    p.add_argument("--r", type=_non_negative_int, default=None)
    p.add_argument("--flops", type=_ratio, default=0.58)
    p.add_argument("--cross-weight", type=float, default=0.5, help="w in (1 - w) L_task + w L_cross")
    p.add_argument("--steps", type=_int_at_least(1), default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--all-weights", action="store_true",
                   help="fine-tune every weight too (saved to OUT/model), not only the cross tokens")
    p.add_argument("--weights-lr", type=float, default=1e-4, help="learning rate of the weights with --all-weights")
    p.add_argument("--out", default="runs/cross-tokens", help="checkpoints and cross_tokens.safetensors")
    p.add_argument("--no-resume", dest="resume", action="store_false")


def train(args: argparse.Namespace) -> int:
    """Learn the cross tokens (docs/method.md §3) of a model patched with CrossGET; resumable, via accelerate."""
    import torch

    from crossget.api import patch
    from crossget.tools.train.clip import PairData, train_cross_tokens

    torch.set_num_threads(args.threads)
    model, processor, split, t = _model_and_inputs(args)
    patch(model, r=args.r, flops=None if args.r is not None else args.flops, method=args.method,
          towers=("vision",))
    pairs = PairData(t["pixel_values"], t["input_ids"], t["attention_mask"], split.txt2img, split.families)
    _, log = train_cross_tokens(model, pairs, args.out, cross_weight=args.cross_weight, steps=args.steps,
                                batch_size=args.batch, lr=args.lr, all_weights=args.all_weights,
                                weights_lr=args.weights_lr, resume=args.resume, model_parts=(processor,))
    _save_training_log(args, log)
    print(f"wrote {os.path.join(args.out, 'cross_tokens.safetensors')}"
          + (f" and the fine-tuned model to {os.path.join(args.out, 'model')}" if args.all_weights else ""))
    return 0


LLAVA_TRAINABLE = ("cross", "lora", "projector+lm")  # crossget.tools.train.llava.TRAINABLE, without importing torch here


def train_llava_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local LLaVA folder (LlavaForConditionalGeneration + its processor)")
    p.add_argument("--data", required=True, help="LLaVA instruction-tuning JSON (id, image, conversations)")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--method", choices=("none", "crossget", "tome"), default="crossget",
                   help="visual-token reduction to train with (default crossget; none: the stock model)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=_int_at_least(1), default=None, help="visual tokens per image for the LM")
    budget.add_argument("--r", type=_non_negative_int, default=None, help="tokens merged per vision layer")
    budget.add_argument("--flops", type=_ratio, default=None, help="target prefill FLOPs ratio, e.g. 0.5")
    p.add_argument("--trainable", choices=LLAVA_TRAINABLE, default="cross",
                   help="cross: the cross tokens; lora: LoRA on the LM's attention (+ cross tokens; needs peft); "
                        "projector+lm: projector and LM, vision tower frozen (default cross)")
    p.add_argument("--steps", type=_int_at_least(1), default=1000)
    p.add_argument("--batch", type=_int_at_least(1), default=16, help="samples per step and process (default 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-2 cross, 2e-4 lora, 2e-5 projector+lm)")
    p.add_argument("--cross-weight", type=float, default=None, help="w in (1 - w) L_LM + w L_cross (default 0.001)")
    p.add_argument("--max-length", type=_int_at_least(1), default=2048, help="tokens per sample, image included (default 2048)")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=200)
    p.add_argument("--log-every", type=_int_at_least(1), default=10)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this much training")
    p.add_argument("--workers", type=_int_at_least(0), default=0, help="data loader processes (default 0)")
    p.add_argument("--pad-square", action="store_true", help="pad images to squares first, as LLaVA-1.5 does")
    # no float16: AdamW on fp16 weights without a loss scaler turns untouched rows into NaN
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), default=2)
    p.add_argument("--out", default="runs/llava", help="checkpoints, trained weights and training.json (default runs/llava)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")


def train_llava(args: argparse.Namespace) -> int:
    """Train a LLaVA-1.5 model on LLaVA's conversation JSON through accelerate (resumable, safetensors):
    cross tokens, LoRA adapters or projector + LM, with the visual tokens reduced as given."""
    import torch

    from crossget.families.llava import CROSS_LOSS_WEIGHT
    from crossget.tools.eval.llava import load_llava, patch_llava
    from crossget.tools.train.llava import LlavaConversations, train_llava

    torch.set_num_threads(args.threads)
    data = LlavaConversations(args.data, args.images)  # first: data errors before loading a large model
    model, processor = load_llava(args.model, dtype=args.dtype)
    patch_llava(model, processor, args.method, keep=args.keep, r=args.r, flops=args.flops)
    weight = CROSS_LOSS_WEIGHT if args.cross_weight is None else args.cross_weight
    _, log = train_llava(
        model, processor, data, args.out, trainable=args.trainable, steps=args.steps, batch_size=args.batch,
        lr=args.lr, seed=args.seed, cross_weight=weight, resume=args.resume, max_minutes=args.max_minutes,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, max_length=args.max_length,
        workers=args.workers, pad_square=args.pad_square or None,
    )
    step = log["loss"][-1]["step"] if log["loss"] else log["resumed_at"]
    wrote = sorted(n for n in os.listdir(args.out) if n != "state")  # state/: what --resume reads
    print(f"step {step}: wrote {', '.join(wrote)} in {args.out}")
    return 0


def init_llava_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/llava-small", help="model folder to write (default runs/llava-small)")
    p.add_argument("--qa", default="data/shapes-qa",
                   help="LLaVA conversation JSON, or a folder of */llava_conversations.json (crossget data-qa), "
                        "whose words the tokenizer covers (default data/shapes-qa)")
    p.add_argument("--lm-width", type=_int_at_least(1), default=256, help="Llama hidden size (default 256)")
    p.add_argument("--lm-layers", type=_int_at_least(1), default=4,
                   help="Llama layers (default 4; FastV prunes after layer 2, so it needs 3 or more)")
    p.add_argument("--lm-heads", type=_int_at_least(1), default=4, help="attention heads (default 4)")
    p.add_argument("--lm-intermediate", type=_int_at_least(1), default=None, help="MLP size (default 4 x width)")
    p.add_argument("--by-image", default=None, metavar="CONVERSATIONS",
                   help="also write OUT/train_by_image.json: these LLaVA conversations regrouped into one multi-turn "
                        "conversation per image (faster training: one image encoding for all its questions)")
    p.add_argument("--seed", type=int, default=0)


def init_llava(args: argparse.Namespace) -> int:
    """Build a tiny LLaVA-1.5 to train on CPU: the shipped CLIP's vision tower (weights copied), a GELU
    MLP projector and a random small Llama, with a word-level LLaVA processor over the QA words."""
    from crossget.tools.llava_small import save_llava_small

    sizes = dict(lm_width=args.lm_width, lm_layers=args.lm_layers, lm_heads=args.lm_heads,
                 lm_intermediate=args.lm_intermediate, seed=args.seed)
    # every setting spelt out, so the record rebuilds the model whatever the defaults become
    command = f"crossget init-llava --out {args.out} --qa {args.qa} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sizes.items() if v is not None)
    command += f" --by-image {args.by_image}" if args.by_image else ""
    out = save_llava_small(args.out, args.qa, command=command, **sizes)
    print(f"wrote {out} (train it: crossget train-llava --model {out} --method none --trainable projector+lm ...)")
    if args.by_image:
        import json
        from pathlib import Path

        from crossget.tools.llava_small import by_image

        path = out / "train_by_image.json"
        records = by_image(json.loads(Path(args.by_image).read_text()), seed=args.seed)
        path.write_text(json.dumps(records))
        print(f"wrote {path}: {len(records)} images, {sum(len(r['conversations']) // 2 for r in records)} questions")
    return 0


# --------------------------------------------------------------------------- BLIP evaluations
def _blip_eval_common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", required=True, help="local BLIP model folder (save_pretrained layout, with its processor)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="first N items of the data file")
    p.add_argument("--method", choices=("none", "tome", "crossget"), default="none")
    p.add_argument("--r", type=_non_negative_int, default=None, help="tokens removed per layer")
    p.add_argument("--flops", type=_ratio, default=None, help="target GFLOPs ratio, e.g. 0.58")
    p.add_argument("--towers", type=_comma_list(_choice(TOWER_KINDS), "towers"), default=None,
                   help="towers to reduce, e.g. vision,text (default vision)")
    p.add_argument("--batch", type=_int_at_least(1), default=16)
    p.add_argument("--threads", type=_int_at_least(1), default=2)
    _device_argument(p)
    p.add_argument("--json", default=None, help="write the result JSON here")


def _blip_eval(args: argparse.Namespace, run: Callable, data_kwargs: dict, keys: Sequence[str], **kwargs) -> int:
    import torch

    from crossget.tools.eval.blip_common import summary_line

    if args.method != "none" and args.r is None and args.flops is None:
        raise ValueError("give --r or --flops for a reducing method")
    torch.set_num_threads(args.threads)
    result = run(args.model, args.data, **data_kwargs, image_root=args.images, limit=args.limit, method=args.method,
                 r=args.r, flops=args.flops, towers=args.towers, json_path=args.json, device=args.device,
                 batch_size=args.batch, **kwargs)
    print(summary_line(result, [*keys, "gflops", "gflops_ratio"]))
    if args.json:
        print(f"wrote {args.json}" + (f" and {result['results_file']}" if result.get("results_file") else ""))
    return 0


def eval_itm_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    _blip_eval_common(p, "Karpathy-format annotation JSON (dataset_flickr30k.json, dataset_coco.json)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--k", type=_int_at_least(1), default=128, help="ITM re-ranks the ITC top k (BLIP: 128 Flickr, 256 COCO)")
    p.add_argument("--pair-batch", type=_int_at_least(1), default=128, help="ITM pairs per forward")
    p.add_argument("--first-token", choices=("enc", "cls"), default="enc", help="first token of the ITM text")


def eval_itm_retrieval(args: argparse.Namespace) -> int:
    """BLIP retrieval: ITC ranking, ITM re-ranking of the top k, Recall@1/5/10 both ways, GFLOPs, images/s."""
    from crossget.tools.eval.itm_retrieval import run_itm_retrieval

    return _blip_eval(args, run_itm_retrieval, {"split": args.split},
                      ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "images_per_s"],
                      k=args.k, pair_batch=args.pair_batch, first_token=args.first_token)


def eval_caption_arguments(p: argparse.ArgumentParser) -> None:
    _blip_eval_common(p, "COCO-caption annotation JSON (images + annotations)")
    p.add_argument("--prompt", default="a picture of ", help="decoder prompt, cut from the captions")
    p.add_argument("--num-beams", type=_int_at_least(1), default=3)
    p.add_argument("--max-length", type=_int_at_least(2), default=20)
    p.add_argument("--min-length", type=_int_at_least(0), default=5)
    p.add_argument("--tokenizer", choices=("ptb", "basic"), default="ptb",
                   help="caption tokenizer for scoring: ptb (pycocoevalcap, java) or basic (Python)")


def eval_caption(args: argparse.Namespace) -> int:
    """BLIP captioning: generate, BLEU-4 and CIDEr (pycocoevalcap), GFLOPs, images/s; COCO results JSON."""
    from crossget.tools.eval.caption import GenerationSettings, run_caption

    settings = GenerationSettings(args.prompt, args.num_beams, args.max_length, min(args.min_length, args.max_length))
    return _blip_eval(args, run_caption, {}, ["bleu_4", "cider", "images_per_s"], settings=settings,
                      tokenizer=args.tokenizer)


def eval_vqa_arguments(p: argparse.ArgumentParser) -> None:
    _blip_eval_common(p, "VQAv2 question JSON")
    p.add_argument("--annotations", default=None, help="VQAv2 annotation JSON (none: answers only, e.g. test-dev)")
    p.add_argument("--image-pattern", default="COCO_{data_subtype}_{image_id:012d}.jpg",
                   help="image file name from image_id and data_subtype")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=10)
    p.add_argument("--num-beams", type=_int_at_least(1), default=1)


def eval_vqa(args: argparse.Namespace) -> int:
    """BLIP VQA: generate answers, official VQA accuracy, GFLOPs, questions/s; official results JSON."""
    from crossget.tools.eval.vqa import run_vqa

    return _blip_eval(args, run_vqa, {"annotations": args.annotations, "image_pattern": args.image_pattern},
                      ["accuracy", "questions_per_s"], max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)


def eval_nlvr2_arguments(p: argparse.ArgumentParser) -> None:
    _blip_eval_common(p, "NLVR2 JSON-lines file (dev.json, test1.json)")
    p.add_argument("--combine", choices=("mean", "min", "max"), default="mean",
                   help="how the two images' ITM match probabilities combine")
    p.add_argument("--threshold", type=float, default=0.5, help="True when the combined probability reaches this")


def eval_nlvr2(args: argparse.Namespace) -> int:
    """NLVR2 with a BLIP ITM model (zero-shot proxy: ITM against each image), accuracy, GFLOPs, examples/s."""
    from crossget.tools.eval.nlvr2 import run_nlvr2

    return _blip_eval(args, run_nlvr2, {}, ["accuracy", "examples_per_s"], combine=args.combine,
                      threshold=args.threshold)


# --------------------------------------------------------------------------- LLaVA evaluations
LLAVA_METHODS = ("none", "crossget", "tome", "fastv", "visionzip")


def _llava_eval_arguments(p: argparse.ArgumentParser, questions_help: str, annotations_help: str) -> None:
    p.add_argument("--model", required=True, help="local LLaVA folder (LlavaForConditionalGeneration + LlavaProcessor)")
    p.add_argument("--questions", required=True, help=questions_help)
    p.add_argument("--images", default=None, help="image folder the questions' file names are relative to")
    p.add_argument("--annotations", default=None, help=annotations_help)
    p.add_argument("--method", choices=LLAVA_METHODS, default="none", help="token reduction (default none: stock)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=_int_at_least(1), default=None, help="visual tokens per image for the LM")
    budget.add_argument("--r", type=_non_negative_int, default=None, help="tokens merged per vision layer")
    budget.add_argument("--flops", type=_ratio, default=None, help="target prefill FLOPs ratio, e.g. 0.5")
    p.add_argument("--batch", type=_int_at_least(1), default=8, help="questions per batch (left-padded; default 8)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=128)
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="first N questions")
    p.add_argument("--pad-square", action="store_true", help="pad images to squares first, as LLaVA-1.5 does")
    _device_argument(p)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=_int_at_least(1), default=2)
    p.add_argument("--answers", default=None, help="LLaVA answers JSONL (default: <json>.answers.jsonl)")
    p.add_argument("--json", default=None, help="write the result JSON here")


def _eval_llava(args: argparse.Namespace, task: str, **kwargs) -> int:
    import json
    from pathlib import Path

    import torch

    from crossget.api import config, is_patched
    from crossget.tools.eval.llava import evaluate_llava, load_llava, patch_llava

    torch.set_num_threads(args.threads)
    model, processor = load_llava(args.model, args.device, args.dtype)
    processor = patch_llava(model, processor, args.method, keep=args.keep, r=args.r, flops=args.flops)
    answers = args.answers or (str(Path(args.json).with_suffix(".answers.jsonl")) if args.json else None)
    result = evaluate_llava(
        task, model, processor, args.questions, args.images, args.annotations, batch_size=args.batch,
        max_new_tokens=args.max_new_tokens, limit=args.limit, pad_square=args.pad_square or None,
        answers_path=answers, model_id=os.path.basename(os.path.normpath(args.model)), **kwargs,
    )
    result["method"] = args.method
    result["patch"] = config(model).to_dict() if is_patched(model) else None
    print(json.dumps({k: result[k] for k in ("score", "visual_tokens", "gflops", "gflops_prefill", "samples_per_s")}))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = vars_meta(args) | {"torch": torch.__version__, "command": command_line()}
        path.write_text(json.dumps({"meta": meta, "results": result}, indent=2, default=str))
        print(f"wrote {path}" + (f" and {answers}" if answers else ""))
    return 0


def eval_llava_vqa_arguments(p: argparse.ArgumentParser) -> None:
    _llava_eval_arguments(p, "LLaVA question JSONL (question_id, image, text): VQAv2, GQA, TextVQA",
                          "ground truth: VQAv2 annotations, GQA questions JSON or TextVQA JSON (none: answers only)")
    p.add_argument("--metric", choices=("vqa", "textvqa", "exact"), default=None,
                   help="default from the annotations: vqa (VQAv2), textvqa (TextVQA), exact (GQA)")
    p.add_argument("--no-suffix", dest="suffix", action="store_const", const=None,
                   default="Answer the question using a single word or phrase.",
                   help="send questions as they are (default: add LLaVA-1.5's short-answer instruction if missing)")


def eval_llava_vqa(args: argparse.Namespace) -> int:
    """LLaVA short-answer VQA (VQAv2/GQA/TextVQA files as LLaVA ships them): accuracy, GFLOPs, speed."""
    return _eval_llava(args, "vqa", metric=args.metric, suffix=args.suffix)


def eval_llava_mc_arguments(p: argparse.ArgumentParser) -> None:
    _llava_eval_arguments(p, "ScienceQA JSON/JSONL (llava_test_CQM-A.json) or MMBench TSV",
                          "ScienceQA problems.json (optional; answers may be in the question file)")
    p.add_argument("--circular", action="store_true", help="MMBench CircularEval: every rotation of the options")


def eval_llava_mc(args: argparse.Namespace) -> int:
    """LLaVA multiple choice (ScienceQA-IMG, MMBench): option-letter accuracy, GFLOPs, speed."""
    return _eval_llava(args, "mc", circular=args.circular)


def eval_llava_pope_arguments(p: argparse.ArgumentParser) -> None:
    _llava_eval_arguments(p, "POPE question JSONL (llava_pope_test.jsonl)",
                          "folder of coco_pope_<category>.json label files, or one (none: labels in the questions)")
    p.add_argument("--no-suffix", dest="suffix", action="store_const", const=None,
                   default="Answer the question using a single word or phrase.",
                   help="send questions as they are (default: add LLaVA-1.5's short-answer instruction if missing)")


def eval_llava_pope(args: argparse.Namespace) -> int:
    """LLaVA on POPE: accuracy, precision, recall, F1, yes-ratio per category, GFLOPs, speed."""
    return _eval_llava(args, "pope", suffix=args.suffix)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None
    subcommands: tuple[Command, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("bench", "benchmark FLOPs, tokens, speed and memory of merging configs", bench_arguments, bench),
    Command("demo", "the shipped model: accuracy and speed, unreduced vs ToMe vs CrossGET", demo_arguments, demo),
    Command("data", "generate the shapes retrieval data set", data_arguments, data),
    Command("train-base", "train the small default CLIP model from scratch", train_base_arguments, train_base),
    Command("train", "train cross tokens of a CrossGET-patched model", train_arguments, train),
    Command("train-llava", "train a LLaVA model: cross tokens, LoRA or projector + LM", train_llava_arguments,
            train_llava),
    Command("init-llava", "build a tiny LLaVA from the shipped CLIP's vision tower and a small random Llama",
            init_llava_arguments, init_llava),
    Command("data-qa", "question-answer and caption files (VQAv2, COCO, LLaVA) for the shapes data",
            data_qa_arguments, data_qa),
    Command("train-blip", "train a small BLIP captioner or VQA model on the shapes data", train_blip_arguments,
            train_blip),
    Command("eval", "evaluate merging configs on a task", subcommands=(
        Command("retrieval", "image-text retrieval of one config vs unreduced", eval_retrieval_arguments, eval_retrieval),
        Command("sweep", "retrieval of every method at several GFLOPs levels, with a plot", eval_sweep_arguments,
                eval_sweep),
        Command("itm-retrieval", "BLIP retrieval: ITC + ITM re-ranking, Recall@K", eval_itm_retrieval_arguments,
                eval_itm_retrieval),
        Command("caption", "BLIP captioning: BLEU-4 and CIDEr (COCO format)", eval_caption_arguments, eval_caption),
        Command("vqa", "BLIP VQAv2: official VQA accuracy", eval_vqa_arguments, eval_vqa),
        Command("nlvr2", "NLVR2 accuracy with a BLIP ITM model", eval_nlvr2_arguments, eval_nlvr2),
        Command("llava-vqa", "LLaVA short-answer VQA: VQAv2 / GQA / TextVQA accuracy", eval_llava_vqa_arguments,
                eval_llava_vqa),
        Command("llava-mc", "LLaVA multiple choice: ScienceQA-IMG / MMBench accuracy", eval_llava_mc_arguments,
                eval_llava_mc),
        Command("llava-pope", "LLaVA on POPE: accuracy, precision, recall, F1, yes-ratio", eval_llava_pope_arguments,
                eval_llava_pope),
    )),
)


def _add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=(cmd.run.__doc__ if cmd.run else None) or cmd.help)
        if cmd.subcommands:
            _add_commands(p, cmd.subcommands, f"{dest}_{cmd.name}")
            continue
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget", description="CrossGET token merging for Hugging Face vision-language transformers."
    )
    from crossget import __version__

    parser.add_argument("--version", action="version", version=f"crossget {__version__}")
    _add_commands(parser, COMMANDS, "command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._command.run(args) or 0
    except (ValueError, TypeError, OSError) as e:
        args._parser.error(str(e))  # exits 2


if __name__ == "__main__":
    sys.exit(main())
