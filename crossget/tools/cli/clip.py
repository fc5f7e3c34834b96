"""Commands on CLIP models and Karpathy-format retrieval data (the shipped default model):
``demo``, ``eval retrieval``, ``eval sweep``, ``train-base`` and ``train`` (cross tokens)."""

from __future__ import annotations

import argparse
import os

import torch
from tqdm.auto import tqdm

from crossget.io import read_cross_tokens
from crossget.tools.calibration import calibrated_settings
from crossget.tools.cli.options import (
    choice,
    comma_list,
    device_argument,
    int_at_least,
    non_negative_int,
    positive_float,
    ratio,
    save_training_log,
    unit_float,
    vars_meta,
)
from crossget.tools.default import load_retrieval, trained_cross_tokens
from crossget.tools.eval.features import VARIANTS
from crossget.tools.eval.harness import evaluate_retrieval, results_table
from crossget.tools.eval.plot import plot_sweep
from crossget.tools.train.dual import train_dual_encoder
from crossget.tools.train.jobs import train_base_on, train_cross_tokens_on


def retrieval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (shipped) or a CLIPModel directory")
    p.add_argument("--data", default="default", help="'default' (generated shapes) or a Karpathy JSON")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N images of the split")
    p.add_argument("--batch", type=int_at_least(1), default=64)
    p.add_argument("--threads", type=int_at_least(1), default=2)


def evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """What every retrieval evaluation takes: the model and data, the device, and a subset."""
    retrieval_arguments(p)
    device_argument(p)
    p.add_argument("--skip", type=int_at_least(0), default=0,
                   help="leave out the first N images of the split before --limit (a second, disjoint subset)")


def _evaluate(args: argparse.Namespace, configs: list[dict], json_path: str | None, write_reference: bool = True):


    torch.set_num_threads(args.threads)
    return evaluate_retrieval(
        args.model, args.data, configs, split=args.split, limit=args.limit, skip=args.skip, batch_size=args.batch,
        device=args.device, json_path=json_path, meta=vars_meta(args), write_reference=write_reference,
    )


def _trained(args: argparse.Namespace) -> str | None:
    """The cross-token file of ``--cross-tokens``, read once here so that a bad file is an error
    before any evaluation runs (whether it fits the model is checked when it is loaded)."""
    path = trained_cross_tokens(args.model, args.cross_tokens)
    if path is not None:
        read_cross_tokens(path)
    return path


def demo_arguments(p: argparse.ArgumentParser) -> None:
    evaluation_arguments(p)
    p.add_argument("--flops", type=ratio, default=0.58, help="GFLOPs target of the reduced rows (default 0.58)")
    p.add_argument("--cross-tokens", default="default", help="trained cross tokens (default: the model's own)")
    p.add_argument("--json", default="runs/demo/demo.json", help="where the table goes (JSON + .md)")


def demo(args: argparse.Namespace) -> int:
    """The shipped model on the generated test split: unreduced vs ToMe vs CrossGET at ~58% GFLOPs."""
    configs = [{"method": "tome", "flops": args.flops}, {"method": "crossget", "flops": args.flops}]
    trained = _trained(args)
    if trained:
        configs.append({"method": "crossget", "flops": args.flops, "cross_tokens": trained})
    _, path = _evaluate(args, configs, args.json)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}")
    return 0


def eval_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    evaluation_arguments(p)
    p.add_argument("--method", choices=("none", "tome", "crossget"), default="crossget")
    p.add_argument("--r", type=non_negative_int, default=None, help="tokens removed per vision layer")
    p.add_argument("--flops", type=ratio, default=None, help="target GFLOPs ratio, e.g. 0.58")
    p.add_argument("--cross-tokens", default=None, help="trained cross tokens: a file, or 'default' (the model's own)")
    p.add_argument("--json", default=None, help="write results here (and a .md table beside it)")


