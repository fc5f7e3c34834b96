"""ToMe's matching (Bolya et al., ICLR 2023), the baseline (docs/method.md §8).

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
    padding_budget,
    protected_mask,
    real_tokens_first,
)


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> Merge:
    """ToMe bipartite soft matching (Bolya et al., ICLR 2023), the baseline (docs/method.md §8).

    Tokens alternate into sets A (even) and B (odd); each A token's best B match is
    scored and the ``r`` best edges merge (size-weighted average). Protected tokens
    are neither sources nor destinations. Args and return as
    :func:`complete_graph_soft_matching` (without importance).
    """
    check_match_inputs(metric, r, groups)
    b, n, _ = metric.shape
    protected = protected_mask(protected, b, n, metric.device)
    with torch.no_grad():
        a_idx = torch.arange(0, n, 2, device=metric.device)
        b_idx = torch.arange(1, n, 2, device=metric.device)
        sim = cosine_similarity(metric[:, a_idx], metric[:, b_idx])  # [B, Na, Nb]
        blocked = protected[:, a_idx].unsqueeze(2) | protected[:, b_idx].unsqueeze(1)
        if groups is not None:
            blocked = blocked | (groups[:, a_idx].unsqueeze(2) != groups[:, b_idx].unsqueeze(1))
        sim = sim.masked_fill(blocked, -math.inf)
        node_max, node_idx = sim.max(dim=-1)  # best B partner of each A token
        finite = torch.isfinite(node_max)
        if groups is None:
            # At most every unprotected A token can leave.
            r = min(clamp_r(r, (~protected).sum(-1), None), int(finite.sum(-1).min()))
            edge_order = node_max.argsort(dim=-1, descending=True, stable=True)  # ties: by token index
        else:  # padding absorbs only what a row cannot spend on its real tokens
            real = groups != 0
            n_free = (~protected).sum(-1)
            r, cap = padding_budget(r, n_free, (real & ~protected).sum(-1), real[:, a_idx], finite)
            edge_order = real_tokens_first(node_max.argsort(dim=-1, descending=True, stable=True), real[:, a_idx], cap)
        src_a = edge_order[:, :r]  # index within A
        src = a_idx[src_a]
        dst_tok = b_idx[node_idx.gather(1, src_a)]
        is_src = torch.zeros(b, n, dtype=torch.bool, device=metric.device).scatter_(1, src, True)
        # stable sort puts the kept tokens first, in ascending order, without a host sync
        keep = is_src.to(torch.uint8).argsort(dim=-1, stable=True)[:, : n - r]
        # slot of each destination token within keep = number of kept tokens before it
        kept_before = (~is_src).cumsum(-1) - 1
        dst = kept_before.gather(1, dst_tok)
    return Merge(keep=keep, src=src, dst=dst)
