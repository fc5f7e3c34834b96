"""``crossget.patch(model, ...)`` / ``crossget.unpatch(model)`` for every supported family.

Each family module (``clip``, ...) exposes ``SUPPORTED`` (model classes), ``towers(model)``
(:class:`~crossget.families.base.Tower` records by kind), ``encoder_cost`` and
``joint_projection``; everything else is shared. A family that needs model-level glue
beyond its towers (BLIP: bias into cross-attention masks) also has
``install_glue(model)`` / ``uninstall_glue(model)``. A family whose budget is not a
per-layer schedule of its towers (LLaVA: visual tokens for the language model) has
``patch_model`` / ``unpatch_model`` / ``tokens_per_layer``, which these functions defer to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from crossget.families import blip, blip2, clip, llava
from crossget.families.base import install, uninstall
from crossget.merge import sources_from_token_map
from crossget.schedule import RSpec, resolve_r, solve_flops, token_counts
from crossget.state import METHODS, METRICS, TowerSettings, TowerState

IMPORTANCE = ("cross", "none")  # what patch() offers; LLaVA's family sets "attention" itself
FAMILIES: tuple[ModuleType, ...] = (llava, clip, blip, blip2)
CONFIG_ATTR = "_crossget_config"


def _family(model: nn.Module) -> ModuleType:
    for fam in FAMILIES:
        if isinstance(model, fam.SUPPORTED):
            return fam
    names = ", ".join(cls.__name__ for fam in FAMILIES for cls in fam.SUPPORTED)
    raise TypeError(f"crossget cannot patch {type(model).__name__}; supported classes: {names}")


def _default_towers(found: Mapping[str, Any]) -> tuple[str, ...]:
    return ("vision",) if "vision" in found else tuple(found)


def patch(
    model: nn.Module,
    r: RSpec | Mapping[str, RSpec] | None = None,
    *,
    flops: float | None = None,
    method: str = "crossget",
    towers: Sequence[str] | None = None,
    prop_attn: bool = True,
    metric: str | None = None,
    text_len: int | None = None,
    trace_sources: bool = False,
    keep: int | None = None,
    importance: str = "cross",
) -> nn.Module:
    """Make ``model`` merge tokens while it runs; in place, returns ``model``.

    Args:
        model: a supported Hugging Face model (e.g. ``CLIPModel``, ``CLIPVisionModel``).
        r: tokens each layer removes: an int, a per-layer list, or ``{tower: r}``.
        flops: instead of ``r``, a target fraction in (0, 1] of the unreduced model's
            FLOPs (all towers that run), solved into a per-layer schedule.
        method: ``"crossget"`` (complete-graph matching + cross-guided ensemble),
            ``"tome"`` (bipartite matching, the baseline) or ``"none"`` (patched, no merging).
        towers: which towers to reduce: ``("vision",)`` (default when there is one),
            ``("text",)`` or ``("vision", "text")``.
        prop_attn: add ``log(size)`` to attention logits of merged keys (SPEC §6).
        metric: ``"keys"`` (heads concatenated; CrossGET's default) or ``"keys_mean"``
            (ToMe's default).
        text_len: text length assumed when solving ``flops`` (default: the text
            tower's maximum, 77 for CLIP).
        trace_sources: track which input tokens each output token covers, for
            :func:`sources` (text towers always track it, to restore their length).
        keep: instead of ``r``, the visual tokens per image that reach a language model
            (LLaVA; see :mod:`crossget.families.llava`, which also adds ``method="fastv"``
            and ``"visionzip"``).
        importance: for ``method="crossget"``: ``"cross"`` (SPEC §3, cross-token guidance)
            or ``"none"`` (complete-graph matching and size-weighted averaging without any
            cross token: an ablation of the guidance).

    With ``method="crossget"`` every tower gets cross tokens (``theta``, zeros: training
    free); towers not in ``towers`` run them with ``r = 0`` so the cross-token loss
    can align both modalities. Patching a patched model reconfigures it in place and
    keeps trained cross tokens.

    Raises:
        TypeError: unsupported model class.
        ValueError: bad ``r``, ``flops``, ``method``, ``towers`` or ``metric``.
    """
    fam = _family(model)
    if hasattr(fam, "patch_model"):
        model.__dict__[CONFIG_ATTR] = fam.patch_model(
            model, r, flops=flops, keep=keep, method=method, towers=towers, prop_attn=prop_attn,
            metric=metric, text_len=text_len, trace_sources=trace_sources, importance=importance,
        )
        return model
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if keep is not None:
        raise ValueError(f"keep= counts visual tokens fed to a language model (LLaVA), not for {type(model).__name__}")
    found = fam.towers(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    metric = metric or ("keys_mean" if method == "tome" else "keys")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    reduced = tuple(towers) if towers is not None else _default_towers(found)
    if isinstance(towers, str) or not reduced or any(t not in found for t in reduced):
        raise ValueError(f"towers must name some of {tuple(found)}, got {towers!r}")
    if r is not None and flops is not None:
        raise ValueError("give either r= or flops=, not both")
    if r is None and flops is None:
        if method != "none":
            raise ValueError("give r= (tokens per layer) or flops= (target FLOPs ratio)")
        r = 0

    if flops is not None:
        costs = {k: fam.encoder_cost(t.module, k, text_len) for k, t in found.items()}
        cross = method == "crossget" and importance != "none"  # every tower then carries a cross token
        match = {"crossget": "complete", "tome": "bipartite"}.get(method)
        added = {
            k: {"extra": int(cross), "match": match,
                "metric_dim": t.hidden // t.heads if metric == "keys_mean" else t.hidden}
            for k, t in found.items()
        }
        schedules, estimate = solve_flops(flops, costs, reduced, added)
    else:
        estimate = None
        schedules = {}
        for k in reduced:
            r_k = r[k] if isinstance(r, Mapping) else r
            schedules[k] = resolve_r(r_k, len(found[k].layers), name=f"r for the {k} tower")
        if isinstance(r, Mapping) and set(r) - set(reduced):
            raise ValueError(f"r names towers {sorted(set(r) - set(reduced))} that are not reduced: {reduced}")

    # reconfiguring: fresh classes and hooks, trained cross tokens carried over
    thetas = {kind: uninstall(tower) for kind, tower in found.items()}
    _glue(fam, model, install=False)
    for kind, tower in found.items():
        if kind in schedules:
            sched = schedules[kind]
        elif method == "crossget" and importance != "none":
            sched = [0] * len(tower.layers)
        else:
            continue
        settings = TowerSettings(kind, sched, method, prop_attn, metric, trace_sources, importance=importance)
        install(tower, settings, thetas[kind])
    _glue(fam, model, install=True)
    model.__dict__[CONFIG_ATTR] = {
        "method": method,
        "towers": list(reduced),
        "r": {k: list(v) for k, v in schedules.items()},
        "flops": flops,
        "flops_estimate": estimate,
        "prop_attn": prop_attn,
        "metric": metric,
        "trace_sources": trace_sources,
        "importance": importance,
    }
    return model


def _glue(fam: ModuleType, model: nn.Module, install: bool) -> None:
    """The family's model-level glue, if it has any (see the module docstring)."""
    fn = getattr(fam, "install_glue" if install else "uninstall_glue", None)
    if fn is not None:
        fn(model)


def patch_from_config(model: nn.Module, saved: Mapping[str, Any]) -> nn.Module:
    """Patch ``model`` as described by a :func:`config` dict (e.g. one saved with cross tokens)."""
    patch(
        model,
        r={k: saved["r"][k] for k in saved["towers"]},
        method=saved["method"],
        towers=saved["towers"],
        prop_attn=saved["prop_attn"],
        metric=saved["metric"],
        trace_sources=saved.get("trace_sources", False),
        importance=saved.get("importance", "cross"),
    )
    # the schedule came from a FLOPs target: keep saying so
    model.__dict__[CONFIG_ATTR].update(flops=saved.get("flops"), flops_estimate=saved.get("flops_estimate"))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock model (classes, forwards, no hooks, no cross-token parameters)."""
    fam = _family(model)
    if hasattr(fam, "unpatch_model"):
        fam.unpatch_model(model)
        model.__dict__.pop(CONFIG_ATTR, None)
        return model
    for tower in fam.towers(model).values():
        uninstall(tower)
    _glue(fam, model, install=False)
    model.__dict__.pop(CONFIG_ATTR, None)
    return model


def is_patched(model: nn.Module) -> bool:
    return CONFIG_ATTR in model.__dict__


def config(model: nn.Module) -> dict:
    """The settings of the last :func:`patch` (method, per-tower schedules, ...)."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by crossget")
    return dict(model.__dict__[CONFIG_ATTR])


def states(model: nn.Module) -> dict[str, TowerState]:
    """Per-tower state of the last forward (sizes, token map, cross tokens)."""
    return {k: t.state for k, t in _family(model).towers(model).items() if t.state is not None}


def sources(model: nn.Module, tower: str = "vision") -> torch.Tensor:
    """Bool ``[B, N_out, N_in]`` of the last forward: which input tokens each output token
    of ``tower`` covers (patch with ``trace_sources=True`` for vision towers)."""
    st = states(model).get(tower)
    if st is None or st.token_map is None:
        raise ValueError(f"no token map for the {tower} tower: patch with trace_sources=True and run a forward")
    n_out = st.tokens[-1] if st.tokens else st.token_map.shape[1]
    return sources_from_token_map(st.token_map, n_out)


def tokens_per_layer(model: nn.Module, text_len: int | None = None) -> dict[str, list[int]]:
    """Tokens after each layer of every patched tower for the current schedule.

    Vision counts are exact; text counts assume an unpadded text of ``text_len``
    tokens (default: the tower's maximum).
    """
    fam = _family(model)
    if hasattr(fam, "tokens_per_layer"):
        return fam.tokens_per_layer(model, text_len)
    out = {}
    for kind, tower in fam.towers(model).items():
        if tower.state is None:
            continue
        cost = fam.encoder_cost(tower.module, kind, text_len)
        r = tower.state.settings.r if tower.state.settings.method != "none" else [0] * len(tower.layers)
        out[kind] = [m for _, m in token_counts(cost.n_tokens, r, cost.protected)]
    return out


def joint_projection(model: nn.Module, kind: str):
    return _family(model).joint_projection(model, kind)
