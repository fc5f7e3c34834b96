"""CrossGET's matching: complete-graph soft matching with the cross-guided ensemble
(docs/method.md §3-§5), and the importance rules that guide it.

Shapes: ``B`` batch, ``N`` tokens, ``C`` channels.
"""

from __future__ import annotations

import math

import torch

from crossget.merge import (
    Merge,
    check_match_inputs,
    clamp_r,
    cosine_similarity,
    expand_index,
    padding_budget,
    protected_mask,
    real_tokens_first,
)


def cross_importance(keys: torch.Tensor, cross_query: torch.Tensor) -> torch.Tensor:
    """``I_i = cos(q_cross, k_i)`` (docs/method.md §3), heads concatenated.

    ``keys`` ``[B, N, C]``, ``cross_query`` ``[B, 1, C]``; returns ``[B, N]``.
    """
    q = cross_query.transpose(1, 2)  # [B, C, 1]
    return (keys @ q).squeeze(-1) / (keys.norm(dim=-1) * q.norm(dim=1)).clamp_min(1e-12)


def attention_importance(attention: torch.Tensor, n: int, with_cross: bool) -> torch.Tensor:
    """The authors' LLaVA rule (docs/method.md §10): the mean attention token ``i`` receives
    from the ``N`` tokens, plus the cross token's attention to it (its query is the last row).

    ``attention`` ``[B, N (+1), N (+1)]`` head-mean probabilities; returns ``[B, N]``.
    """
    importance = attention[:, :n, :n].mean(1)
    return importance + attention[:, -1, :n] if with_cross else importance


def complete_graph_soft_matching(
    metric: torch.Tensor,
    r: int,
    importance: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> Merge:
    """CrossGET complete-graph soft matching (docs/method.md §4) with the cross-guided ensemble (§5).

    Args:
        metric: ``[B, N, C]`` matching features (the layer's keys); cosine similarity is used.
        r: tokens to remove, clamped to ``floor((N - P) / 2)``.
        importance: ``[B, N]`` cross-guided importance ``I_i`` or None (``I = 0``).
        protected: bool ``[N]`` or ``[B, N]``; never a source nor a destination.
        groups: optional int ``[B, N]``; tokens only merge within their group. Group 0 is
            padding: it only takes the merges a row cannot spend on its real tokens, so a
            row's real tokens merge as they would with the row alone, unpadded.

    Returns:
        A :class:`Merge` whose ensemble weights are ``exp(importance)``.
    """
    check_match_inputs(metric, r, groups)
    b, n, _ = metric.shape
    protected = protected_mask(protected, b, n, metric.device)
    if importance is not None and importance.shape != (b, n):
        raise ValueError(f"importance must be [B, N]={(b, n)}, got {tuple(importance.shape)}")
    with torch.no_grad():
        metric = metric.float()
        sim = cosine_similarity(metric)  # [B, N, N]
        # -inf on the diagonal and on protected rows and columns (in-place adds: bool
        # masks over [B, N, N] are several times slower on CPU)
        sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        if protected.any():
            neg = torch.zeros(b, n, device=metric.device).masked_fill_(protected, -math.inf)
            sim.add_(neg.unsqueeze(1)).add_(neg.unsqueeze(2))
        if groups is not None:
            sim.masked_fill_(groups.unsqueeze(1) != groups.unsqueeze(2), -math.inf)

        # Rank tokens by their best edge; keep only edges towards later-ranked tokens,
        # so sources point "down" the ranking and no chains or cycles can form.
        # Mutual best pairs tie exactly; stable sorts break ties by token index.
        order = sim.amax(dim=-1).argsort(dim=-1, descending=True, stable=True)  # [B, N]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=metric.device).expand(b, -1))
        earlier = rank.unsqueeze(1) <= rank.unsqueeze(2)  # [B, i, j]: rank(j) <= rank(i)
        best_later = sim.masked_fill(earlier, -math.inf).amax(dim=-1)  # [B, N]

        score = -best_later
        if importance is not None:
            score = score + importance.float()
        candidates = score.argsort(dim=-1, stable=True)  # ascending: least important, most redundant first
        if groups is None:
            r = clamp_r(r, (~protected).sum(-1), None)
        else:  # padding absorbs only what a row cannot spend on its real tokens
            real = groups != 0
            n_free = (~protected).sum(-1)
            r, cap = padding_budget(r, n_free, (real & ~protected).sum(-1), real, torch.isfinite(score))
            candidates = real_tokens_first(candidates, real, cap)
        src, rest = candidates[:, :r], candidates[:, r:]
        keep = rest.sort(dim=-1).values  # surviving tokens in their original order
        # Each source joins its most similar surviving token (plain S: protected
        # columns are -inf, sources are excluded by gathering only surviving columns).
        dst = sim.gather(1, expand_index(src, sim)).gather(2, keep.unsqueeze(1).expand(-1, r, -1))
        dst = dst.argmax(dim=-1)  # [B, r] slot in keep

    weight = None if importance is None else importance.exp().unsqueeze(-1)
    return Merge(keep=keep, src=src, dst=dst, weight=weight)
