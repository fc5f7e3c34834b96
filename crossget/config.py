"""One patch configuration for every family and method (docs/method.md §7).

:class:`PatchConfig` is what :func:`crossget.patch` is asked for and, after patching,
what :func:`crossget.config` reports: the same fields, with the budget resolved into
per-layer schedules (``r``), the visual-token count (``keep``, LLaVA) and the FLOPs
estimate of the schedule. ``to_dict``/``from_dict`` give the JSON form stored with
trained cross tokens and in every result file.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# every token-reduction method crossget knows; a family says which of them it runs.
# "none": patched with the bookkeeping but never reducing (crossget.apply: the stock model)
METHODS = ("none", "tome", "crossget", "fastv", "visionzip", "divprune", "dart")
MERGING = ("none", "tome", "crossget")  # run inside the encoder layers (bookkeeping + Merge)
METRICS = ("keys", "keys_mean")
IMPORTANCE = ("cross", "attention", "none")
# how importance enters the ranking of docs/method.md §4 (§3 "Guidance"): "reference" is the
# authors' rule, I_i as it is; the others rescale it or keep it out of the ranking
GUIDANCE = ("reference", "scaled", "standardised", "rank", "ensemble")
# the scale a rule takes when none is given (the settings measured in docs/results-guidance.md)
GUIDANCE_SCALES = {"reference": 1.0, "ensemble": 1.0, "scaled": 0.1, "standardised": 0.25, "rank": 0.25}
# the rule of method="crossget" when none is given, for the encoder families: the smallest worst
# case behind ToMe on real features, ahead of it where ToMe drops (docs/results-guidance.md);
# LLaVA keeps the authors' rule (families/llava.py)
DEFAULT_GUIDANCE = "rank"
SCHEDULES = ("constant", "calibrated")
# where a multimodal LLM reduces (docs/mllm.md): in the vision tower's layers, or on the
# projected visual tokens before the language model
SITES = ("tower", "projector")

RValue = int | tuple[int, ...] | Mapping[str, int | tuple[int, ...]] | None


def _freeze_r(r: Any) -> RValue:
    """Lists (from JSON) become tuples so that a config compares and prints as a value."""
    if isinstance(r, Mapping):
        return {k: _freeze_r(v) for k, v in r.items()}
    if isinstance(r, (list, tuple)):
        return tuple(r)
    return r


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class PatchConfig:
    """How a model is patched.

    Budget (one of ``r``, ``flops``, ``keep``; none for ``method="none"``):
        r: tokens each layer removes: an int, one int per layer, or ``{tower: r}``.
            :func:`crossget.config` reports it resolved: ``{tower: (r_0, ..., r_L-1)}``.
        flops: target fraction in (0, 1] of the unreduced model's FLOPs (solved into ``r``).
        keep: visual tokens per image that reach a language model (LLaVA).

    Settings:
        method: one of :data:`METHODS` (the family says which it runs).
        towers: towers to reduce (``("vision",)``, ``("text",)``, both); None: the family's default.
        prop_attn: proportional attention, ``+log(size)`` on merged keys (docs/method.md §6).
        metric: ``"keys"`` (heads concatenated) or ``"keys_mean"``; None: the method's default.
        importance: ``"cross"`` (cross-token guidance), ``"attention"`` (the attention a token
            receives plus the cross token's, the authors' LLaVA rule) or ``"none"`` (no cross
            token: an ablation of the guidance).
        guidance: how the importance enters the ranking (docs/method.md §3 "Guidance"): one of
            :data:`GUIDANCE`; ``"reference"`` is the authors' rule exactly. None: the family's
            default (:data:`DEFAULT_GUIDANCE` for encoders, ``"reference"`` for LLaVA);
            :func:`crossget.config` reports the rule that runs.
        guidance_scale: the ``lambda`` of ``"scaled"``, ``"standardised"`` and ``"rank"``;
            None: the rule's default (:data:`GUIDANCE_SCALES`).
        schedule: ``"constant"`` (the FLOPs solver's near-uniform ``r``) or ``"calibrated"``
            (per-layer ``r`` chosen on calibration data by :func:`crossget.calibrate`).
        text_len: text length assumed when solving ``flops``; None: the family's default.
        image_size: image side in pixels the ``flops`` schedule is planned for and token
            counts are reported at; None: the model config's ``image_size``. At another input
            size (``interpolate_pos_encoding=True``) every layer still removes its ``r``
            tokens (fewer if it has fewer), so plan for the size the model runs at.
        trace_sources: keep the input -> output token map (:func:`crossget.sources`).
        fastv_layer: FastV's K (LLaVA); None: the method's default.
        contextual: VisionZip's contextual tokens (LLaVA); None: 10/64 of ``keep``.
        site: where a multimodal LLM reduces, one of :data:`SITES` (LLaVA-NeXT, LLaVA-OneVision:
            ``"tower"`` merges in the vision tower's layers, ``"projector"`` on the projected
            tokens; Qwen-VL: ``"projector"`` only); None: the family's default for the method.
            :func:`crossget.config` reports the site that runs (None where the method prunes
            inside the language model, and for families without ``site=``, e.g. LLaVA-1.5).

    Filled in by patching:
        flops_estimate: the analytic FLOPs ratio of the resolved schedule (with ``flops``).
    """

    method: str = "crossget"
    r: RValue = None
    flops: float | None = None
    keep: int | None = None
    towers: tuple[str, ...] | None = None
    prop_attn: bool = True
    metric: str | None = None
    importance: str = "cross"
    guidance: str | None = None
    guidance_scale: float | None = None
    schedule: str = "constant"
    text_len: int | None = None
    image_size: int | None = None
    trace_sources: bool = False
    fastv_layer: int | None = None
    contextual: int | None = None
    site: str | None = None
    flops_estimate: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", _freeze_r(self.r))
        if self.towers is not None:
            if isinstance(self.towers, str):
                raise ValueError(f"towers must be a sequence of tower names, got the string {self.towers!r}")
            object.__setattr__(self, "towers", tuple(self.towers))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.guidance is not None and self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.guidance_scale is not None:
            if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, numbers.Real) \
                    or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
                raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        elif self.guidance is not None:
            object.__setattr__(self, "guidance_scale", GUIDANCE_SCALES[self.guidance])
        if self.guidance in ("reference", "ensemble") and self.guidance_scale != 1.0:
            raise ValueError(f"guidance={self.guidance!r} takes no scale; use guidance='scaled' "
                             f"(got guidance_scale={self.guidance_scale})")
        if self.site is not None and self.site not in SITES:
            raise ValueError(f"site must be one of {SITES} (or None: the family's default), got {self.site!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.flops is not None:
            # any real number (numpy scalars too); 1 means the stock computation (no merging)
            if isinstance(self.flops, bool) or not isinstance(self.flops, numbers.Real) \
                    or not math.isfinite(self.flops) or not 0 < self.flops <= 1:
                raise ValueError(f"flops must be a ratio in (0, 1], got {self.flops!r}")
            object.__setattr__(self, "flops", float(self.flops))
        if self.text_len is not None:
            if isinstance(self.text_len, bool) or not isinstance(self.text_len, numbers.Integral) or self.text_len < 1:
                raise ValueError(f"text_len must be a positive int (text tokens), got {self.text_len!r}")
            object.__setattr__(self, "text_len", int(self.text_len))
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, numbers.Integral) \
                    or self.image_size < 1:
                raise ValueError(f"image_size must be a positive int (pixels), got {self.image_size!r}")
            object.__setattr__(self, "image_size", int(self.image_size))

    # ------------------------------------------------------------------ forms
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: _thaw(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchConfig:
        """Inverse of :meth:`to_dict`; also reads the dicts older crossget versions saved, and
        hand-written ones (the fields they name; the rest default).

        Raises:
            ValueError: a key that is not a field.
        """
        known = {f.name for f in fields(cls)}
        data = dict(data)
        if data.get("importance") is None:
            data.pop("importance", None)  # older files store None for methods without one
        # a saved config (to_dict writes every field, flops_estimate among them) from before
        # guidance= existed ran, and trained its cross tokens with, the authors' rule, whatever
        # today's default is; a dict written by hand that names no rule takes the default
        if "flops_estimate" in data:
            data.setdefault("guidance", "reference")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown patch config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> PatchConfig:
        return replace(self, **changes)

    def with_guidance(self, default: str) -> PatchConfig:
        """This config with ``guidance=None`` resolved to ``default`` (a family's rule; a
        scale given without a rule applies to it)."""
        return self if self.guidance is not None else replace(self, guidance=default)

    @property
    def uses_cross_token(self) -> bool:
        return self.method == "crossget" and self.importance != "none"

    @property
    def resolved_metric(self) -> str:
        return self.metric or ("keys_mean" if self.method == "tome" else "keys")

    def explicit(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a family must accept)."""
        default = PatchConfig()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "method" and getattr(self, f.name) != getattr(default, f.name)}


def as_config(value: PatchConfig | Mapping[str, Any]) -> PatchConfig:
    """A :class:`PatchConfig` from itself or from its dict form."""
    return value if isinstance(value, PatchConfig) else PatchConfig.from_dict(value)

