"""Trained cross tokens on disk (safetensors, with the patch settings), and :func:`apply`:
put a model in the state a saved configuration describes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from crossget.api import config, is_patched, patch_from_config, states, unpatch
from crossget.config import PatchConfig, as_config

FORMAT = "crossget.cross_tokens.v1"


def save_cross_tokens(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every tower's cross tokens ``[layers, C]`` and the patch settings to ``path``."""
    if not is_patched(model):
        raise ValueError("save_cross_tokens needs a model patched with method='crossget'")
    tensors = {
        kind: st.cross_tokens.detach().cpu().contiguous()
        for kind, st in states(model).items()
        if st.cross_tokens is not None
    }
    if not tensors:
        raise ValueError("the model has no cross tokens (patch it with method='crossget')")
    meta = {"format": FORMAT, "config": json.dumps(config(model).to_dict())}
    save_file(tensors, os.fspath(path), metadata=meta)


def load_cross_tokens(model: nn.Module, path: str | os.PathLike, repatch: bool = True) -> nn.Module:
    """Load cross tokens saved by :func:`save_cross_tokens` into ``model``.

    With ``repatch`` (default) the model is first patched with the saved settings
    (method, schedules, ...); otherwise it must already be patched with cross tokens.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a cross-token file, or shapes that do not fit the model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cross-token file at {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a crossget cross-token file (format {meta.get('format')!r})")
    saved = json.loads(meta["config"])
    if repatch:
        patch_from_config(model, saved)
    tensors = load_file(path)
    st = states(model)
    for kind, value in tensors.items():
        theta = st[kind].cross_tokens if kind in st else None
        if theta is None:
            raise ValueError(f"{path} has cross tokens for the {kind} tower, which is not patched with crossget")
        if theta.shape != value.shape:
            raise ValueError(f"{path}: {kind} cross tokens are {tuple(value.shape)}, the model needs {tuple(theta.shape)}")
        with torch.no_grad():
            theta.copy_(value)
    return model


def apply(
    model: nn.Module,
    cfg: PatchConfig | Mapping[str, Any] | None,
    cross_tokens: str | os.PathLike | None = None,
) -> nn.Module:
    """Put ``model`` in the state ``cfg`` describes, from the stock model up: None or
    ``method="none"`` give the stock model; otherwise the model is patched as
    :func:`crossget.patch_from_config` replays ``cfg``, with cross tokens from
    ``cross_tokens`` (a :func:`save_cross_tokens` file) or else zeros (training free;
    nothing carries over from an earlier configuration). Every benchmark, evaluation
    and training command configures its models through this one function.

    Raises:
        ValueError: ``cross_tokens`` for a configuration without cross tokens.
    """
    if (cfg is None or as_config(cfg).method == "none") and cross_tokens is not None:
        raise ValueError("cross tokens need a method that uses them (method='crossget')")
    if is_patched(model):
        unpatch(model)
    if cfg is None or as_config(cfg).method == "none":
        return model
    patch_from_config(model, cfg)
    if cross_tokens is not None:
        load_cross_tokens(model, cross_tokens, repatch=False)
    return model
