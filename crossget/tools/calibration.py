"""``crossget calibrate``: a per-layer schedule chosen on unlabelled images
(:func:`crossget.calibrate`), beside the constant schedule at the same FLOPs target.

Loads a model folder and its image processor, reads the first ``n`` images of a folder (sorted
paths) or of a Karpathy-format split, runs the search and writes one JSON: the patch config to
replay (``crossget.patch_from_config``), both schedules with their objective (mean cosine of
the pooled embedding to the unreduced one), their analytic FLOPs estimate and the GFLOPs the
embedding measures (``torch.utils.flop_counter``, one image), the evaluations and the seconds.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.api import config, patch_from_config
from crossget.calibration import DEFAULT_MAX_EVALS, CalibrationResult, default_embed, search_schedule
from crossget.flops import count_flops
from crossget.io import apply
from crossget.tools.common import write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def image_paths(source: str | os.PathLike, n: int, split: str = "train") -> list[Path]:
    """The first ``n`` images of a folder (recursively, sorted paths) or of ``split`` of a
    Karpathy-format JSON.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: it holds no image.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:n]
    elif source.is_file():
        from crossget.tools.data.karpathy import load_karpathy

        paths = list(load_karpathy(source, split=split, limit=n, captions_per_image=None).image_paths)
    else:
        raise FileNotFoundError(f"images not found: {source} (an image folder or a Karpathy JSON)")
    if not paths:
        raise ValueError(f"no images in {source}")
    return paths


def load_pixels(paths: Sequence[Path], processor: Any, image_size: int | None = None) -> torch.Tensor:
    """``[B, 3, S, S]`` pixel values through the model's image processor; resized (bicubic) to
    ``image_size`` when given and the processor gives another size."""
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        pixels = nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bicubic", antialias=True,
                                           align_corners=False)
    return pixels


def calibrated_settings(model: nn.Module, pixels: torch.Tensor, flops: float, settings: dict[str, Any],
                        max_evals: int, **patch_kwargs: Any) -> dict[str, Any]:
    """``settings`` (patch keywords with ``method``) plus the per-layer ``r`` that
    :func:`crossget.calibrate` finds at ``flops`` on ``pixels`` ``[B, 3, H, W]`` (images apart
    from the evaluated ones), ready for :func:`crossget.io.apply`; ``model`` is left unpatched.
    ``patch_kwargs`` go to the search and into the result (``image_size``, ...)."""
    from crossget.calibration import calibrate

    rest = {k: v for k, v in settings.items() if k != "method"}
    calibrate(model, {"pixel_values": pixels}, flops, method=settings["method"], max_evals=max_evals, **rest,
              **patch_kwargs)
    found = config(model)
    apply(model, None)
    return {**settings, **patch_kwargs, "r": {k: list(v) for k, v in found.r.items()}, "schedule": "calibrated"}


