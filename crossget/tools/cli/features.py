"""``crossget eval features``: what merging does to real pretrained features (every method and
guidance variant at the same FLOPs levels; :mod:`crossget.tools.eval.features`)."""

from __future__ import annotations

import argparse

import torch

from crossget.tools.cli.options import choice, comma_list, command_line, int_at_least, ratio, vars_meta
from crossget.tools.eval.features import LEVELS, VARIANTS, feature_sweep, load_feature_set, write_sweep


def eval_features_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a VisionTextDualEncoderModel folder (crossget train-dual; adds retrieval) or a vision tower "
                        "folder (crossget weights get dinov2-s)")
    p.add_argument("--data", default="data/real/dataset_real.json", help="Karpathy-format annotation (crossget data-real)")
    p.add_argument("--classes", default="data/real/classes_real.json", help="the labels of the same images")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int_at_least(20), default=None, help="first N images of the split (after --skip)")
    p.add_argument("--skip", type=int_at_least(0), default=0,
                   help="leave out the first N images of the split (a second, disjoint subset)")
    p.add_argument("--levels", type=comma_list(ratio, "ratios"), default=list(LEVELS),
                   help="GFLOPs targets (default 0.8,0.7,0.58,0.5,0.4)")
    p.add_argument("--variants", type=comma_list(choice(tuple(VARIANTS)), "variants"), default=list(VARIANTS),
                   help=f"methods and guidance variants (default all: {','.join(VARIANTS)})")
    p.add_argument("--calibrated", type=comma_list(choice(tuple(VARIANTS)), "variants"), default=[],
                   help="variants also run with a per-level calibrated schedule (crossget.calibrate)")
    p.add_argument("--calibration", type=int_at_least(4), default=32,
                   help="calibration images: the first N of the train split (default 32)")
    p.add_argument("--calibration-evals", type=int_at_least(2), default=24, help="evaluations per calibration")
    p.add_argument("--image-size", type=int_at_least(14), default=224, help="the size the processor gives")
    p.add_argument("--batch", type=int_at_least(1), default=32)
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--out", default="benchmarks/real-features", help="folder for features.json/.md/.png")
    p.add_argument("--stem", default="features", help="file name stem of the outputs")


def eval_features(args: argparse.Namespace) -> int:
    """Pooled and patch fidelity, 10-NN accuracy and retention (and retrieval Recall@K with a dual
    encoder) of every variant at every FLOPs level, on two halves of the images as well."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, VisionTextDualEncoderModel

    torch.set_num_threads(args.threads)
    dual = AutoConfig.from_pretrained(args.model).model_type == "vision-text-dual-encoder"
    model = (VisionTextDualEncoderModel if dual else AutoModel).from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model) if dual else None
    fs = load_feature_set(args.data, args.classes, args.split, args.limit, args.skip)
    print(f"{len(fs.paths)} {args.split} images, {len(args.variants)} variants x {len(args.levels)} levels, "
          f"{torch.get_num_threads()} threads")
    cal = load_feature_set(args.data, args.classes, "train", args.calibration).paths if args.calibrated else []
    result = feature_sweep(model, processor, fs, levels=args.levels, variants=args.variants, tokenizer=tokenizer,
                           image_size=args.image_size, batch_size=args.batch, calibrated=args.calibrated,
                           calibration=cal, calibration_evals=args.calibration_evals)
    result["meta"] |= {"model": args.model, "data": args.data, "split": args.split, "command": command_line(),
                       "args": vars_meta(args)}
    paths = write_sweep(result, args.out, args.stem)
    print(paths[1].read_text())
    print(f"{result['meta']['seconds'] / 60:.1f} min; wrote " + ", ".join(map(str, paths)))
    return 0