def eval_retrieval(args: argparse.Namespace) -> int:
    """Image-text retrieval (Recall@1/5/10 both ways), fidelity, GFLOPs and speed vs unreduced."""
    if args.method != "none" and args.r is None and args.flops is None:
        raise ValueError("give --r or --flops for a reducing method")
    cfg = {"method": args.method, "r": args.r, "flops": args.flops, "cross_tokens": _trained(args)}
    rows, path = _evaluate(args, [cfg], args.json, write_reference=args.method == "none")
    print(results_table(rows))
    if path is not None:
        print(f"wrote {path}")
    return 0


def eval_sweep_arguments(p: argparse.ArgumentParser) -> None:
    evaluation_arguments(p)
    p.add_argument("--levels", type=comma_list(ratio, "ratios"), default=[0.8, 0.7, 0.58, 0.5],
                   help="GFLOPs targets (default 0.8,0.7,0.58,0.5)")
    p.add_argument("--cross-tokens", default="default", help="trained cross tokens (default: the model's own)")
    p.add_argument("--out", default="benchmarks/shapes-sweep", help="folder for sweep.json/.md/.png")
    p.add_argument("--unguided", action="store_true", help="also complete-graph matching without cross tokens (ablation)")
    p.add_argument("--variants", type=comma_list(choice(tuple(VARIANTS)), "variants"), default=None,
                   help="instead of ToMe / CrossGET / unguided: these methods and guidance variants "
                        f"({','.join(VARIANTS)}); trained cross tokens are added with the reference rule")
    p.add_argument("--calibrated", type=comma_list(choice(tuple(VARIANTS)), "variants"), default=[],
                   help="variants also run with a per-level schedule calibrated on train images (crossget.calibrate)")
    p.add_argument("--calibration", type=int_at_least(4), default=32,
                   help="calibration images: the first N of the train split, or where the data has none (the "
                        "generated test split) the N after the --skip and --limit ones (default 32)")
    p.add_argument("--calibration-evals", type=int_at_least(2), default=24, help="evaluations per calibration")


def eval_sweep(args: argparse.Namespace) -> int:
    """Recall@1 and fidelity against GFLOPs: ToMe, CrossGET training-free and trained."""
    trained = _trained(args)
    configs = []
    for level in args.levels:
        if args.variants:
            configs += [{"name": f"{v} flops={level:g}", "variant": v, "flops": level, **VARIANTS[v]}
                        for v in args.variants]
            if trained:
                configs.append({"method": "crossget", "flops": level, "cross_tokens": trained})
            continue
        configs.append({"method": "tome", "flops": level})
        configs.append({"method": "crossget", "flops": level})
        if args.unguided:
            configs.append({"method": "crossget", "flops": level, "importance": "none"})
        if trained:
            configs.append({"method": "crossget", "flops": level, "cross_tokens": trained})
    configs += _calibrated_configs(args)
    rows, path = _evaluate(args, configs, os.path.join(args.out, "sweep.json"))
    png = plot_sweep(rows, os.path.join(args.out, "sweep.png"))
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')} and {png}")
    return 0


def _calibrated_configs(args: argparse.Namespace) -> list[dict]:
    """One config per level and ``--calibrated`` variant: its per-layer schedule searched on the
    first ``--calibration`` train images (where the data has no train split: the images of the
    evaluated split after the ``--limit`` evaluated ones), at the level's FLOPs target."""
    if not args.calibrated:
        return []
    torch.set_num_threads(args.threads)
    try:
        job = load_retrieval(args.model, args.data, "train", args.calibration, args.device)
    except ValueError as err:
        if "not in" not in str(err):
            raise
        if args.limit is None:
            raise ValueError(f"{err}: give --limit so that calibration images can be held out of the "
                             f"{args.split} split") from None
        after = args.skip + args.limit
        job = load_retrieval(args.model, args.data, args.split, args.calibration, args.device, skip=after)
        if len(job.split) < args.calibration:
            raise ValueError(f"only {len(job.split)} {args.split} images after the first {after} for "
                             f"--calibration {args.calibration}") from None
        print(f"calibration: {len(job.split)} {args.split} images after the {after} skipped or evaluated ones")
    pixels = job.inputs["pixel_values"]
    return [{"name": f"{v}+calibrated flops={level:g}", "variant": f"{v}+calibrated",
             **calibrated_settings(job.model, pixels, level, VARIANTS[v], args.calibration_evals)}
            for level in tqdm(args.levels, desc="calibrating", mininterval=10) for v in args.calibrated]