def load_model(folder: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model in eval mode, image processor)`` of a Hugging Face folder (``AutoModel``; a
    ``VisionTextDualEncoderModel`` as such)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, VisionTextDualEncoderModel

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    dual = AutoConfig.from_pretrained(folder).model_type == "vision-text-dual-encoder"
    model = (VisionTextDualEncoderModel if dual else AutoModel).from_pretrained(folder).eval()
    return model, AutoImageProcessor.from_pretrained(folder)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(model: nn.Module, pixels: torch.Tensor) -> dict[str, Any]:
    """``{"pixel_values"}``, with ``interpolate_pos_encoding=True`` when the images are not the
    size the model was configured for and its forward takes the flag (ViT, CLIP, SigLIP)."""
    inputs: dict[str, Any] = {"pixel_values": pixels}
    cfg = getattr(model.config, "vision_config", model.config)
    size = getattr(cfg, "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    fn = model.get_image_features if callable(getattr(model, "get_image_features", None)) else model.forward
    if size is not None and pixels.shape[-1] != size and _takes(fn, "interpolate_pos_encoding"):
        inputs["interpolate_pos_encoding"] = True
    return inputs


def embedding_gflops(model: nn.Module, inputs: dict[str, Any]) -> float:
    """GFLOPs of the default embedding of one example (the first of ``inputs``)."""
    one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        return count_flops(lambda: default_embed(model, one)) / 1e9


def run_calibration(
    model_dir: str | os.PathLike,
    images: str | os.PathLike,
    flops: float,
    *,
    method: str = "crossget",
    n: int = 64,
    split: str = "train",
    image_size: int | None = None,
    max_evals: int = DEFAULT_MAX_EVALS,
    batch_size: int = 32,
    out: str | os.PathLike | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    **patch_kwargs: Any,
) -> dict[str, Any]:
    """Calibrate the model in ``model_dir`` on ``n`` images of ``images`` at ``flops``; returns
    (and writes to ``out`` when given) ``{"config", "target", "constant", "calibrated",
    "evaluations", "seconds", "gflops", "model", "images", "n"}``."""
    t0 = time.perf_counter()
    model, processor = load_model(model_dir)
    paths = image_paths(images, n, split)
    pixels = load_pixels(paths, processor, image_size)
    inputs = model_inputs(model, pixels)
    planned = int(pixels.shape[-1])  # the FLOPs are planned at the size the images have
    result: CalibrationResult = search_schedule(model, inputs, flops, method=method, max_evals=max_evals,
                                                batch_size=batch_size, progress=progress, image_size=planned,
                                                **patch_kwargs)
    saved = config(model)
    calibrated_gflops = embedding_gflops(model, inputs)
    constant_cfg = saved.replace(r={k: tuple(v) for k, v in result.constant.items()}, schedule="constant",
                                 flops_estimate=result.constant_estimate)
    patch_from_config(model, constant_cfg)
    constant_gflops = embedding_gflops(model, inputs)
    apply(model, None)
    unreduced_gflops = embedding_gflops(model, inputs)
    patch_from_config(model, saved)  # leave the model calibrated
    payload = {
        "config": saved.to_dict(),
        **result.to_dict(),
        "gflops": {"unreduced": unreduced_gflops, "constant": constant_gflops, "calibrated": calibrated_gflops},
        "model": str(model_dir), "images": str(images), "n": len(paths), "image_size": planned,
        "total_seconds": time.perf_counter() - t0,
    }
    if out is not None:
        write_json(out, payload)
    return payload


def schedule_table(payload: dict[str, Any]) -> str:
    """Markdown: per-layer ``r`` of the constant and the calibrated schedule, then their
    estimate, measured GFLOPs of the embedding and objective."""
    const, cal = payload["constant"], payload["calibrated"]
    lines = []
    for tower in cal["r"]:
        rc, rk = const["r"][tower], cal["r"][tower]
        lines += [f"{tower} tower, r per layer:", "", "| layer | " + " | ".join(map(str, range(len(rk)))) + " |",
                  "|---" * (len(rk) + 1) + "|",
                  "| constant | " + " | ".join(map(str, rc)) + " |",
                  "| calibrated | " + " | ".join(map(str, rk)) + " |", ""]
    g = payload["gflops"]
    lines += ["| schedule | FLOPs estimate | embedding GFLOPs (1 image) | objective (mean cos) |",
              "|---|---|---|---|",
              f"| unreduced | 1.000 | {g['unreduced']:.4f} | 1 |",
              f"| constant | {const['flops_estimate']:.4f} | {g['constant']:.4f} | {const['objective']:.6f} |",
              f"| calibrated | {cal['flops_estimate']:.4f} | {g['calibrated']:.4f} | {cal['objective']:.6f} |",
              "", f"target {payload['target']}, {payload['n']} images at {payload['image_size']} px, "
                  f"{payload['evaluations']} evaluations, {payload['seconds']:.1f} s"]
    return "\n".join(lines)
