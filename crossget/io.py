"""Trained cross tokens on disk (safetensors, with the patch settings), and :func:`apply`:
put a model in the state a saved configuration describes.

A cross-token file holds one ``[layers, width]`` tensor per tower (``vision``, ``text``) and,
in its metadata, ``format`` (:data:`FORMAT`), ``config`` (the :class:`~crossget.config.PatchConfig`
as JSON) and, from this version on, ``model_class`` and ``family`` of the model it was saved from
(older files without them still load). Loading is transactional: whatever goes wrong, the model is
left as it was (patched or not, its configuration, its cross tokens), and the error names the file
and what in it does not fit the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from crossget.api import config, is_patched, patch_from_config, states, unpatch
from crossget.config import PatchConfig, as_config
from crossget.families.base import CROSS_PARAM
from crossget.families.registry import family_of

FORMAT = "crossget.cross_tokens.v1"


def save_cross_tokens(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every tower's cross tokens ``[layers, C]``, the patch settings and the model's
    class and family to ``path``."""
    if not is_patched(model):
        raise ValueError("save_cross_tokens needs a model patched with method='crossget'")
    tensors = {
        kind: st.cross_tokens.detach().cpu().contiguous()
        for kind, st in states(model).items()
        if st.cross_tokens is not None
    }
    if not tensors:
        raise ValueError("the model has no cross tokens (patch it with method='crossget')")
    meta = {"format": FORMAT, "config": json.dumps(config(model).to_dict()),
            "model_class": type(model).__name__, "family": family_of(model).name}
    save_file(tensors, os.fspath(path), metadata=meta)


@dataclass(frozen=True)
class CrossTokenFile:
    """A cross-token file as read by :func:`read_cross_tokens` (checked to be one, not yet
    checked against a model)."""

    path: str
    config: PatchConfig
    tensors: dict[str, torch.Tensor]
    model_class: str | None = None  # None: a file written before these were recorded
    family: str | None = None

    def saved_from(self) -> str:
        """`` (saved from a CLIPModel)`` for the messages; empty for older files."""
        return f" (saved from a {self.model_class})" if self.model_class else ""


def read_cross_tokens(path: str | os.PathLike) -> CrossTokenFile:
    """Read and check a :func:`save_cross_tokens` file, without touching any model.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a corrupt, empty or truncated file, not a crossget cross-token file, or
            settings that cannot be read (each names ``path``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cross-token file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a crossget cross-token file (format {meta.get('format')!r}, "
                    f"expected {FORMAT!r}: write one with crossget.save_cross_tokens)"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        size = os.path.getsize(path)
        raise ValueError(f"{path} is not a readable safetensors file ({size} bytes; corrupt, empty or truncated?): "
                         f"{e}") from None
    if "config" not in meta:
        raise ValueError(f"{path} is not a complete crossget cross-token file: its metadata has no patch settings "
                         "('config')")
    try:
        cfg = as_config(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: cannot read its patch settings ('config' metadata): {e}") from None
    if not tensors:
        raise ValueError(f"{path} holds no cross tokens")
    return CrossTokenFile(path, cfg, tensors, meta.get("model_class"), meta.get("family"))


def _check_fits(model: nn.Module, file: CrossTokenFile) -> None:
    """ValueError (naming the file) unless every tensor of ``file`` fits a tower of ``model``:
    same family, the tower exists, same number of layers, same width. Reads the model only."""
    try:
        fam = family_of(model)
    except TypeError as e:
        raise TypeError(f"cannot load {file.path}: {e}") from None
    name, origin = type(model).__name__, file.saved_from()
    if file.family is not None and file.family != fam.name:
        raise ValueError(f"{file.path} holds cross tokens of a {file.model_class or 'model'} ({file.family} family); "
                         f"{name} is a {fam.name} model")
    towers = fam.towers(model)
    problems = []
    for kind in _in_order(file.tensors, towers):
        value, tower = file.tensors[kind], towers.get(kind)
        if tower is None:
            problems.append(f"it has cross tokens for a {kind} tower, which {name} has not "
                            f"(its towers: {', '.join(towers) or 'none'})")
        elif value.ndim != 2:
            problems.append(f"its {kind} cross tokens are {tuple(value.shape)}, not [layers, width]")
        else:
            layers, width = len(tower.layers), tower.hidden
            if value.shape[0] != layers:
                problems.append(f"its {kind} cross tokens have {value.shape[0]} layers, "
                                f"{name}'s {kind} tower has {layers} layers")
            if value.shape[1] != width:
                problems.append(f"its {kind} cross tokens are {value.shape[1]} wide, "
                                f"{name}'s {kind} tower is {width} wide")
    if problems:
        raise ValueError(f"{file.path}{origin} does not fit {name}: {'; '.join(problems)}")


def _in_order(tensors: Mapping[str, torch.Tensor], kinds: Mapping[str, Any]) -> list[str]:
    """The file's tower kinds, those the model knows first in its order (vision before text)."""
    rank = {k: i for i, k in enumerate(kinds)}
    return sorted(tensors, key=lambda k: (rank.get(k, len(rank)), k))


