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


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-mean attention probabilities ``[B, M, M]`` from projected ``query``, ``key``
    ``[B, M, C]`` (heads concatenated, scaled by ``head_dim ** -0.5``) and the layer's
    ``mask`` (additive ``[B, 1, M or 1, M]``, or bool with True = attend; None: none).

    Computed apart from the layer's attention, which keeps its implementation (SDPA):
    only merging layers pay for this one extra ``Q K^T``.
    """
    b, m, c = query.shape
    d = c // heads
    with torch.no_grad():
        q = query.float().view(b, m, heads, d).transpose(1, 2)
        k = key.float().view(b, m, heads, d).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).mul_(d ** -0.5)  # [B, H, M, M]
        if mask is not None:
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, -torch.inf)
            else:
                logits = logits + mask.float()
        return logits.softmax(-1).mean(1)


def attention_importance(attention: torch.Tensor, n: int, with_cross: bool) -> torch.Tensor:
    """The authors' LLaVA rule (docs/method.md §10): the mean attention token ``i`` receives
    from the ``N`` tokens, plus the cross token's attention to it (its query is the last row).

    ``attention`` ``[B, N (+1), N (+1)]`` head-mean probabilities; returns ``[B, N]``.
    """
    importance = attention[:, :n, :n].mean(1)
    return importance + attention[:, -1, :n] if with_cross else importance


def guidance_term(
    importance: torch.Tensor, redundancy: torch.Tensor, guidance: str = "reference", scale: float = 1.0,
    real: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """What importance adds to a token's score in the ranking of docs/method.md §4
    (``score_i = term_i - redundancy_i``), by rule (docs/method.md §3 "Guidance"):

    - ``"reference"``: ``I_i`` (the authors' rule);
    - ``"scaled"``: ``scale * I_i``;
    - ``"standardised"``: ``scale * sd(redundancy) * z(I)_i``, the importance standardised over
      the row and put on the scale of the redundancy's own spread, whatever the source's range;
    - ``"rank"``: as ``"standardised"`` with ``z`` replaced by the centred rank of ``I_i``
      (uniform on ``[-sqrt 3, sqrt 3]``: unit variance, robust to outliers);
    - ``"ensemble"``: None (the ranking is unguided; importance acts in the weights only).

    ``importance``, ``redundancy`` ``[B, N]`` (``redundancy`` is ``max_j S'_ij``, ``-inf`` for
    tokens that cannot be sources); row statistics are taken over the tokens that can be
    sources, and only real ones when ``real`` ``[B, N]`` marks padding apart, so a row's term
    does not depend on the batch it is in. Returns ``[B, N]`` or None.
    """
    if guidance == "reference":
        return importance
    if guidance == "scaled":
        return importance * scale
    if guidance == "ensemble":
        return None
    if guidance not in ("standardised", "rank"):
        raise ValueError(f"unknown guidance {guidance!r}")
    ok = torch.isfinite(redundancy)
    if real is not None:
        ok = ok & real
    count = ok.sum(-1, keepdim=True).clamp_min(1)
    if guidance == "standardised":
        values = importance
    else:  # centred ranks among the candidates (ties by index: stable sort)
        order = importance.masked_fill(~ok, torch.inf).argsort(dim=-1, stable=True)
        ranks = torch.empty_like(importance).scatter_(
            1, order, torch.arange(importance.shape[1], device=importance.device, dtype=importance.dtype)
            .expand_as(importance).contiguous())
        values = ranks
    values = values.masked_fill(~ok, 0)
    mean = values.sum(-1, keepdim=True) / count
    sd = ((values - mean).masked_fill(~ok, 0).square().sum(-1, keepdim=True) / count).sqrt()
    red = redundancy.masked_fill(~ok, 0)
    red_mean = red.sum(-1, keepdim=True) / count
    red_sd = ((red - red_mean).masked_fill(~ok, 0).square().sum(-1, keepdim=True) / count).sqrt()
    z = (values - mean) / sd.clamp_min(1e-12)
    return (scale * red_sd * z).masked_fill(~ok, 0)


def complete_graph_soft_matching(
    metric: torch.Tensor,
    r: int,
    importance: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    guidance: str = "reference",
    scale: float = 1.0,
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
        guidance, scale: how ``importance`` enters the ranking (:func:`guidance_term`);
            ``"reference"`` is the authors' rule.

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
            real = None if groups is None else groups != 0
            term = guidance_term(importance.float(), best_later, guidance, scale, real)
            if term is not None:
                score = score + term
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
