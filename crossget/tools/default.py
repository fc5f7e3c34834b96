"""The shipped default model (a small CLIP trained on generated shapes) and its data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.tools.data.karpathy import RetrievalSplit, load_karpathy, preprocess

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


@dataclass
class RetrievalData:
    """A CLIP model with the split it is evaluated on, preprocessed (tensors on the model's device)."""

    model: nn.Module
    processor: Any
    split: RetrievalSplit
    inputs: dict[str, torch.Tensor]  # pixel_values [I, 3, H, W], input_ids / attention_mask [T, L]


def load_retrieval(
    model: str = "default", data: str = "default", split: str = "test", limit: int | None = None,
    device: str | torch.device = "cpu", skip: int = 0,
) -> RetrievalData:
    """The model (``"default"``: the shipped one, else a ``CLIPModel`` folder), its processor and
    the Karpathy ``split`` of ``data`` (``"default"``: the generated shapes, made on first use;
    ``limit`` images after the first ``skip``), preprocessed at the text tower's length."""
    clip, processor = load_default(None if model == "default" else model)
    annotation = default_annotation() if data == "default" else data
    pairs = load_karpathy(annotation, split=split, limit=limit, skip=skip)
    inputs = preprocess(pairs, processor, clip.config.text_config.max_position_embeddings)
    return RetrievalData(clip.to(device), processor, pairs, {k: v.to(device) for k, v in inputs.items()})


def trained_cross_tokens(model: str, cross_tokens: str | None) -> str | None:
    """``cross_tokens`` as given, or for ``"default"`` the model folder's ``cross_tokens.safetensors``
    (None when it has none)."""
    if cross_tokens != "default":
        return cross_tokens
    path = os.path.join(ASSETS if model == "default" else model, "cross_tokens.safetensors")
    return path if os.path.isfile(path) else None
