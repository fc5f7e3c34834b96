"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025), as a pure selection rule (docs/method.md §9).

Keep ``keep`` of an image's visual tokens by greedy max-min diversity on cosine distance
``d(i, j) = 1 - cos(x_i, x_j)``. Followed: the authors' ``DivPrune`` in
``LLaVA/llava/model/llava_arch.py`` of github.com/vbdi/divprune (commit 799e2d9):

- first token: the one whose nearest other token is farthest, ``argmax_j min_{k != j} d(k, j)``
  (their ``topk(2, largest=False).values[1]``: the smallest entry of a column is the
  diagonal's 0, the second its nearest neighbour);
- then, repeatedly, the token farthest from the chosen set, ``argmax_j min_{s in S} d(s, j)``;
- the chosen positions are sorted back into spatial order.

In LLaVA they run it once, on the image's projected features as they enter the language
model (``LAYER_INDEX=0``: the ``inputs_embeds`` rows of the image, before LM layer 0), with
``keep = round(ratio * L)`` (ratio 0.098 by default, about 56 of 576).

Departure: already chosen tokens are excluded outright. The authors rely on their distance
0 to themselves, so once only exact duplicates of chosen tokens remain (or rounding makes
``d(s, s)`` the largest score) their ``argmax`` can return a chosen index again, giving
repeats and fewer distinct tokens; here the ``keep`` indices are always distinct. Ties go
to the lower token index (``torch.argmax`` returns the first maximum), as theirs; the
distance matrix is made exactly symmetric first so that a mutual-nearest pair, which ties
in the rule, ties in floating point too.
"""

from __future__ import annotations

import torch
from torch import nn


def check_keep(keep: object, available: int, what: str = "valid tokens") -> int:
    """``keep`` as an int in ``[1, available]``.

    Raises:
        ValueError: ``keep`` not an int (bools rejected) or out of range.
    """
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int, got {keep!r}")
    if not 1 <= keep <= available:
        raise ValueError(f"keep must be in [1, {available}] (the fewest {what} in a row), got {keep}")
    return keep


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every pair of tokens: ``[B, L, D]`` -> ``[B, L, L]``, in at least
    float32, exactly symmetric (a zero vector is at distance 1 from everything but itself)."""
    f = nn.functional.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    dist = 1.0 - f @ f.transpose(1, 2)
    # a batched matmul need not give d(i, j) == d(j, i) to the last bit; a mutual nearest pair
    # ties exactly in the rule, so the tie must be exact here too for "lower index wins" to hold
    dist = torch.minimum(dist, dist.transpose(1, 2))
    return dist.diagonal_scatter(torch.zeros_like(dist.diagonal(dim1=1, dim2=2)), dim1=1, dim2=2)


def divprune_select(x: torch.Tensor, keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection.

    Args:
        x: ``[B, L, D]`` (or ``[L, D]``) features of one image's visual tokens per row.
        keep: tokens kept per row, an int in ``[1, fewest valid tokens in a row]``.
        valid: ``[B, L]`` bool, False for padding (never selected, and no token's distance
            to it counts); None: every token is valid.

    Returns:
        ``[B, keep]`` (``[keep]`` for a 2-D ``x``) int64 positions, ascending, distinct.

    Raises:
        ValueError: bad ``keep``.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
        valid = None if valid is None else valid.reshape(1, -1)
    b, n, _ = x.shape
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    check_keep(keep, int(valid.sum(1).min()) if b else n)
    dist = cosine_distance(x)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=x.device)
    # first pick: largest distance to the nearest *other* valid token (+inf for a lone token)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    others = valid.unsqueeze(2) & ~eye  # [B, k, j]: k counts as j's neighbour
    score = dist.where(others, inf).amin(1).where(valid, -inf)
    chosen = torch.empty(b, keep, dtype=torch.long, device=x.device)
    rows = torch.arange(b, device=x.device)
    open_ = valid.clone()  # valid and not yet chosen
    nearest = torch.full((b, n), float("inf"), dtype=dist.dtype, device=x.device)  # min distance to the chosen set
    for i in range(keep):
        pick = score.argmax(1)  # first maximum: ties go to the lower index
        chosen[:, i] = pick
        open_[rows, pick] = False
        nearest = torch.minimum(nearest, dist[rows, pick])
        score = nearest.where(open_, -inf)
    out = chosen.sort(1).values
    return out[0] if squeeze else out
