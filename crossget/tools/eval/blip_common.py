"""Shared pieces of the BLIP evaluation harnesses (``itm_retrieval``, ``caption``, ``vqa``, ``nlvr2``).

Loading a local BLIP model and its processor, reading the data files with errors that name the
path, patching for one config, counting GFLOPs, and the summary line of a result. The job they
make up (load, unreduced GFLOPs, patch, evaluate, write the JSON) is
:func:`crossget.tools.eval.runner.run_task`; each harness module only adds its data format, its
model calls and its metric.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoProcessor

from crossget.api import config
from crossget.config import PatchConfig
from crossget.families.blip import FAMILY as BLIP
from crossget.flops import count_flops
from crossget.io import apply
from crossget.tools.common import read_json

METHODS = BLIP.methods


# --------------------------------------------------------------------------- files
def malformed(path: str | os.PathLike, what: str, problem: str) -> ValueError:
    """The error for a file that parses but does not have the expected fields."""
    return ValueError(f"{path} is not a valid {what}: {problem}")


def require_fields(entry: Any, fields: Sequence[str], path: str | os.PathLike, what: str, where: str) -> None:
    """Check that ``entry`` is an object holding ``fields``; the error names ``path`` and ``where``."""
    if not isinstance(entry, dict):
        raise malformed(path, what, f"{where} is not an object")
    for key in fields:
        if key not in entry:
            raise malformed(path, what, f'{where} has no "{key}"')


def check_images(paths: Sequence[Path], source: str | os.PathLike) -> None:
    """Fail up front if images are missing (names a few and where they were looked for)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = ", ..." if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images named by {source} are missing: {shown}{more}")


def open_rgb(path: Path) -> Image.Image:
    """A PIL RGB image; FileNotFoundError/ValueError name the path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image file: {path}") from None


# --------------------------------------------------------------------------- models
def load_blip(path: str | os.PathLike, cls: type) -> tuple[nn.Module, Any]:
    """``(model, processor)`` of a local BLIP folder (``save_pretrained`` layout), model in eval mode.

    The folder's ``config.json`` must name ``cls`` among its ``architectures``: loading another head
    into ``cls`` would silently start the missing modules from random weights.

    Raises:
        FileNotFoundError: no model at ``path``.
        TypeError: the folder holds another architecture.
    """
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json and model.safetensors)")
    archs = read_json(cfg, "model config").get("architectures") or []
    if cls.__name__ not in archs:
        raise TypeError(f"{path} holds {', '.join(archs) or 'an unnamed architecture'}; this evaluation needs "
                        f"{cls.__name__}")
    model = cls.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)


def check_model(model: nn.Module, cls: type) -> None:
    """TypeError unless ``model`` is a ``cls`` (a patched model still is)."""
    if not isinstance(model, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(model).__name__}")


def apply_method(
    model: nn.Module,
    method: str,
    r: int | None = None,
    flops: float | None = None,
    towers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Patch ``model`` for one config (``none`` = the stock model) and describe it for the result JSON.

    Raises:
        ValueError: unknown method, or a reducing method without ``r``/``flops``.
        TypeError: ``crossget.patch`` does not support the model class.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "none":
        apply(model, None)
        return {"method": "none", "r": None, "flops_target": None, "schedule": {}}
    if r is None and flops is None:
        raise ValueError(f"method {method!r} needs r (tokens per layer) or flops (a target GFLOPs ratio)")
    settings = PatchConfig(method=method, r=r, flops=flops, towers=tuple(towers) if towers else None)
    cfg = config(apply(model, settings))
    return {"method": method, "r": r, "flops_target": flops, "schedule": cfg.to_dict()["r"], "towers": list(cfg.towers),
            "flops_estimate": cfg.flops_estimate}


def gflops_of(fn: Callable[..., Any], *args, **kwargs) -> float:
    """GFLOPs of one call (no gradients), measured with :func:`crossget.flops.count_flops`."""
    with torch.inference_mode():
        return count_flops(fn, *args, **kwargs) / 1e9


def summary_line(result: Mapping[str, Any], keys: Sequence[str]) -> str:
    """One human-readable line of the main numbers of a result."""
    parts = []
    for k in keys:
        v = result.get(k)
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif v is not None:
            parts.append(f"{k} {v}")
    return ", ".join(parts)
