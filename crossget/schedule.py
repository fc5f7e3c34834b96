"""How many tokens each layer removes: validation, token counts and FLOPs targets.

A schedule is one ``r`` per layer. :func:`solve_flops` turns a target compute ratio
(e.g. 0.58 of the unreduced GFLOPs) into such a schedule with an analytic cost model
of pre-LN encoder layers; the FLOPs actually reached are then measured with
:mod:`crossget.flops`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RSpec = int | Sequence[int]


def resolve_r(r: RSpec, num_layers: int, name: str = "r") -> list[int]:
    """One non-negative ``r`` per layer from an int or a per-layer list.

    Raises:
        ValueError: negative values, non-integers, or a list of the wrong length.
    """
    if isinstance(r, bool):
        raise ValueError(f"{name} must be an int or a list of ints, got {r!r}")
    if isinstance(r, int):
        values = [r] * num_layers
    elif isinstance(r, Sequence) and not isinstance(r, str):
        values = list(r)
        if len(values) != num_layers:
            raise ValueError(
                f"{name} has {len(values)} entries but the encoder has {num_layers} layers: {values}"
            )
    else:
        raise ValueError(f"{name} must be an int or a list of ints, got {r!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {v!r} in {values}")
    return values


def token_counts(n_tokens: int, r: Sequence[int], protected: int = 1) -> list[tuple[int, int]]:
    """``(tokens in, tokens out)`` of every layer, with the clamp of docs/method.md §4, ``r <= (N - P) // 2``."""
    counts = []
    n = n_tokens
    for r_l in r:
        out = n - min(r_l, max(n - protected, 0) // 2)
        counts.append((n, out))
        n = out
    return counts


def vit_layer_flops(hidden: int, intermediate: int, n: int, m: int) -> float:
    """FLOPs (2 x multiply-adds) of one pre-LN encoder layer with ``n`` tokens entering
    attention and ``m`` leaving the merge: QKV+output projections ``8 n C^2``, attention
    ``4 n^2 C``, MLP ``4 m C I`` (docs/method.md §7)."""
    return 8 * n * hidden * hidden + 4 * n * n * hidden + 4 * m * hidden * intermediate


def decoder_layer_flops(cfg, n: int) -> float:
    """FLOPs of one Llama-style decoder layer on ``n`` tokens: projections (grouped-query
    attention), full attention, gated MLP. ``cfg`` is the language model's config."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or c // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return 2 * n * (2 * c * q + 2 * c * kv + 3 * c * i) + 4 * n * n * q


@dataclass(frozen=True)
class EncoderCost:
    """Analytic multiply-add model of a pre-LN Transformer encoder (FLOPs = 2 x MACs).

    Per layer with ``n`` tokens entering attention and ``m`` leaving the merge:
    QKV+output projections ``8 n C^2``, attention ``4 n^2 C``, MLP ``4 m C I``.
    """

    hidden: int
    intermediate: int
    num_layers: int
    n_tokens: int
    protected: int = 1
    fixed: float = 0.0  # FLOPs outside the layers (patch embedding, heads)

    def flops(
        self, r: Sequence[int] | None = None, extra: int = 0, match: str | None = None, metric_dim: int | None = None
    ) -> float:
        """FLOPs with schedule ``r`` (None: unreduced).

        ``extra``: tokens that never merge but run through every layer (the cross token).
        ``match``: ``"complete"`` (CrossGET: ``N x N`` similarities) or ``"bipartite"``
        (ToMe: ``N/2 x N/2``) adds the similarity product of every merging layer over a
        ``metric_dim``-wide metric (default ``hidden``), the part of matching the FLOPs
        counter sees.
        """
        r = [0] * self.num_layers if r is None else r
        c, i = self.hidden, self.intermediate
        d = metric_dim or c
        total = self.fixed
        for (n, m), r_l in zip(token_counts(self.n_tokens, r, self.protected), r):
            if match is not None and r_l > 0:
                total += 2 * d * (n * n if match == "complete" else (n // 2) * (n - n // 2))
            n, m = n + extra, m + extra
            total += vit_layer_flops(c, i, n, m)
        return total


def flops_ratio(
    costs: Mapping[str, EncoderCost],
    schedules: Mapping[str, Sequence[int]],
    patched: Mapping[str, Mapping] | None = None,
) -> float:
    """Estimated FLOPs of every encoder in ``costs`` under ``schedules`` (what the patch adds
    included, see :func:`solve_flops`) over the stock FLOPs."""
    patched = patched or {}
    base = sum(c.flops() for c in costs.values())
    return sum(c.flops(schedules.get(k), **patched.get(k, {})) for k, c in costs.items()) / base


def solve_flops(
    target: float,
    costs: Mapping[str, EncoderCost],
    reduced: Sequence[str],
    patched: Mapping[str, Mapping] | None = None,
) -> tuple[dict[str, list[int]], float]:
    """Per-layer schedules for the ``reduced`` encoders reaching ``target`` x the FLOPs.

    ``costs`` holds every encoder that runs (an unreduced text tower still counts in
    the denominator and the numerator). ``patched`` gives, per encoder, what the
    patch adds (keyword arguments of :meth:`EncoderCost.flops`: ``extra`` cross tokens,
    ``match``/``metric_dim`` for the similarity product), so that every method meets the
    target as measured against the stock model. The schedule is the largest uniform ``r`` that
    stays above the target, then one more token removed in the earliest layers, one
    layer at a time, until the estimate reaches the target.

    Returns:
        ``(schedules, estimated_ratio)``.

    Raises:
        ValueError: target outside (0, 1], or below what maximal merging reaches.
    """
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target <= 1:
        raise ValueError(f"flops must be a ratio in (0, 1], got {target!r}")
    if target >= 1:  # the stock computation: nothing merges
        zeros = {k: [0] * costs[k].num_layers for k in reduced}
        return zeros, flops_ratio(costs, zeros, patched)

    def ratio(sched: Mapping[str, Sequence[int]]) -> float:
        return flops_ratio(costs, sched, patched)

    def uniform(r: int) -> dict[str, list[int]]:
        return {k: [r] * costs[k].num_layers for k in reduced}

    r_max = max(costs[k].n_tokens for k in reduced)
    if ratio(uniform(r_max)) > target + 1e-9:
        raise ValueError(
            f"flops={target} is out of reach: merging as much as possible leaves "
            f"{ratio(uniform(r_max)):.3f} of the FLOPs"
        )
    r = 0
    while ratio(uniform(r + 1)) > target:
        r += 1
    sched = uniform(r)
    depth = max(costs[k].num_layers for k in reduced)
    for layer in range(depth):
        if ratio(sched) <= target:
            break
        for k in reduced:
            if layer < len(sched[k]):
                sched[k][layer] += 1
    return sched, ratio(sched)
