"""A per-layer merging schedule chosen from data, at a FLOPs target (docs/calibration.md).

:func:`crossget.patch` with ``flops=`` solves the target into a near-uniform schedule (the
same ``r`` in every layer, one more in the earliest layers: docs/method.md §7). Which layers
can afford to lose tokens depends on the model and the images, so :func:`calibrate` searches
per-layer ``r`` on a few unlabelled inputs instead: it keeps the pooled embedding of the
reduced model as close as it can (mean cosine similarity) to the unreduced model's, with
every candidate at an estimated FLOPs ratio at or below the target under the cost model
:meth:`crossget.families.base.Family.patch` solves with (cross token and matching cost of
the method included), so the constant and the calibrated schedule are compared at equal
estimated GFLOPs.

The search (training free, deterministic) starts from the constant schedule and moves
reduction between layers: take ``d`` tokens of one layer's ``r``, then give another layer
the smallest ``r`` that brings the estimate back to the target; a move is kept when the
objective improves. Moves between neighbouring layers come first, then farther ones;
``d`` halves when a full round of moves finds nothing better. It stops after ``max_evals``
model evaluations or when no move of one token improves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crossget.config import PatchConfig
from crossget.families.base import Family, FlopsPlan
from crossget.families.registry import family_of, install_config, remove_patch
from crossget.record import mark, record
from crossget.schedule import token_counts

Schedule = dict[str, list[int]]
Embed = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
# an evaluation only counts as better by more than this: the forward of one schedule is
# deterministic, but two schedules with the same merges can differ in the last float bits
TOLERANCE = 1e-6
# DINOv2-S (12 layers, 224 px) took 4.6 s an evaluation of 32 images on one busy CPU core: 48
# evaluations of 64 images are about 4 minutes on two cores
DEFAULT_MAX_EVALS = 48
DEFAULT_BATCH = 32


@dataclass
class CalibrationResult:
    """What :func:`search_schedule` found.

    Attributes:
        schedule: ``{tower: per-layer r}`` found (the model is patched with it).
        estimate: its analytic FLOPs ratio (``<= target``).
        objective: its mean cosine similarity to the unreduced embedding, in [-1, 1].
        constant / constant_estimate / constant_objective: the same for the constant
            schedule the search started from (what ``patch(flops=target)`` gives).
        target: the FLOPs target.
        evaluations: model evaluations spent (the unreduced reference and the start included).
        seconds: wall time of the search.
        history: ``(evaluation, objective, accepted)`` of every candidate, in order.
    """

    schedule: Schedule
    estimate: float
    objective: float
    constant: Schedule
    constant_estimate: float
    constant_objective: float
    target: float
    evaluations: int
    seconds: float
    history: list[tuple[int, float, bool]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no history)."""
        return {
            "target": self.target,
            "calibrated": {"r": self.schedule, "flops_estimate": self.estimate, "objective": self.objective},
            "constant": {"r": self.constant, "flops_estimate": self.constant_estimate,
                         "objective": self.constant_objective},
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- patching
# crossget.patch(schedule="calibrated") calls this module, so it patches through the registry
# (the same two steps crossget.patch / unpatch take) rather than through crossget.api
def _current(model: nn.Module) -> PatchConfig | None:
    rec = record(model)
    return rec.config if rec is not None else None


def _restore(model: nn.Module, before: PatchConfig | None) -> None:
    """Put ``model`` back as it was before the search: unpatched, or patched as ``before``
    (re-patching keeps the cross-token parameters it finds; the search never changes their values)."""
    if before is None:
        if _current(model) is not None:
            remove_patch(model)
        return
    replay = before.replace(flops=None, flops_estimate=None) if before.r is not None else before
    fam = family_of(model)
    fam.patch(model, replay)
    mark(model, config=before)


# --------------------------------------------------------------------------- inputs and embedding
def as_inputs(calibration: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
    """The calibration data as model keyword arguments: a tensor is ``{"pixel_values": it}``.

    Raises:
        TypeError: neither a mapping nor a tensor.
        ValueError: no tensor inside, or an empty batch.
    """
    if isinstance(calibration, torch.Tensor):
        calibration = {"pixel_values": calibration}
    if not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be a dict of model inputs or a pixel tensor, got {type(calibration).__name__}")
    inputs = dict(calibration)
    if not any(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise ValueError(f"calibration holds no tensor (keys {sorted(inputs)})")
    if _batch_size(inputs) < 1:
        raise ValueError("calibration holds an empty batch")
    return inputs


def _batch_size(inputs: Mapping[str, Any]) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _chunks(inputs: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """``inputs`` split along the batch: tensors whose first dimension is the batch are sliced,
    the rest (flags such as ``interpolate_pos_encoding``) go to every chunk."""
    b = _batch_size(inputs)
    return [{k: v[s:s + size] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
             for k, v in inputs.items()} for s in range(0, b, size)]


def default_embed(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The pooled embedding ``[B, D]``: ``get_image_features`` (CLIP-like models, dual encoders,
    with ``pixel_values``), else the output's ``pooler_output`` (ViT, DINOv2, SigLIP and CLIP
    vision towers), else the first token of ``last_hidden_state``, else ``logits`` (heads).

    Raises:
        ValueError: the output has none of them (give ``embed=``).
    """
    if "pixel_values" in inputs and callable(getattr(model, "get_image_features", None)):
        out = model.get_image_features(**inputs)
    else:
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden[:, 0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"{type(model).__name__}'s output has no pooled embedding: give embed=(model, inputs) -> [B, D]")


def _embed_all(model: nn.Module, chunks: Sequence[Mapping[str, Any]], embed: Embed) -> torch.Tensor:
    """``[B, D]`` float32 embeddings of every chunk (flattened past the batch dimension)."""
    outs = []
    for chunk in chunks:
        e = embed(model, chunk)
        if not isinstance(e, torch.Tensor) or e.dim() < 1:
            raise ValueError(f"embed must return a [B, D] tensor, got {type(e).__name__}")
        outs.append(e.reshape(e.shape[0], -1).float())
    return torch.cat(outs)


def fidelity(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean cosine similarity of rows ``emb [B, D]`` to ``ref [B, D]`` (1: the same directions)."""
    return torch.nn.functional.cosine_similarity(emb, ref, dim=-1, eps=1e-12).mean().item()


# --------------------------------------------------------------------------- schedule moves
def _positions(schedule: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    return [(k, layer) for k in schedule for layer in range(len(schedule[k]))]


def _pairs(positions: Sequence[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """Ordered (donor, receiver) pairs, neighbours first: a small reshaping of the schedule is
    more often an improvement than a jump across the network, and it is tried before the
    evaluation budget runs out."""
    n = len(positions)
    pairs = []
    for offset in range(1, n):
        for i in range(n - offset):
            pairs.append((positions[i], positions[i + offset]))  # later layer takes the reduction
            pairs.append((positions[i + offset], positions[i]))  # earlier layer takes it
    return pairs


def _effective(schedule: Schedule, plan: FlopsPlan) -> Schedule:
    """Every ``r`` cut to what its layer removes (the clamp ``r <= (N - P) // 2`` of
    docs/method.md §4), so that two schedules that merge the same are one candidate."""
    out = {}
    for k, r in schedule.items():
        cost = plan.costs[k]
        out[k] = [n - m for n, m in token_counts(cost.n_tokens, r, cost.protected)]
    return out


def _key(schedule: Schedule) -> tuple:
    return tuple((k, tuple(v)) for k, v in sorted(schedule.items()))


def move(schedule: Schedule, donor: tuple[str, int], receiver: tuple[str, int], d: int, plan: FlopsPlan,
         target: float) -> Schedule | None:
    """``d`` tokens (or what it has) less in ``donor``'s ``r``, and the smallest ``r`` at
    ``receiver`` that brings the estimate back to ``target`` or below; None when the donor
    has nothing to give or no ``r`` at the receiver reaches the target.

    The receiver's ``r`` is scanned from 0 upwards rather than bisected: starting to merge in
    a layer adds its matching cost, so the estimate is not monotone in ``r`` at 0 -> 1.
    """
    (dk, dl), (rk, rl) = donor, receiver
    take = min(d, schedule[dk][dl])
    if take <= 0:
        return None
    cand = {k: list(v) for k, v in schedule.items()}
    cand[dk][dl] -= take
    for value in range(plan.costs[rk].n_tokens + 1):
        cand[rk][rl] = value
        if plan.ratio(cand) <= target:
            return _effective(cand, plan)
    return None


def _steps(schedule: Schedule) -> list[int]:
    """Move sizes: half the mean ``r``, halved down to 1 (coarse moves first, then refinement)."""
    values = [v for r in schedule.values() for v in r]
    d = max(1, round(sum(values) / max(len(values), 1) / 2))
    steps = []
    while True:
        steps.append(d)
        if d == 1:
            return steps
        d = max(1, d // 2)


# --------------------------------------------------------------------------- search
def search_schedule(
    model: nn.Module,
    calibration: Mapping[str, Any] | torch.Tensor,
    flops: float,
    *,
    method: str = "crossget",
    embed: Embed | None = None,
    towers: Sequence[str] | None = None,
    max_evals: int = DEFAULT_MAX_EVALS,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, float, float], None] | None = None,
    **patch_kwargs: Any,
) -> CalibrationResult:
    """Search the per-layer schedule of :func:`calibrate`; leaves ``model`` patched with it.

    Returns the found and the constant schedule with their objectives (see
    :class:`CalibrationResult`); arguments as :func:`calibrate`.
    """
    t0 = time.perf_counter()
    inputs = as_inputs(calibration)
    embed = embed or default_embed
    for key in ("r", "keep", "schedule", "flops_estimate"):
        if key in patch_kwargs:
            raise ValueError(f"calibrate chooses the schedule itself: {key}= is not one of its settings")
    if method not in ("crossget", "tome"):
        raise ValueError(f"calibrate needs a merging method ('crossget' or 'tome'), got method={method!r}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 2:
        raise ValueError(f"max_evals must be an int >= 2 (the unreduced reference and the start), got {max_evals!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = PatchConfig(method=method, flops=flops, towers=towers, schedule="calibrated", **patch_kwargs)
    fam = family_of(model)
    fam.check(cfg)
    if type(fam).patch is not Family.patch:
        raise ValueError(f"calibrate searches per-layer schedules of encoder towers; the {fam.name} family "
                         f"budgets another way (keep=)")
    plan = fam.flops_plan(model, cfg)
    target = cfg.flops
    start, start_estimate = plan.solve(target)  # the constant schedule; raises when out of reach
    chunks = _chunks(inputs, batch_size)
    base = cfg.replace(flops=None, towers=plan.reduced)
    history: list[tuple[int, float, bool]] = []
    evals = 0

    def evaluate(schedule: Schedule) -> float:
        nonlocal evals
        install_config(model, base.replace(r={k: tuple(v) for k, v in schedule.items()}))
        evals += 1
        return fidelity(_embed_all(model, chunks, embed), ref)

    training = model.training
    before = _current(model)
    model.eval()  # dropout would make the objective noisy and the search not deterministic
    try:
        with torch.no_grad():
            # the unreduced reference: the stock computation, with any trained cross tokens kept
            # aside by the re-patch (method="none" never reduces and keeps them for the next patch)
            if before is not None:
                install_config(model, PatchConfig(method="none", r=0))
            ref = _embed_all(model, chunks, embed)
            evals += 1
            best = _effective(start, plan)
            best_f = start_f = evaluate(best)
            history.append((evals, start_f, True))
            if progress is not None:
                progress(evals, start_f, best_f)
            seen = {_key(best)}
            pairs = _pairs(_positions(best))
            for d in _steps(best) if pairs and target < 1 else []:
                since = k = 0  # pairs tried since the last improvement; the next pair to try
                while since < len(pairs) and evals < max_evals:
                    donor, receiver = pairs[k % len(pairs)]
                    k += 1
                    since += 1
                    cand = move(best, donor, receiver, d, plan, target)
                    if cand is None or _key(cand) in seen:
                        continue
                    seen.add(_key(cand))
                    f = evaluate(cand)
                    better = f > best_f + TOLERANCE
                    history.append((evals, f, better))
                    if better:
                        best, best_f, since = cand, f, 0
                    if progress is not None:
                        progress(evals, f, best_f)
            install_config(model, base.replace(r={k: tuple(v) for k, v in best.items()}))
    except BaseException as error:
        try:
            _restore(model, before)
        except Exception as failed:  # noqa: BLE001 - the first error is the one to report
            error.add_note(f"crossget could not restore the model after this error: {failed!r}")
        raise
    finally:
        model.train(training)
    estimate = plan.ratio(best)
    mark_calibrated(model, target, estimate)
    return CalibrationResult(
        schedule=best, estimate=estimate, objective=best_f, constant=start, constant_estimate=start_estimate,
        constant_objective=start_f, target=target, evaluations=evals, seconds=time.perf_counter() - t0,
        history=history,
    )


def mark_calibrated(model: nn.Module, target: float, estimate: float) -> None:
    """Record the FLOPs target and the estimate of the patched (calibrated) schedule in the
    model's config, as ``patch(flops=...)`` records a solved one."""
    mark(model, config=_current(model).replace(flops=target, flops_estimate=estimate, schedule="calibrated"))


def calibrate(
    model: nn.Module,
    calibration: Mapping[str, Any] | torch.Tensor,
    flops: float,
    *,
    method: str = "crossget",
    embed: Embed | None = None,
    towers: Sequence[str] | None = None,
    max_evals: int = DEFAULT_MAX_EVALS,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, float, float], None] | None = None,
    **patch_kwargs: Any,
) -> nn.Module:
    """Patch ``model`` in place with the per-layer schedule, at ``flops`` x the unreduced
    model's estimated FLOPs, that keeps its pooled embedding closest to the unreduced one
    on ``calibration``; returns ``model``.

    :func:`crossget.config` then reports ``schedule="calibrated"``, ``flops=`` the target,
    ``flops_estimate`` (the found schedule's analytic ratio, ``<= flops``) and the resolved
    ``r``, which :func:`crossget.patch_from_config` replays without calibration data.

    Args:
        model: a model of an encoder family (CLIP, SigLIP, ViT / DINOv2, BLIP, dual encoders).
        calibration: model inputs as a dict (``{"pixel_values": [B, 3, H, W]}``, or text
            ``input_ids`` / ``attention_mask`` ``[B, L]`` with ``embed=``), or a pixel tensor
            ``[B, 3, H, W]``. A few dozen to a few hundred unlabelled examples.
        flops: target ratio in (0, 1] of the unreduced model's estimated FLOPs (every tower
            that runs, as ``patch(flops=...)`` counts them: docs/method.md §7).
        method: ``"crossget"`` or ``"tome"``.
        embed: ``(model, inputs) -> [B, D]``, the embedding kept close; default
            :func:`default_embed` (image features, else the pooled output).
        towers: towers to reduce (default: the family's, the vision tower).
        max_evals: model evaluations at most (each a forward over all of ``calibration``),
            the unreduced reference and the constant start included.
        batch_size: examples per forward (memory, not the result).
        progress: called after every evaluation of a schedule with
            ``(evaluations, its objective, the best objective so far)``.
        **patch_kwargs: other :func:`crossget.patch` settings (``importance``, ``guidance``,
            ``metric``, ``prop_attn``, ``image_size``, ``text_len``, ...).

    Raises:
        ValueError: a bad setting, a target out of reach, or a family without per-layer
            schedules (LLaVA).
        TypeError: ``calibration`` of another type, or an unsupported model.

    On an error the model is left as it was.
    """
    search_schedule(model, calibration, flops, method=method, embed=embed, towers=towers, max_evals=max_evals,
                    batch_size=batch_size, progress=progress, **patch_kwargs)
    return model


__all__ = ["CalibrationResult", "as_inputs", "calibrate", "default_embed", "fidelity", "move", "search_schedule"]

