"""NLVR2 (is the sentence true of the image pair?) with a BLIP image-text matching model.

    model, processor = load_blip("models/blip-itm-base-coco", BlipForImageTextRetrieval)
    data = load_nlvr2("nlvr2/dev.json", image_root="nlvr2/dev")
    result = evaluate_nlvr2(model, processor, data)        # accuracy, gflops, examples_per_s

File: the official NLVR2 JSON lines, one object per line with ``identifier``, ``sentence`` and
``label`` ("True"/"False"); the two images of ``dev-850-0-0`` are ``dev-850-0-img0.png`` (left)
and ``dev-850-0-img1.png`` (right) under ``image_root`` (in the train split under the line's
``directory``), as the official release names them.

What decides (there is no NLVR2 head in transformers): BLIP's NLVR2 model is a separately
fine-tuned two-image encoder that Hugging Face does not port. This harness scores the sentence
against each image with the ITM head of ``BlipForImageTextRetrieval`` (the model's own forward,
``use_itm_head=True``), takes the softmax "match" probability of each, combines the two
(``combine``: "mean" by default, or "min" or "max") and predicts True when the combination is at
least ``threshold`` (0.5). It is a zero-shot proxy, written into the result JSON as
``decision``; its accuracy is not comparable with the fine-tuned NLVR2 numbers of BLIP or
CrossGET, but its change under merging measures what merging costs this model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BlipForImageTextRetrieval

from crossget.tools.common import ModelClock, device_dtype
from crossget.tools.eval.blip_common import check_images, check_model, gflops_of, malformed, open_rgb, require_fields
from crossget.tools.eval.runner import run_task

WHAT = "NLVR2 JSON-lines file"
COMBINE = ("mean", "min", "max")
LABELS = {"true": True, "false": False}


@dataclass
class NLVR2Set:
    """Examples in file order: sentence, label, left and right image files."""

    identifiers: list[str]
    sentences: list[str]
    labels: list[bool]
    left: list[Path]
    right: list[Path]
    source: str = ""

    def __len__(self) -> int:
        return len(self.identifiers)


def image_pair(identifier: str) -> tuple[str, str]:
    """``("dev-850-0-img0.png", "dev-850-0-img1.png")`` for ``dev-850-0-0`` (the official naming)."""
    stem, sep, _ = identifier.rpartition("-")
    if not sep or not stem:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not of the form <split>-<set>-<pair>-<sentence>")
    return f"{stem}-img0.png", f"{stem}-img1.png"


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return LABELS.get(str(value).strip().lower())


def load_nlvr2(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, limit: int | None = None, check: bool = True
) -> NLVR2Set:
    """Read an NLVR2 JSON-lines file (default image root: the file's folder).

    Raises:
        FileNotFoundError: the file or (with ``check``) images are missing.
        ValueError: a line that is not JSON, lacks a field, or has a label other than True/False.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{WHAT} not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    data = NLVR2Set([], [], [], [], [], str(path))
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(data) >= limit:
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise malformed(path, WHAT, f"line {n} is not JSON ({err})") from None
            require_fields(entry, ("identifier", "sentence", "label"), path, WHAT, f"line {n}")
            label = _label(entry["label"])
            if label is None:
                raise malformed(path, WHAT, f'line {n} has label {entry["label"]!r}, expected "True" or "False"')
            try:
                left, right = image_pair(str(entry["identifier"]))
            except ValueError as err:
                raise malformed(path, WHAT, f"line {n}: {err}") from None
            folder = root / str(entry["directory"]) if "directory" in entry else root
            data.identifiers.append(str(entry["identifier"]))
            data.sentences.append(str(entry["sentence"]))
            data.labels.append(label)
            data.left.append(folder / left)
            data.right.append(folder / right)
    if not len(data):
        raise malformed(path, WHAT, "no examples")
    if check:
        check_images(sorted(set(data.left + data.right)), path)
    return data


def combine_probs(left: torch.Tensor, right: torch.Tensor, combine: str = "mean") -> torch.Tensor:
    """One score per example from the two images' match probabilities ``[B]``."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if combine == "mean":
        return (left + right) / 2
    return torch.minimum(left, right) if combine == "min" else torch.maximum(left, right)


def accuracy(predictions: Sequence[bool], labels: Sequence[bool]) -> float:
    """Percent of predictions equal to their label."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (> 0), got {len(predictions)} and {len(labels)}")
    return 100 * sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def itm_inputs(model: nn.Module, processor: Any, images: list, sentences: list[str]) -> dict[str, torch.Tensor]:
    """Processor tensors of (image, sentence) pairs on the model's device (sentences padded to the longest)."""
    device, dtype = device_dtype(model)
    inputs = processor(images=images, text=sentences, return_tensors="pt", padding=True)
    return {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device),
            "pixel_values": inputs["pixel_values"].to(device, dtype)}


