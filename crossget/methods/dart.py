"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", 2025), as a pure selection rule (docs/method.md §9).

Pick a few pivot tokens, then keep the visual tokens least similar to them: near-duplicates
of a pivot add little, so they go. Followed: ``DART.get_retained_image_token`` and
``DART.forward`` in ``llava/model/language_model/modeling_llama_self.py`` of the authors'
code, read in the fork github.com/xqy1111111/DART (commit d6a5af6; upstream
github.com/ZichenWen1/DART), with the defaults of ``llava/eval/model_vqa_loader.py`` and
``scripts/v1_5/eval/*.sh``:

- **Where (LLaVA-1.5):** in the language model, before layer ``K = 2`` (counting from 0):
  layers 0 and 1 see every token, layers 2 on only the kept ones, at their original
  positions. Similarity is on layer 1's output hidden states passed through the LM's final
  RMSNorm (``model.norm``); pivots are ranked by layer 1's key states (after rotary
  embedding, heads concatenated: ``[L, heads * head_dim]``).
- **Pivots:** the 4 image tokens and the 4 text tokens (every token after the image: the
  rest of the prompt) with the largest **L1** norm of those keys. Image pivots are kept;
  text pivots only steer the selection (text is kept anyway).
- **Selection:** each pivot in turn takes, from the image tokens not yet taken (image
  pivots excluded), the ``q`` with the lowest cosine similarity to it. Their ``q`` is
  ``128 // 8 = 16`` (``max_num_trunction=128`` over 8 pivots), so 4 + 8 * 16 = 132 of 576
  image tokens stay.

Departures, to make the rule exact and the budget ``keep`` in total:
- ``keep`` counts the image pivots: ``keep - pivots`` tokens are shared among the
  ``pivots + text_pivots`` pivots, the first ``(keep - pivots) % n`` (in processing order)
  taking one more. The authors' 132 is ``keep=132, pivots=4, text_pivots=4``.
- Pivots take their turn in ascending position, image pivots first (the authors iterate a
  Python ``set``, whose order is the hash table's, in effect arbitrary).
- Ties go to the lower position (norm ranking and similarity ranking alike; the authors'
  ``topk`` leaves ties unspecified).

In a model (:class:`DART`): FastV's pruning in the language model
(:class:`crossget.methods.fastv.FastV`: the prompt keeps every placeholder, layers from ``K``
on see each row's text and ``keep`` visual tokens per image, at their original positions,
the KV cache holds only them), with DART's rule in place of FastV's ranking. Per image, the
text is the real prompt tokens after it that are not image tokens (up to the last real
prompt token: a ``generate`` without a cache selects as its prefill did); a prompt with
fewer than ``text_pivots`` of them has that many text pivots. Only what the rule reads is
computed: layer ``K - 1``'s key projection (captured; its ``k_norm`` if the attention has
one, then rotary) and the LM's final norm on layer ``K``'s input, so any attention
implementation (SDPA included) runs as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crossget.methods.divprune import check_keep
from crossget.methods.fastv import FastV, image_positions, rotary, with_text

DEFAULT_LAYER = 2  # DART's K: select before this LM layer (the authors' K=2 for LLaVA)
DEFAULT_PIVOTS = 4  # image pivots, and as many text pivots, in the authors' LLaVA scripts


def check_count(value: object, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``.

    Raises:
        ValueError: not an int (bools rejected) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def top_l1(norm_of: torch.Tensor, count: int, valid: torch.Tensor) -> torch.Tensor:
    """Per row, the ``count`` valid positions with the largest L1 norm of ``norm_of``
    ``[B, L, D]``, ties to the lower position; returned ascending, ``[B, count]``."""
    norm = norm_of.to(torch.promote_types(norm_of.dtype, torch.float32)).abs().sum(-1)
    norm = norm.where(valid, torch.tensor(-float("inf"), dtype=norm.dtype, device=norm.device))
    order = (-norm).sort(dim=1, stable=True).indices  # stable ascending of -norm: ties keep position order
    return order[:, :count].sort(1).values


def dart_select(
    hidden: torch.Tensor,
    keep: int,
    pivots: int = DEFAULT_PIVOTS,
    valid: torch.Tensor | None = None,
    norm_of: torch.Tensor | None = None,
    text_hidden: torch.Tensor | None = None,
    text_pivots: int = 0,
    text_valid: torch.Tensor | None = None,
    text_norm_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """DART's duplication-aware selection of one image's visual tokens per row.

    Args:
        hidden: ``[B, L, D]`` image tokens' features that similarity is measured on (in
            LLaVA: layer ``K - 1``'s output after the LM's final norm).
        keep: image tokens kept per row, pivots included; an int in ``[1, fewest valid]``.
        pivots: image pivots, an int in ``[0, keep]``; kept.
        valid: ``[B, L]`` bool, False for padding (never selected); None: all valid.
        norm_of: ``[B, L, Dk]`` features whose L1 norm ranks the image pivots (in LLaVA:
            layer ``K - 1``'s keys); None: ``hidden``.
        text_hidden: ``[B, T, D]`` text tokens' features (same space as ``hidden``), needed
            when ``text_pivots > 0``.
        text_pivots: text pivots, an int in ``[0, fewest valid text tokens]``; they steer
            the selection and are not returned.
        text_valid: ``[B, T]`` bool, False for padding; None: all valid.
        text_norm_of: ``[B, T, Dk]``, ranks the text pivots; None: ``text_hidden``.

    Returns:
        ``[B, keep]`` int64 positions into ``L``, ascending, distinct.

    Raises:
        ValueError: bad ``keep``, ``pivots`` or ``text_pivots``, or ``keep > pivots`` with
            no pivot at all.
    """
    b, n, _ = hidden.shape
    dev = hidden.device
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=dev)
    check_keep(keep, int(valid.sum(1).min()) if b else n)
    check_count(pivots, "pivots", 0, keep)
    if text_hidden is None:
        check_count(text_pivots, "text_pivots (no text_hidden given)", 0, 0)
        t = 0
    else:
        t = text_hidden.shape[1]
        if text_valid is None:
            text_valid = torch.ones(b, t, dtype=torch.bool, device=dev)
        check_count(text_pivots, "text_pivots", 0, int(text_valid.sum(1).min()) if b else t)
    n_piv = pivots + text_pivots
    rest = keep - pivots
    if rest and not n_piv:
        raise ValueError(f"keep={keep} > pivots={pivots} needs at least one pivot (image or text)")

    f = nn.functional.normalize(hidden.to(torch.promote_types(hidden.dtype, torch.float32)), dim=-1)
    img_piv = top_l1(hidden if norm_of is None else norm_of, pivots, valid)
    piv_feats = [f.gather(1, img_piv.unsqueeze(-1).expand(-1, -1, f.shape[-1]))]
    if text_pivots:
        tf = nn.functional.normalize(text_hidden.to(f.dtype), dim=-1)
        txt_piv = top_l1(text_hidden if text_norm_of is None else text_norm_of, text_pivots, text_valid)
        piv_feats.append(tf.gather(1, txt_piv.unsqueeze(-1).expand(-1, -1, tf.shape[-1])))
    piv_feats = torch.cat(piv_feats, 1)  # [B, n_piv, D]: image pivots, then text pivots, each ascending

    rows = torch.arange(b, device=dev).unsqueeze(1)
    pool = valid.clone()
    pool[rows, img_piv] = False
    taken = [img_piv]
    inf = torch.tensor(float("inf"), dtype=f.dtype, device=dev)
    for j in range(n_piv):
        quota = rest // n_piv + (j < rest % n_piv)
        if not quota:
            continue
        sim = (f @ piv_feats[:, j].unsqueeze(-1)).squeeze(-1).where(pool, inf)  # [B, L]
        pick = sim.sort(dim=1, stable=True).indices[:, :quota]  # least similar first, ties to lower position
        pool[rows, pick] = False
        taken.append(pick)
    return torch.cat(taken, 1).sort(1).values


@dataclass(eq=False)
class DART(FastV):
    """DART in one language model: :class:`~crossget.methods.fastv.FastV`'s pruning before
    layer ``K`` (:attr:`layer`) with :func:`dart_select` choosing each image's ``keep``
    tokens (``pivots`` of them image pivots, ``text_pivots`` text pivots steering)."""

    name = "DART"
    pivots: int = DEFAULT_PIVOTS
    text_pivots: int = DEFAULT_PIVOTS

    def capture_q(self, _module, _args, output):
        pass  # DART reads layer K-1's keys only

    def keep_indices(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Each image's :func:`dart_select` on layer ``K``'s input ``x`` ``[B, L, C]`` after
        the LM's final norm, pivots by the L1 norm of layer ``K - 1``'s keys (rotary applied,
        heads concatenated); returns every text position and the kept visual ones, ascending."""
        b, length, _ = x.shape
        attn = self.attn
        cos, sin = (t.expand(b, -1, -1).unsqueeze(2) for t in kwargs["position_embeddings"])
        keys = self.k.view(b, length, -1, attn.head_dim)
        k_norm = getattr(attn, "k_norm", None)  # Qwen3-style attention normalises keys before rotary
        keys = rotary(keys if k_norm is None else k_norm(keys), cos, sin).flatten(2)  # [B, L, KV * hd]
        self.k = None
        hidden = self.lm.norm(x)
        img_pos = image_positions(self.image_mask, self.per_image)  # [B, images, per_image]
        pos = torch.arange(length, device=x.device)
        text = ~self.image_mask & (pos <= self.query_pos.unsqueeze(1))
        if self.valid is not None:
            text = text & self.valid
        pivots = min(self.pivots, self.keep)
        chosen = []
        for row in range(b):
            for p in img_pos[row]:
                after = (text[row] & (pos > p[-1])).nonzero()[:, 0]
                t_piv = min(self.text_pivots, len(after))
                t_args = dict(text_hidden=hidden[row, after][None], text_norm_of=keys[row, after][None]) if t_piv else {}
                sel = dart_select(hidden[row, p][None], self.keep, pivots, norm_of=keys[row, p][None],
                                  text_pivots=t_piv, **t_args)
                chosen.append(p[sel[0]])
        return with_text(self.image_mask, torch.stack(chosen).view(b, -1))
