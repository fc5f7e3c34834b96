"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) as a peer
in a LLaVA language model (docs/method.md §9), and the language-model pruning it runs on.

The vision tower is untouched; after layer ``K`` (2) of the language model only the
``keep`` visual tokens per image that the last prompt token attended to most in layer
``K - 1`` (mean over heads) stay in the sequence, with their original positions. A cached
decode reads the pruned prefill's keys; the output gives every position its state back.

The pruning (hooks, gathered mask / rotary / positions, the pruned KV cache, the output's
states) is :class:`FastV`'s; the rule that picks the kept tokens is its
:meth:`FastV.keep_indices`, which a subclass replaces (DART:
:class:`crossget.methods.dart.DART`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from crossget.merge import gather_tokens

DEFAULT_LAYER = 2  # FastV's K: prune after this many LM layers (the paper's K=2)


def fastv_keep_indices(scores: torch.Tensor, image_mask: torch.Tensor, per_image: int, keep: int) -> torch.Tensor:
    """Positions that stay after FastV's pruning, ascending.

    Args:
        scores: ``[B, L]`` attention the ranking query gives every position.
        image_mask: ``[B, L]`` bool, visual tokens; every row holds the same number of
            images, ``per_image`` visual tokens each, contiguous per image.
        per_image: visual tokens per image.
        keep: visual tokens kept per image (the highest ``scores``).

    Returns:
        ``[B, L - n_images * (per_image - keep)]``: every text position and the kept visual ones.
    """
    img_pos = image_positions(image_mask, per_image)
    img_scores = scores.gather(1, img_pos.flatten(1)).view(img_pos.shape)
    top = img_scores.topk(keep, dim=-1).indices
    return with_text(image_mask, img_pos.gather(2, top).flatten(1))


def cache_len(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding applied as upstream's ``apply_rotary_pos_emb`` (``cos``/``sin``
    broadcast to ``x``)."""
    return x * cos + rotate_half(x) * sin


def image_positions(image_mask: torch.Tensor, per_image: int) -> torch.Tensor:
    """``[B, images, per_image]`` positions of each row's images (``image_mask`` ``[B, L]``:
    the same number of images per row, contiguous per image)."""
    b = image_mask.shape[0]
    return image_mask.nonzero()[:, 1].view(b, -1, per_image)


def with_text(image_mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Every text position of each row and the ``chosen`` ``[B, n]`` visual ones, ascending."""
    b, length = image_mask.shape
    text = (~image_mask).nonzero()[:, 1].view(b, length - int(image_mask[0].sum()))
    return torch.cat([text, chosen], 1).sort(-1).values


def _gather_rope(rope, idx: torch.Tensor):
    b = idx.shape[0]
    return tuple(gather_tokens(t.expand(b, -1, -1), idx) for t in rope)


