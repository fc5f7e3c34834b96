"""The reduction site between the vision side and the language model: one image's packed
visual tokens (what the projector wrote, in the LM's width) reduced to a fixed count.

Families whose visual tokens cannot be merged inside the vision tower without rewriting
upstream code (LLaVA-NeXT: anyres tiles unpadded and packed with a newline token per
row; later LLaVA-OneVision and Qwen-VL) reduce here instead, image by image:

- ``"tome"``: ToMe's bipartite soft matching (:func:`crossget.methods.tome.bipartite_soft_matching`),
  repeated, since one round removes at most half of the tokens;
- ``"crossget"``: CrossGET's complete-graph soft matching without cross tokens
  (:func:`crossget.methods.crossget.complete_graph_soft_matching`, training-free), repeated.

Both match on the features themselves (cosine), merge by size-weighted averages
(:class:`crossget.merge.Merge`) and stop at exactly ``keep`` tokens; the output is in the
order of each token's smallest original index, so spatial order is kept.

Shapes: ``L`` visual tokens of one image, ``D`` channels.
"""

from __future__ import annotations

import torch

from crossget.merge import Merge
from crossget.methods.crossget import complete_graph_soft_matching
from crossget.methods.tome import bipartite_soft_matching

__all__ = ["SITE_METHODS", "check_keep", "reduce_visual_tokens"]

SITE_METHODS = ("tome", "crossget")  # what reduce_visual_tokens runs


def check_keep(keep: object, available: int | None = None, what: str = "the image's visual tokens") -> int:
    """``keep`` as a valid token count: an int in ``[1, available]``.

    Raises:
        ValueError: not an int (bools included), ``<= 0``, or more than ``available``.
    """
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (visual tokens per image), got {keep!r}")
    if keep <= 0:
        raise ValueError(f"keep must be positive (visual tokens per image), got {keep}")
    if available is not None and keep > available:
        raise ValueError(f"keep={keep} is more than the {available} tokens of {what}")
    return keep


def _match(method: str, metric: torch.Tensor, r: int) -> Merge:
    if method == "tome":
        return bipartite_soft_matching(metric, r)
    return complete_graph_soft_matching(metric, r)  # no importance: plain size-weighted groups


def reduce_visual_tokens(x: torch.Tensor, keep: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's visual tokens ``x`` ``[L, D]`` reduced to exactly ``keep`` tokens.

    Rounds of ``method``'s matching on the current tokens (cosine similarity of the tokens
    themselves), each removing ``min(current - keep, current // 2)``; every group becomes the
    size-weighted average of what it covers. After each round the tokens are put in the
    order of their smallest original index, so a round's bipartite split (ToMe: alternate
    tokens) runs on spatially ordered tokens, and so does the output.

    Args:
        x: ``[L, D]`` visual tokens (any float dtype; merging accumulates in float32).
        keep: tokens to return, ``1 <= keep <= L``.
        method: ``"tome"`` or ``"crossget"`` (:data:`SITE_METHODS`).

    Returns:
        ``(tokens [keep, D], first [keep])``: the reduced tokens, and for each the smallest
        index in ``x`` of the tokens it covers (ascending; ``first == arange(L)`` when
        ``keep == L``).

    Raises:
        ValueError: ``x`` not 2-D, an unknown method, or ``keep`` not an int in ``[1, L]``.
    """
    if x.dim() != 2:
        raise ValueError(f"reduce_visual_tokens expects one image's tokens [L, D], got {tuple(x.shape)}")
    if method not in SITE_METHODS:
        raise ValueError(f"method must be one of {SITE_METHODS}, got {method!r}")
    n = x.shape[0]
    check_keep(keep, n)
    tokens = x.unsqueeze(0)  # [1, N, D]: the matchers are batched
    size = None  # [1, N, 1] float32 after the first merge
    first = torch.arange(n, device=x.device).unsqueeze(0)  # [1, N]
    while n > keep:
        merge = _match(method, tokens, min(n - keep, n // 2))
        tokens, size = merge(tokens, size)
        first = -merge.amax(-first)  # a group's smallest original index
        n = tokens.shape[1]
        order = first[0].argsort()  # indices are distinct: no ties
        first, tokens, size = first[:, order], tokens[:, order], size[:, order]
    return tokens[0], first[0]