def train_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/shapes/dataset_shapes.json", help="Karpathy-format annotation file")
    p.add_argument("--out", default="crossget/assets/default", help="where the model is saved")
    p.add_argument("--epochs", type=int_at_least(1), default=8)
    p.add_argument("--batch", type=int_at_least(2), default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=2)
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


    torch.set_num_threads(args.threads)
    _, log = train_base_on(
        args.data, args.out, init_from=args.init, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
        seed=args.seed, max_minutes=args.max_minutes, scene_weight=args.scene_weight,
        sincos_positions=args.sincos_positions, scene_only_steps=args.scene_only_steps,
        text_scene_weight=args.text_scene_weight, text_warmup_steps=args.text_warmup_steps,
    )
    save_training_log(args, log)
    print(f"saved the model to {args.out} after {log['train_seconds'] / 60:.1f} min")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    retrieval_arguments(p)
    p.set_defaults(split="train")
    p.add_argument("--method", choices=("crossget",), default="crossget")
    p.add_argument("--r", type=non_negative_int, default=None)
    p.add_argument("--flops", type=ratio, default=0.58)
    p.add_argument("--cross-weight", type=unit_float, default=0.5, help="w in (1 - w) L_task + w L_cross, in [0, 1]")
    p.add_argument("--steps", type=int_at_least(1), default=300)
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--all-weights", action="store_true",
                   help="fine-tune every weight too (saved to OUT/model), not only the cross tokens")
    p.add_argument("--weights-lr", type=positive_float, default=1e-4, help="learning rate of the weights with --all-weights")
    p.add_argument("--out", default="runs/cross-tokens", help="checkpoints and cross_tokens.safetensors")
    p.add_argument("--no-resume", dest="resume", action="store_false")


def train(args: argparse.Namespace) -> int:
    """Learn the cross tokens (docs/method.md §3) of a model patched with CrossGET; resumable, via accelerate."""


    torch.set_num_threads(args.threads)
    _, log = train_cross_tokens_on(
        args.model, args.data, args.out, split=args.split, limit=args.limit, method=args.method, r=args.r,
        flops=None if args.r is not None else args.flops, cross_weight=args.cross_weight, steps=args.steps,
        batch_size=args.batch, lr=args.lr, all_weights=args.all_weights, weights_lr=args.weights_lr,
        resume=args.resume,
    )
    save_training_log(args, log)
    print(f"wrote {os.path.join(args.out, 'cross_tokens.safetensors')}"
          + (f" and the fine-tuned model to {os.path.join(args.out, 'model')}" if args.all_weights else ""))
    return 0



def train_dual_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision", required=True, help="pretrained vision model folder (e.g. crossget weights get dinov2-s)")
    p.add_argument("--text", required=True, help="pretrained text model folder (e.g. crossget weights get minilm-l6)")
    p.add_argument("--data", required=True, help="Karpathy-format JSON with train and test splits (e.g. crossget data-real)")
    p.add_argument("--out", required=True, help="where the VisionTextDualEncoderModel and training.json go")
    p.add_argument("--projection-dim", type=int_at_least(1), default=256)
    p.add_argument("--steps", type=int_at_least(1), default=2000)
    p.add_argument("--batch", type=int_at_least(2), default=256, help="images per contrastive batch")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=2)


def train_dual(args: argparse.Namespace) -> int:
    """LiT-style dual encoder: frozen pretrained towers, trained projections; test-split recall."""
    torch.set_num_threads(args.threads)
    record = train_dual_encoder(args.vision, args.text, args.data, args.out, projection_dim=args.projection_dim,
                                steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed)
    test = record["test"]
    print(f"test ({record['test_images']} images, {record['test_captions']} captions): "
          + ", ".join(f"{k} {test[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")))
    print(f"wrote {args.out} (training.json: settings, losses, time)")
    return 0
