"""``crossget.patch(model, ...)`` / ``crossget.unpatch(model)`` for every supported family.

The keywords build one :class:`~crossget.config.PatchConfig`; the registry
(:func:`crossget.families.registry.family_of`) finds the model's family, which checks
that it takes every keyword given (an error names the family otherwise) and patches.
What the family resolved (per-layer schedules, visual-token counts, FLOPs estimate) is
what :func:`config` reports and :func:`patch_from_config` replays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crossget.calibration import calibrate  # patches through the families, not through this module
from crossget.config import PatchConfig, RValue, as_config
from crossget.families.registry import family_of, install_config, remove_patch
from crossget.loss import cross_token_alignment
from crossget.merge import sources_from_token_map
from crossget.record import mark, record
from crossget.state import TowerState


def patch(
    model: nn.Module,
    r: RValue = None,
    *,
    flops: float | None = None,
    method: str = "crossget",
    towers: Sequence[str] | None = None,
    prop_attn: bool = True,
    metric: str | None = None,
    text_len: int | None = None,
    image_size: int | None = None,
    trace_sources: bool = False,
    keep: int | None = None,
    importance: str = "cross",
    guidance: str | None = None,
    guidance_scale: float | None = None,
    fastv_layer: int | None = None,
    contextual: int | None = None,
    site: str | None = None,
    schedule: str = "constant",
    calibration: Any = None,
) -> nn.Module:
    """Make ``model`` reduce its tokens while it runs; in place, returns ``model``.

    Args:
        model: a supported Hugging Face model (``CLIPModel``, ``BlipForRetrieval``,
            ``LlavaForConditionalGeneration``, ...; :data:`crossget.families.registry.FAMILIES`).
        r: tokens each layer removes: an int, a per-layer list, or ``{tower: r}``.
        flops: instead of ``r``, a target fraction in (0, 1] of the unreduced model's
            FLOPs (all towers that run), solved into a per-layer schedule (docs/method.md §7).
        method: one of :data:`crossget.config.METHODS` that the family runs:
            ``"crossget"`` (complete-graph matching + cross-guided ensemble), ``"tome"``
            (bipartite matching), ``"none"`` (patched, no reduction); LLaVA also
            ``"fastv"`` and ``"visionzip"``.
        towers: which towers to reduce: ``("vision",)`` (default when there is one),
            ``("text",)`` or ``("vision", "text")``.
        prop_attn: add ``log(size)`` to attention logits of merged keys (docs/method.md §6).
        metric: ``"keys"`` (heads concatenated; CrossGET's default) or ``"keys_mean"``
            (ToMe's default).
        text_len: text length assumed when solving ``flops`` (default: the text
            tower's maximum, 77 for CLIP; LLaVA: 64 prompt tokens).
        image_size: image side in pixels that ``flops`` plans for (default: the model
            config's ``image_size``); give the size the model runs at when it differs
            (``interpolate_pos_encoding=True``): a schedule is per layer, whatever the input.
        trace_sources: track which input tokens each output token covers, for
            :func:`sources` (text towers always track it, to restore their length).
        keep: instead of ``r``, the visual tokens per image that reach a language model
            (LLaVA).
        importance: for ``method="crossget"``: ``"cross"`` (docs/method.md §3,
            cross-token guidance), ``"attention"`` (LLaVA's rule) or ``"none"``
            (complete-graph matching without any cross token: an ablation).
        guidance: how the importance enters the ranking (docs/method.md §3 "Guidance"):
            ``"reference"`` (the authors' rule, exactly), ``"scaled"``, ``"standardised"``,
            ``"rank"`` or ``"ensemble"`` (the ensemble weights only). Default: the family's
            (:data:`crossget.config.DEFAULT_GUIDANCE` for encoders, ``"reference"`` for LLaVA).
        guidance_scale: the scale of ``"scaled"``, ``"standardised"`` and ``"rank"``
            (default: the rule's, :data:`crossget.config.GUIDANCE_SCALES`).
        fastv_layer: FastV's K, the LM layer after which visual tokens are pruned (LLaVA).
        contextual: VisionZip's contextual tokens out of ``keep`` (LLaVA).
        site: where LLaVA-NeXT / LLaVA-OneVision reduce: ``"tower"`` (in the vision tower's
            layers up to the feature layer, ``keep`` tokens per tile) or ``"projector"`` (the
            packed tokens of each image, ``keep`` per image); default: the family's for the
            method (docs/mllm.md).
        schedule: how ``flops`` becomes per-layer ``r``: ``"constant"`` (the solver's
            near-uniform schedule) or ``"calibrated"`` (searched on ``calibration``, see
            :func:`crossget.calibrate` and docs/calibration.md).
        calibration: with ``schedule="calibrated"``: the model inputs to calibrate on (a dict
            such as ``{"pixel_values": [B, 3, H, W]}``, or a pixel tensor); the search's
            defaults apply (call :func:`crossget.calibrate` for ``embed=``, ``max_evals=``).

    With ``method="crossget"`` every tower gets cross tokens (``theta``, zeros: training
    free); towers not in ``towers`` run them with ``r = 0`` so the cross-token loss
    can align both modalities. Patching a patched model reconfigures it in place and
    keeps trained cross tokens.

    Raises:
        TypeError: unsupported model class.
        ValueError: a bad value, or a keyword the model's family does not take.
    """
    cfg = PatchConfig(
        method=method, r=r, flops=flops, keep=keep, towers=towers, prop_attn=prop_attn, metric=metric,
        importance=importance, guidance=guidance, guidance_scale=guidance_scale, text_len=text_len,
        image_size=image_size, trace_sources=trace_sources,
        fastv_layer=fastv_layer,
        contextual=contextual, site=site, schedule=schedule,
    )
    if schedule == "calibrated":
        if r is not None:
            raise ValueError("schedule='calibrated' searches per-layer r for a flops= target: give flops=, not r= "
                             "(to replay a calibrated schedule, use patch_from_config)")
        if cfg.flops is None:
            raise ValueError("schedule='calibrated' needs flops= (the target FLOPs ratio)")
        if calibration is None:
            raise ValueError("schedule='calibrated' needs calibration= data (model inputs, e.g. "
                             "{'pixel_values': tensor}), or use crossget.calibrate")
        return calibrate(model, calibration, cfg.flops, **_calibration_settings(cfg))
    if calibration is not None:
        raise ValueError("calibration= is for schedule='calibrated'")
    return _patch(model, cfg)


def _calibration_settings(cfg: PatchConfig) -> dict[str, Any]:
    """The keywords of :func:`crossget.calibrate` that rebuild ``cfg`` (budget and schedule aside)."""
    settings = {k: v for k, v in cfg.explicit().items() if k not in ("r", "flops", "schedule", "flops_estimate")}
    return {"method": cfg.method, **settings}


def _patch(model: nn.Module, cfg: PatchConfig) -> nn.Module:
    if cfg.schedule == "calibrated" and cfg.r is None:
        # a calibrated schedule is data-dependent: only its saved r can be replayed
        raise ValueError("a calibrated config needs its per-layer r (crossget.config(model) after crossget.calibrate); "
                         "without it, calibrate again with crossget.calibrate")
    install_config(model, cfg)
    return model


def patch_from_config(model: nn.Module, saved: PatchConfig | Mapping[str, Any]) -> nn.Module:
    """Patch ``model`` as a :func:`config` (or its ``to_dict()``, e.g. saved with cross
    tokens) describes: the resolved budget is replayed (``r`` if it has one, else
    ``keep``), and the FLOPs target it came from is kept in the config."""
    cfg = as_config(saved)
    replay = cfg.replace(flops=None, flops_estimate=None)
    if cfg.r is not None:
        replay = replay.replace(keep=None)
    elif cfg.keep is None:
        replay = cfg  # nothing resolved yet: a config written by hand
    _patch(model, replay)
    if replay is not cfg:
        mark(model, config=config(model).replace(flops=cfg.flops, flops_estimate=cfg.flops_estimate))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock model (classes, forwards, no hooks, no cross-token parameters)."""
    remove_patch(model)
    return model


def is_patched(model: nn.Module) -> bool:
    rec = record(model)
    return rec is not None and rec.config is not None


def config(model: nn.Module) -> PatchConfig:
    """The resolved settings of the last :func:`patch` (method, per-tower schedules, ...).

    Raises:
        ValueError: the model is not patched.
    """
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by crossget")
    return record(model).config


def states(model: nn.Module) -> dict[str, TowerState]:
    """Per-tower state of the last forward (sizes, token map, cross tokens)."""
    return family_of(model).states(model)


def sources(model: nn.Module, tower: str = "vision") -> torch.Tensor:
    """Bool ``[B, N_out, N_in]`` of the last forward: which input tokens each output token
    of ``tower`` covers (patch with ``trace_sources=True`` for vision towers)."""
    st = states(model).get(tower)
    if st is None or st.token_map is None:
        raise ValueError(f"no token map for the {tower} tower: patch with trace_sources=True and run a forward")
    n_out = st.tokens[-1] if st.tokens else st.token_map.shape[1]
    return sources_from_token_map(st.token_map, n_out)


def tokens_per_layer(
    model: nn.Module, text_len: int | None = None, image_size: int | None = None
) -> dict[str, list[int]]:
    """Tokens after each layer of every patched tower for the current schedule.

    Vision counts are exact for images of ``image_size`` pixels (default: the size the
    patch was planned for, ``config(model).image_size``, else the model config's); text
    counts assume an unpadded text of ``text_len`` tokens (default: the tower's maximum).
    """
    if image_size is None and is_patched(model):
        image_size = config(model).image_size
    return family_of(model).tokens_per_layer(model, text_len, image_size)


def joint_projection(model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``[*, C] -> [*, P]``: the detached projection of ``kind``'s tokens into the joint space."""
    return family_of(model).joint_projection(model, kind)


def cross_token_loss(model: nn.Module) -> torch.Tensor:
    """Cross-token alignment loss (docs/method.md §3) of the last forward: the model's
    image and text cross tokens, paired by its family, through
    :func:`crossget.loss.cross_token_alignment`. Add it to the task loss while training
    the cross tokens.

    Raises:
        ValueError: the model is not patched with cross tokens in both modalities, or no
            forward ran.
    """
    return cross_token_alignment(*family_of(model).cross_token_pairs(model))


def image_tokens(model: nn.Module, image_size: Any = None) -> int:
    """``<image>`` placeholders every image needs in a prompt of a multimodal LLM, as the
    model is patched now (``keep`` for a reduced one). LLaVA-1.5 gives every image the same
    count; LLaVA-NeXT's depends on the image: give ``image_size=(height, width)``.

    Raises:
        TypeError: the model feeds no language model.
        ValueError: the count depends on ``image_size`` and none is given.
    """
    return family_of(model).image_tokens(model, image_size)


def adapt_processor(processor: Any, model: nn.Module) -> Any:
    """Make the model's processor (``LlavaProcessor``, ``LlavaNextProcessor``) write
    :func:`image_tokens` placeholders per image; returns it. Call it again after re-patching
    or unpatching.

    Raises:
        TypeError: the model feeds no language model, or the processor is not its family's.
        ValueError: the processor's patch size (or grid) differs from the model's.
    """
    return family_of(model).adapt_processor(processor, model)
