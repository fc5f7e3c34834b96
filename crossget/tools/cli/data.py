"""``crossget data`` and ``crossget data-qa``: the generated shapes data sets; ``crossget data-real``: real
pictures with captions from Debian packages."""

from __future__ import annotations

import argparse
import os

from crossget.tools.cli.options import comma_list, int_at_least, int_range
from crossget.tools.data.real_images import FRACTIONS, build_real_dataset
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


def data_real_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("tuxpaint", "emoji", "both"), default="both",
                   help="Tux Paint stamps, Noto colour emoji or both (default both)")
    p.add_argument("--out", default="data/real", help="output folder (default data/real)")
    p.add_argument("--photos-only", action="store_true", help="only the photo-like stamps (with --source tuxpaint)")
    p.add_argument("--size", type=int_at_least(16), default=224, help="square image side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--fractions", type=comma_list(float, "numbers"), default=list(FRACTIONS), metavar="TRAIN,VAL,TEST",
                   help="split shares (default 0.7,0.1,0.2)")
    p.add_argument("--debs", default=None, help="folder with the .deb files, or to download them into (default: temporary)")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="processes converting images (same files for any number)")


def data_real(args: argparse.Namespace) -> int:
    """Fetch Debian's Tux Paint stamps and / or Noto colour emoji (apt-get download + dpkg -x) and write
    their captioned images as a Karpathy-format retrieval set and a classification set."""
    s = build_real_dataset(args.out, args.source, size=args.size, seed=args.seed, photos_only=args.photos_only,
                           fractions=args.fractions, debs=args.debs, workers=args.workers)
    for name, r in s["sources"].items():
        extra = f", {r['photo-like']} photo-like" if "photo-like" in r else ""
        skipped = ", ".join(f"{n} {k}" for k, n in r["skipped"].items()) or "none"
        print(f"{name}: {r['images']} images, {r['captions']} captions, {r['classes']} classes{extra}; skipped: {skipped}")
    print(f"splits {s['splits']}; {s['seconds']} s, {s['bytes'] / 2**20:.1f} MiB")
    print(f"wrote {s['karpathy']} and {s['classification']}")
    return 0
