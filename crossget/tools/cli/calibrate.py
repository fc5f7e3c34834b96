"""``crossget calibrate``: a per-layer merging schedule chosen on unlabelled images at a FLOPs
target, compared with the constant schedule (:mod:`crossget.tools.calibration`)."""

from __future__ import annotations

import argparse

import torch

from crossget.calibration import DEFAULT_MAX_EVALS
from crossget.config import GUIDANCE, IMPORTANCE
from crossget.tools.cli.options import command_line, int_at_least, ratio, vars_meta
from crossget.tools.common import write_json


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face model folder (AutoModel: CLIP, SigLIP, ViT, "
                                                  "DINOv2, a VisionTextDualEncoderModel, ...)")
    p.add_argument("--images", required=True,
                   help="an image folder (its first --n images, sorted paths) or a Karpathy-format JSON (--split)")
    p.add_argument("--split", default="train", help="split of a Karpathy JSON (default train: keep test images out)")
    p.add_argument("--flops", type=ratio, required=True, help="target GFLOPs ratio, e.g. 0.58")
    p.add_argument("--method", choices=("crossget", "tome"), default="crossget")
    p.add_argument("--importance", choices=IMPORTANCE, default="cross", help="CrossGET's importance (default cross)")
    p.add_argument("--guidance", choices=GUIDANCE, default="reference", help="CrossGET's guidance (default reference)")
    p.add_argument("--n", type=int_at_least(1), default=64, help="calibration images (default 64)")
    p.add_argument("--image-size", type=int_at_least(8), default=None,
                   help="resize the processor's pixels to this side (default: the processor's size)")
    p.add_argument("--max-evals", type=int_at_least(2), default=DEFAULT_MAX_EVALS,
                   help=f"model evaluations at most, reference and start included (default {DEFAULT_MAX_EVALS})")
    p.add_argument("--batch", type=int_at_least(1), default=32, help="images per forward (default 32)")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="schedule.json", help="output JSON (default schedule.json)")
    p.add_argument("--quiet", action="store_true", help="no line per evaluation")


def calibrate(args: argparse.Namespace) -> int:
    """Search per-layer r on unlabelled images that keeps the pooled embedding closest to the
    unreduced one at a FLOPs target; print it beside the constant schedule and write the patch
    config (crossget.patch_from_config replays it) with both objectives to --out."""
    from crossget.tools.calibration import run_calibration, schedule_table

    torch.set_num_threads(args.threads)
    extra = {}
    if args.method == "crossget":
        extra = {"importance": args.importance, "guidance": args.guidance}
    elif (args.importance, args.guidance) != ("cross", "reference"):
        raise ValueError("--importance and --guidance are CrossGET settings (--method crossget)")

    def progress(evals: int, objective: float, best: float) -> None:
        print(f"evaluation {evals:3d}: objective {objective:.6f}, best {best:.6f}", flush=True)

    payload = run_calibration(args.model, args.images, args.flops, method=args.method, n=args.n, split=args.split,
                              image_size=args.image_size, max_evals=args.max_evals, batch_size=args.batch,
                              progress=None if args.quiet else progress, **extra)
    payload |= {"command": command_line(), "args": vars_meta(args)}
    path = write_json(args.out, payload)
    print(schedule_table(payload))
    print(f"wrote {path}")
    return 0
