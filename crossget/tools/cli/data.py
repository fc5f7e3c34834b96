"""``crossget data`` and ``crossget data-qa``: the generated shapes data sets."""

from __future__ import annotations

import argparse
import os

from crossget.tools.cli.options import int_at_least, int_range
from crossget.tools.data.shapes import generate_dataset
from crossget.tools.data.shapes_qa import IMAGE_PATTERN, write_qa


def data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/shapes", help="output folder (default data/shapes)")
    p.add_argument("--train", type=int_at_least(0), default=8000, help="training images (default 8000)")
    p.add_argument("--val", type=int_at_least(0), default=400, help="validation images (default 400)")
    p.add_argument("--test", type=int_at_least(0), default=1000, help="test images (default 1000)")
    p.add_argument("--image-size", type=int_at_least(32), default=96, help="pixels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int_at_least(1), default=1, help="processes drawing images (same files for any number)")
    p.add_argument("--object-scale", type=float, default=1.0, help="shape size factor, 1 to 1.25 (default 1)")
    p.add_argument("--clutter", type=int_at_least(0), default=0, help="coloured specks per image (default 0)")
    p.add_argument("--entities", type=int_range, default=(2, 3), metavar="MIN-MAX",
                   help="entities per scene, 2 to 4 (default 2-3)")


def data(args: argparse.Namespace) -> int:
    """Generate the shapes retrieval data set (PNG images + Karpathy-format JSON)."""
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
    summary = write_qa(args.data, args.out, seed=args.seed)
    for split, s in summary.items():
        print(f"{split}: {s['questions']} questions about {s['images']} images -> {os.path.join(args.out, split)}")
    images = os.path.join(os.path.dirname(args.data), "images")
    print(f"evaluate with --images {images} (VQA: --image-pattern '{IMAGE_PATTERN}')")
    return 0