def _copy_in(model: nn.Module, file: CrossTokenFile) -> None:
    """Copy the file's tensors into the patched model's cross tokens, after checking all of them."""
    st = states(model)
    pairs = []
    for kind in _in_order(file.tensors, st):
        value = file.tensors[kind]
        theta = st[kind].cross_tokens if kind in st else None
        if theta is None:
            raise ValueError(f"{file.path} has cross tokens for the {kind} tower, which is not patched with crossget "
                             "(method='crossget' with importance='cross')")
        if theta.shape != value.shape:
            raise ValueError(f"{file.path}: {kind} cross tokens are {tuple(value.shape)}, "
                             f"the model needs {tuple(theta.shape)}")
        pairs.append((theta, value))
    with torch.no_grad():
        for theta, value in pairs:
            theta.copy_(value)


class _Snapshot:
    """What a failed load or :func:`apply` puts back: patched or not, the configuration and
    the values of every cross-token parameter (also those a re-patch keeps unused)."""

    def __init__(self, model: nn.Module):
        self.patched = is_patched(model)
        self.config = config(model) if self.patched else None
        self.thetas = {n: p.detach().clone() for n, p in model.named_parameters() if CROSS_PARAM in n}

    def restore(self, model: nn.Module) -> None:
        if is_patched(model) and (not self.patched or not self.thetas):
            unpatch(model)  # also drops cross tokens the failed attempt created
        if not self.patched:
            return
        patch_from_config(model, self.config)  # re-patching keeps the cross-token parameters it finds
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, value in self.thetas.items():
                if n in params and params[n].shape == value.shape:
                    params[n].copy_(value)


class _Transaction:
    """``with _Transaction(model):`` puts ``model`` back as it was when the block raises."""

    def __init__(self, model: nn.Module):
        self.model, self.snapshot = model, _Snapshot(model)

    def __enter__(self) -> _Transaction:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None:
            try:
                self.snapshot.restore(self.model)
            except Exception as failed:  # noqa: BLE001 - the first error is the one to report
                error.add_note(f"crossget could not restore the model after this error: {failed!r}")
        return False


def load_cross_tokens(model: nn.Module, path: str | os.PathLike, repatch: bool = True) -> nn.Module:
    """Load cross tokens saved by :func:`save_cross_tokens` into ``model``.

    With ``repatch`` (default) the model is first patched with the saved settings
    (method, schedules, ...); otherwise it must already be patched with cross tokens.
    On any error the model is left exactly as it was.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a corrupt or truncated file, not a cross-token file, or one that does not
            fit the model (another family, a tower it has not, other layers or width); the
            message names the file and the mismatch.
        TypeError: a model class crossget does not patch.
    """
    file = read_cross_tokens(path)
    _check_fits(model, file)
    if repatch and not file.config.uses_cross_token:
        raise ValueError(f"{file.path}: its patch settings (method={file.config.method!r}, "
                         f"importance={file.config.importance!r}) give no cross tokens to load the file's into")
    with _Transaction(model):
        if repatch:
            _patch_with(model, file.config, file)
        _copy_in(model, file)
    return model


def _patch_with(model: nn.Module, cfg: PatchConfig | Mapping[str, Any], file: CrossTokenFile | None) -> None:
    """:func:`patch_from_config`; an error names the file whose settings these are."""
    if file is None:
        patch_from_config(model, cfg)
        return
    try:
        patch_from_config(model, cfg)
    except ValueError as e:
        raise ValueError(f"{file.path}: its patch settings{file.saved_from()} do not fit "
                         f"{type(model).__name__}: {e}") from e


def apply(
    model: nn.Module,
    cfg: PatchConfig | Mapping[str, Any] | None,
    cross_tokens: str | os.PathLike | None = None,
) -> nn.Module:
    """Put ``model`` in the state ``cfg`` describes, from the stock model up: None or
    ``method="none"`` give the stock model; otherwise the model is patched as
    :func:`crossget.patch_from_config` replays ``cfg``, with cross tokens from
    ``cross_tokens`` (a :func:`save_cross_tokens` file) or else zeros (training free;
    nothing carries over from an earlier configuration); a ``cfg`` dict that names no
    ``guidance`` then runs the guidance the file's cross tokens were trained with. Every
    benchmark, evaluation and training command configures its models through this one
    function. On any error the model is left exactly as it was.

    Raises:
        ValueError: ``cross_tokens`` for a configuration without cross tokens, a bad
            configuration, or a cross-token file that cannot be read or does not fit (see
            :func:`load_cross_tokens`).
    """
    if (cfg is None or as_config(cfg).method == "none") and cross_tokens is not None:
        raise ValueError("cross tokens need a method that uses them (method='crossget')")
    file = None
    if cross_tokens is not None:
        file = read_cross_tokens(cross_tokens)
        _check_fits(model, file)
        if isinstance(cfg, Mapping) and "guidance" not in cfg:
            # trained cross tokens run with the guidance rule they were trained with
            cfg = {**cfg, "guidance": file.config.guidance, "guidance_scale": file.config.guidance_scale}
    with _Transaction(model):
        if is_patched(model):
            unpatch(model)
        if cfg is None or as_config(cfg).method == "none":
            return model
        patch_from_config(model, cfg)
        if file is not None:
            _copy_in(model, file)
    return model
