"""The shipped default model (a small CLIP trained on generated shapes) and its data."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

ASSETS = Path(__file__).parents[1] / "assets" / "default"
CROSS_TOKENS = ASSETS / "cross_tokens.safetensors"
DATA_DIR = Path("data/shapes")  # full data set: `crossget data`
TEST_DIR = Path("data/shapes-test")  # test split only, generated on demand


def load_default(path: str | os.PathLike | None = None) -> tuple[nn.Module, object]:
    """``(CLIPModel, CLIPProcessor)`` from ``path`` or the shipped default model (eval mode).

    Raises:
        FileNotFoundError: no model at the path.
    """
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path) if path is not None else ASSETS
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json and model.safetensors)")
    model = CLIPModel.from_pretrained(path).eval()
    return model, CLIPProcessor.from_pretrained(path)


def default_annotation(progress: bool = True) -> Path:
    """The shapes annotation file: the full set if generated, else the test split, made now."""
    full = DATA_DIR / "dataset_shapes.json"
    if full.is_file():
        return full
    test = TEST_DIR / "dataset_shapes.json"
    if not test.is_file():
        from crossget.tools.data.shapes import generate_dataset

        if progress:
            print(f"generating the shapes test split into {TEST_DIR} (once)")
        generate_dataset(TEST_DIR, 0, 0, 1000, image_size=96, seed=0)
    return test