@torch.inference_mode()
def match_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Softmax ITM "match" probability ``[B]`` of each pair of :func:`itm_inputs`, through the model's forward."""
    return model(**inputs, use_itm_head=True).itm_score.float().softmax(-1)[:, 1].cpu()


def pair_gflops(model: nn.Module, processor: Any, left, right, sentence: str) -> float:
    """GFLOPs of deciding one example: the sentence against both images."""
    return gflops_of(match_probs, model, itm_inputs(model, processor, [left, right], [sentence] * 2))


def evaluate_nlvr2(
    model: nn.Module,
    processor: Any,
    data: NLVR2Set,
    batch_size: int = 16,
    combine: str = "mean",
    threshold: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of the ITM proxy (see the module doc), GFLOPs per example, examples/s.

    Returns ``accuracy`` (percent), ``true_share`` (percent of True labels: the majority baseline is
    ``max(true_share, 100 - true_share)``), ``gflops`` (both images of the first example),
    ``examples_per_s`` (model time, not image decoding), ``decision`` and per-example ``results``.
    """
    check_model(model, BlipForImageTextRetrieval)
    combine_probs(torch.zeros(1), torch.zeros(1), combine)  # validate before the long part
    device, _ = device_dtype(model)
    clock = ModelClock(device)
    left_p, right_p = [], []
    for s in tqdm(range(0, len(data), batch_size), desc="NLVR2", disable=not progress):
        images = [open_rgb(p) for p in data.left[s : s + batch_size] + data.right[s : s + batch_size]]
        sentences = data.sentences[s : s + batch_size]
        inputs = itm_inputs(model, processor, images, sentences * 2)  # lefts, then rights
        with clock:
            probs = match_probs(model, inputs)
        left_p.append(probs[: len(sentences)])
        right_p.append(probs[len(sentences) :])
    left, right = torch.cat(left_p), torch.cat(right_p)
    scores = combine_probs(left, right, combine)
    predictions = (scores >= threshold).tolist()
    return {
        "accuracy": accuracy(predictions, data.labels),
        "true_share": 100 * sum(data.labels) / len(data),
        "gflops": pair_gflops(model, processor, open_rgb(data.left[0]), open_rgb(data.right[0]), data.sentences[0]),
        "examples_per_s": clock.rate(len(data)),
        "seconds": clock.seconds,
        "examples": len(data),
        "decision": (f"zero-shot proxy: BlipForImageTextRetrieval ITM match probability of the sentence with "
                     f"each image, {combine} of the two >= {threshold} -> True (no NLVR2 head in transformers)"),
        "combine": combine,
        "threshold": threshold,
        "results": [
            {"identifier": i, "prediction": p, "label": y, "p_left": float(a), "p_right": float(b)}
            for i, p, y, a, b in zip(data.identifiers, predictions, data.labels, left.tolist(), right.tolist())
        ],
    }


@dataclass(frozen=True)
class NLVR2Task:
    """NLVR2 (the ITM proxy of the module doc) as a :class:`~crossget.tools.eval.runner.BlipTask`;
    ``options`` are :func:`evaluate_nlvr2`'s (``batch_size``, ``combine``, ``threshold``)."""

    name = "nlvr2"
    model_class = BlipForImageTextRetrieval
    result_keys = ("accuracy", "examples_per_s")
    results_file = False  # the per-example results stay in the result JSON

    def load(self, path: str | os.PathLike, image_root: str | os.PathLike | None, limit: int | None) -> NLVR2Set:
        return load_nlvr2(path, image_root, limit)

    def describe(self) -> dict[str, Any]:
        return {}

    def sample_gflops(self, model: nn.Module, processor: Any, data: NLVR2Set, options: Mapping[str, Any]) -> float:
        return pair_gflops(model, processor, open_rgb(data.left[0]), open_rgb(data.right[0]), data.sentences[0])

    def evaluate(self, model: nn.Module, processor: Any, data: NLVR2Set, progress: bool,
                 options: Mapping[str, Any]) -> dict[str, Any]:
        return evaluate_nlvr2(model, processor, data, progress=progress, **options)


NLVR2 = NLVR2Task()


def run_nlvr2(model_dir: str | os.PathLike, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Load a local ``BlipForImageTextRetrieval`` and an NLVR2 file, evaluate one config, write JSON
    (:func:`~crossget.tools.eval.runner.run_task`: ``image_root``, ``limit``, ``method``, ...; the rest
    go to :func:`evaluate_nlvr2`)."""
    return run_task(NLVR2, model_dir, path, **kwargs)