def _gather_mask(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """``mask`` ``[B, 1, Q, K]`` restricted to query rows ``rows`` and key columns ``cols`` (``[B, *]``)."""
    if not isinstance(mask, torch.Tensor):
        return mask  # None: causal on the pruned (still ordered) sequence is right
    b = cols.shape[0]
    mask = mask.expand(b, -1, -1, -1)
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


@dataclass(eq=False)
class FastV:
    """FastV in one language model: settings, per-forward bookkeeping and the hooks.

    The caller (the family's forward pre-hook) calls :meth:`set_prompt` before each forward
    (``image_mask`` ``[B, L]``, ``query_pos`` ``[B]``: the ranking query, the last real prompt
    token). :attr:`name` names the method in errors; :meth:`keep_indices` is the selection
    rule (a subclass's own).
    """

    name = "FastV"  # in errors (a class attribute, not a field)

    lm: nn.Module
    layer: int
    keep: int
    per_image: int  # placeholders per image (stock count)
    image_mask: torch.Tensor | None = None
    query_pos: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, L] bool, real (not padding) tokens of the prune forward
    mode: str | None = None  # "prune" (a prefill with images), "decode" (cached prefill was pruned)
    q: torch.Tensor | None = None  # layer K-1 projections of the prune forward
    k: torch.Tensor | None = None
    keep_idx: torch.Tensor | None = None  # [B, L'] positions that stay (ascending)
    drop_idx: torch.Tensor | None = None  # [B, L - L']
    full_len: int = 0
    cache: Any = None  # weakref to the KV cache filled by the pruned prefill
    reduced: dict = field(default_factory=dict)  # kwargs for layers after K (mask, rope, positions)
    dropped: torch.Tensor | None = None  # [B, L - L', C] states of the pruned tokens at layer K

    def __getstate__(self) -> dict:
        # the KV cache link is per generation (and a weak reference cannot be pickled)
        return {**vars(self), "cache": None}

    def set_prompt(self, image_mask: torch.Tensor | None, attention_mask: Any = None, encoded: Any = None) -> None:
        """This forward's image positions ``image_mask`` ``[B, L]`` (None: no images) and its
        ranking query, the last real prompt token of each row (``attention_mask`` ``[B, L]``
        marks the real ones). ``encoded``: the forward's encoder output when the images come
        encoded (generate() without a cache feeds the same ones with a longer sequence at every
        step: the prompt length of their first forward is kept on them, so that every step
        ranks and prunes exactly as the prefill did)."""
        self.image_mask = image_mask
        if image_mask is None:
            return
        length = image_mask.shape[1]
        prompt = encoded.__dict__.setdefault("_crossget", length) if encoded is not None else length
        pos = torch.arange(length, device=image_mask.device).expand(image_mask.shape[0], length)
        ok = pos < prompt
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            ok = ok & attention_mask.bool()
        self.query_pos = torch.where(ok, pos, -1).amax(-1)

    @property
    def attn(self) -> nn.Module:
        return self.lm.layers[self.layer - 1].self_attn

    def install(self) -> list:
        """Register the hooks; returns their handles."""
        handles = [
            self.lm.register_forward_pre_hook(self.lm_pre, with_kwargs=True),
            self.lm.register_forward_hook(self.lm_post, with_kwargs=True),
            self.attn.q_proj.register_forward_hook(self.capture_q),
            self.attn.k_proj.register_forward_hook(self.capture_k),
        ]
        for i in range(self.layer, len(self.lm.layers)):
            handles.append(self.lm.layers[i].register_forward_pre_hook(LayerHook(self, i), with_kwargs=True))
        return handles

    # ------------------------------------------------------------------ hooks
    def lm_pre(self, _module, args, kwargs):
        self.mode = None
        self.q = self.k = None
        cache = kwargs.get("past_key_values")
        mask = self.image_mask
        if mask is not None and mask.any() and self.keep < self.per_image:
            if cache_len(cache):
                raise ValueError(f"{self.name} prunes the prefill: a prompt with images cannot continue a filled "
                                 f"KV cache")
            images = mask.sum(-1)
            if bool((images != images[0]).any()) or int(images[0]) % self.per_image:
                raise ValueError(
                    f"{self.name} needs the same number of images in every prompt of a batch, {self.per_image} "
                    f"placeholders each; got {images.tolist()} placeholders"
                )
            self.mode = "prune"
            self.keep_idx = None
            valid = kwargs.get("attention_mask")
            self.valid = valid.bool() if isinstance(valid, torch.Tensor) and valid.dim() == 2 else None
        elif self.keep_idx is not None and cache is not None and self.cache is not None and self.cache() is cache:
            self.mode = "decode"
        elif cache_len(cache) == 0:
            self.keep_idx = self.cache = None  # a new sequence without images

    def capture_q(self, _module, _args, output):
        if self.mode == "prune":
            self.q = output

    def capture_k(self, _module, _args, output):
        if self.mode == "prune":
            self.k = output

    def scores(self, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``[B, L]`` attention of each row's ranking query (layer K-1, mean over heads)."""
        attn = self.attn
        b, length, _ = self.k.shape
        hd = attn.head_dim
        rows = torch.arange(b, device=self.k.device)
        cos, sin = (t.expand(b, -1, -1) for t in rope)
        q = self.q[rows, self.query_pos].view(b, -1, hd)  # [B, H, hd]
        qc, qs = cos[rows, self.query_pos].unsqueeze(1), sin[rows, self.query_pos].unsqueeze(1)
        q = rotary(q, qc, qs)
        k = rotary(self.k.view(b, length, -1, hd), cos.unsqueeze(2), sin.unsqueeze(2))  # [B, L, KV, hd]
        k = k.repeat_interleave(attn.num_key_value_groups, dim=2)  # [B, L, H, hd]
        logits = torch.einsum("bhd,blhd->bhl", q.float(), k.float()) * attn.scaling
        pos = torch.arange(length, device=k.device)
        allowed = pos.unsqueeze(0) <= self.query_pos.unsqueeze(1)  # causal
        if self.valid is not None:
            allowed = allowed & self.valid
        logits = logits.masked_fill(~allowed.unsqueeze(1), -math.inf)
        return logits.softmax(-1).mean(1)

    def keep_indices(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The rule: ``[B, L']`` positions that stay (ascending), from layer ``K``'s input
        ``x`` ``[B, L, C]`` and kwargs (and layer ``K - 1``'s captured projections)."""
        return fastv_keep_indices(self.scores(kwargs["position_embeddings"]), self.image_mask, self.per_image,
                                  self.keep)

    def prune(self, args, kwargs):
        x = args[0]
        b, length, _ = x.shape
        keep_idx = self.keep_indices(x, kwargs)
        kept = torch.zeros(b, length, dtype=torch.bool, device=x.device).scatter_(1, keep_idx, True)
        self.keep_idx, self.drop_idx, self.full_len = keep_idx, (~kept).nonzero()[:, 1].view(b, -1), length
        self.dropped = gather_tokens(x, self.drop_idx)
        cache = kwargs.get("past_key_values")
        self.cache = weakref.ref(cache) if cache is not None else None
        position_ids = kwargs.get("position_ids")
        self.reduced = {
            "attention_mask": _gather_mask(kwargs.get("attention_mask"), keep_idx, keep_idx),
            "position_embeddings": _gather_rope(kwargs["position_embeddings"], keep_idx),
        }
        if position_ids is not None:
            self.reduced["position_ids"] = position_ids.expand(b, -1).gather(1, keep_idx)
        self.q = self.k = None
        return (gather_tokens(x, keep_idx), *args[1:]), {**kwargs, **self.reduced}

    def layer_pre(self, index: int, args, kwargs):
        if self.mode == "prune":
            if index == self.layer:
                return self.prune(args, kwargs)
            return args, {**kwargs, **self.reduced}
        if self.mode == "decode":
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                # cached keys of the pruned prefill, then every later token
                b, total = self.keep_idx.shape[0], mask.shape[-1]
                later = torch.arange(self.full_len, total, device=mask.device).expand(b, -1)
                return args, {**kwargs, "attention_mask": _gather_mask(mask, None, torch.cat([self.keep_idx, later], 1))}
        return None

    def lm_post(self, _module, _args, _kwargs, output):
        mode, self.mode = self.mode, None  # layers called on their own afterwards are left alone
        if mode != "prune" or self.keep_idx is None:
            return output
        # give every position its state back (pruned tokens: their layer-K input, normed)
        x = output.last_hidden_state
        b, _, c = x.shape
        full = x.new_empty(b, self.full_len, c)
        full.scatter_(1, self.keep_idx.unsqueeze(-1).expand(-1, -1, c), x)
        full.scatter_(1, self.drop_idx.unsqueeze(-1).expand(-1, -1, c), self.lm.norm(self.dropped))
        output.last_hidden_state = full
        self.dropped, self.reduced = None, {}
        return output


@dataclass(eq=False)
class LayerHook:
    """Pre-hook of LM layer ``index`` (>= K): runs it on the pruned sequence."""

    fastv: FastV
    index: int

    def __call__(self, module, args, kwargs):
        return self.fastv.layer_pre(self.index, args, kwargs)
