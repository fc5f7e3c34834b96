"""Per-forward state of one reduced encoder, shared by its layers and attentions.

ToMe keeps a ``_tome_info`` dict on the model; here each patched tower has one
:class:`TowerState`, whose parts have different lifetimes:

- :class:`TowerSettings`: what :func:`crossget.patch` chose (immutable until re-patched);
- the tower's inputs (anchor token, padding), set by the tower's pre-hook;
- a :class:`~crossget.merge.TokenBookkeeping` per forward (sizes, positions, padding,
  protected tokens, token map) and the cross token of the forward in flight;
- the hand-off from a layer's attention to the same layer's merge (keys, cross query).

Timing is not done here: a tool may set :attr:`TowerState.match_observer`, a context
manager factory wrapped around every matching + merging step. Model families only call
into this object; none of them holds merging logic.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from crossget.merge import Merge, TokenBookkeeping, attention_bias, gather_tokens, padding_room
from crossget.methods import crossget as crossget_method
from crossget.methods import tome


@dataclass(frozen=True)
class TowerSettings:
    """What :func:`crossget.patch` chose for one encoder.

    ``r`` has one entry per layer; ``method`` is ``crossget``, ``tome`` or ``none``
    (patched, never merges); ``metric`` is ``keys`` (heads concatenated) or
    ``keys_mean`` (ToMe's mean over heads).
    """

    kind: str  # "vision" or "text"
    r: tuple[int, ...]
    method: str = "crossget"
    prop_attn: bool = True
    metric: str = "keys"
    trace_sources: bool = False  # keep the input -> output token map (visualisation)
    # how the cross token rates tokens (docs/method.md §3, §10): "cross" is cos(q_cross, k_i);
    # "attention" is the authors' LLaVA rule (needs the attention's head-mean probabilities,
    # see observe()); "none" is complete-graph matching with a plain size-weighted average
    # (ablation: no cross token at all)
    importance: str = "cross"
    # how importance enters the ranking (docs/method.md §3 "Guidance"; crossget.config.GUIDANCE)
    guidance: str = "reference"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", tuple(self.r))

    @property
    def uses_cross_token(self) -> bool:
        return self.method == "crossget" and self.importance != "none"


@dataclass(eq=False)
class TowerState:
    """Settings plus the bookkeeping of the current forward. Shapes: ``B`` batch,
    ``N`` current tokens, ``N0`` tokens at the encoder input, ``C`` width."""

    settings: TowerSettings
    heads: int = 1  # attention heads, for the keys_mean metric
    cross_tokens: nn.Parameter | None = None  # theta, [layers, C]
    causal: bool = False
    restore_length: bool = False  # give the encoder output its input length back (text)
    protect_anchor: bool = True  # the anchor (CLS / EOT) never merges; False: SigLIP vision (no CLS)
    protect_leading: int = 0  # the first tokens never merge either (DeiT's distillation token, registers)
    # inputs of the tower, set by its pre-hook
    anchor: torch.Tensor | None = None  # [B] index of CLS / EOT
    input_valid: torch.Tensor | None = None  # [B, N0] bool, text padding
    # the forward in flight, reset by start()
    book: TokenBookkeeping | None = None
    cross: torch.Tensor | None = None  # [B, 1, C] cross token output of the last layer
    cross_outputs: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens after each layer
    # token map after each layer (None until something merged, or untracked): hidden states' restore
    token_maps: list[torch.Tensor | None] = field(default_factory=list)
    # optional observer of every matching + merging step: called with the layer input x,
    # returns a context manager (the benchmarks' timer)
    match_observer: Callable[[torch.Tensor], AbstractContextManager] | None = None
    # handed from the attention to its layer within one layer call
    keys: torch.Tensor | None = None  # [B, N (+1), C]
    queries: torch.Tensor | None = None  # [B, N (+1), C], kept for importance="attention" only
    cross_query: torch.Tensor | None = None  # [B, 1, C]
    layer_mask: torch.Tensor | None = None  # the additive mask this layer's attention ran with
    with_cross: bool = False  # this layer's input carries the cross token last

    # ------------------------------------------------ read access to the bookkeeping
    @property
    def size(self) -> torch.Tensor | None:
        """``[B, N, 1]`` input tokens each output token covers (None: nothing merged)."""
        return self.book.size if self.book is not None else None

    @property
    def token_map(self) -> torch.Tensor | None:
        """``[B, N0]`` output index of every input token (if tracked)."""
        return self.book.token_map if self.book is not None else None

    @property
    def merged(self) -> bool:
        return self.book is not None and self.book.merged

    # ----------------------------------------------------------------- forward start/end
    def start(self, x: torch.Tensor) -> None:
        """Reset the bookkeeping for encoder input ``x`` ``[B, N0, C]``."""
        track = self.restore_length or self.settings.trace_sources
        self.book = TokenBookkeeping.start(x, self.anchor, self.input_valid, self.causal, track,
                                           self.protect_anchor, self.protect_leading)
        self.cross_outputs = []
        self.tokens = []
        self.token_maps = []
        self.cross = None
        if self.settings.uses_cross_token:
            # docs/method.md §3: the cross token starts as a copy of CLS (vision) / EOT (text).
            b = x.shape[0]
            anchor = self.anchor if self.anchor is not None else torch.zeros(b, dtype=torch.long, device=x.device)
            self.cross = x[torch.arange(b, device=x.device), anchor].unsqueeze(1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """End of the encoder: optionally give every input position its token back.

        Text towers pool by original positions (EOT), so they get ``[B, N0, C]`` back,
        each position holding the state of the token that covers it. Vision towers keep
        the reduced sequence (CLS first).
        """
        self.keys = self.cross_query = None
        if self.restore_length and self.merged:
            return gather_tokens(x, self.book.token_map)
        return x

    # --------------------------------------------------------------------- per layer
    # A patched layer runs: begin_layer -> attention (observe) -> reduce -> MLP -> end_layer.
    def begin_layer(
        self, x: torch.Tensor, upstream_mask: torch.Tensor | None, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Append the cross token and choose the attention mask.

        The cross token entering ``layer`` is ``stopgrad(its previous output) + theta_layer``
        (docs/method.md §3). It sees every token but no token sees it, so it never changes
        the other tokens' states. Returns ``(x [B, N (+1), C], mask, upstream_kept)``; until
        something merged and without a cross token, upstream's mask (and ``is_causal``)
        is exact and kept.
        """
        book = self.book
        self.with_cross = self.cross is not None and self.cross_tokens is not None
        if not self.with_cross:
            if not book.merged:
                self.layer_mask = upstream_mask
                return x, upstream_mask, True
            size = book.size if self.settings.prop_attn else None
            self.layer_mask = attention_bias(size, book.valid, book.pos, x.dtype)
            return x, self.layer_mask, False
        cross = self.cross.detach() + self.cross_tokens[layer].to(x.dtype)
        size = book.size if (book.merged and self.settings.prop_attn) else None
        if size is None and book.valid is None and book.pos is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)  # the mask needs a shape
        self.layer_mask = attention_bias(size, book.valid, book.pos, x.dtype, observer=True)
        return torch.cat([x, cross], 1), self.layer_mask, False

    def observe(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Called by the patched attention with its ``[B, N (+1), C]`` projected queries and
        keys, heads concatenated (before the split into heads). The attention itself runs
        with the model's implementation (SDPA, flash, eager): ``importance="attention"``
        recomputes the probabilities it needs from these in the merging layers only."""
        self.keys = key
        self.cross_query = query[:, -1:] if self.with_cross else None
        self.queries = query if self.settings.importance == "attention" else None

    def end_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Record and strip the cross token: the layer returns ``[B, N, C]``."""
        if not self.with_cross:
            return x
        # a copy, not a view: a view would keep every layer's whole output alive until the
        # forward ends (twice the peak activation memory of a 40-layer ViT-g)
        self.cross = x[:, -1:].clone()
        self.cross_outputs.append(self.cross[:, 0])
        return x[:, :-1]

    def reduce(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Merge ``x`` ``[B, N, C]`` by this layer's ``r``; returns ``[B, N - r', C]``."""
        r = self.settings.r[layer] if self.settings.method != "none" else 0
        if r > 0:
            observed = self.match_observer(x) if self.match_observer is not None else nullcontext()
            with torch.profiler.record_function("crossget.match"), observed:
                if self.book.valid is not None:
                    x, r = self.make_padding_room(x, r)
                x = self.book.apply(self.match(r), x)
        self.keys = self.queries = self.cross_query = self.layer_mask = None
        self.tokens.append(x.shape[1] - self.with_cross)
        self.token_maps.append(self.book.token_map if self.book.merged else None)
        return x

    def make_padding_room(self, x: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
        """Padded text: give every row enough padding to absorb the merges it cannot spend on
        its own tokens, so that its real tokens merge as the row alone would (docs/method.md
        §4). Appends ``k`` padding tokens (zeros, keys all ones) after the current ``N``
        when a row has too little (usually ``k = 0``); returns ``(x, r)``."""
        book = self.book
        r, k = padding_room(r, book.valid, book.protected, self.settings.method == "tome")
        if k == 0:
            return x, r
        if self.queries is not None:
            raise ValueError("attention-based importance does not take padded inputs")
        n = book.valid.shape[1]
        b = x.shape[0]
        x = torch.cat([x[:, :n], x.new_zeros(b, k, x.shape[2]), x[:, n:]], 1)
        self.keys = torch.cat([self.keys[:, :n], self.keys.new_ones(b, k, self.keys.shape[2]), self.keys[:, n:]], 1)
        book.append_padding(k)
        return x, r

    def match(self, r: int) -> Merge:
        """This layer's merge, from the keys its attention observed."""
        keys = self.keys[:, :-1] if self.with_cross else self.keys  # [B, N, C]
        if self.settings.metric == "keys_mean":
            b, n, _ = keys.shape
            metric = keys.view(b, n, self.heads, -1).mean(2)
        else:
            metric = keys
        book = self.book
        groups = None if book.valid is None else book.valid.long()
        if self.settings.method == "tome":
            return tome.bipartite_soft_matching(metric, r, book.protected, groups)
        s = self.settings
        importance = None
        if s.importance == "attention" and self.queries is not None:
            probs = crossget_method.attention_probabilities(self.queries, self.keys, self.heads, self.layer_mask)
            importance = crossget_method.attention_importance(probs, keys.shape[1], self.with_cross)
        elif self.cross_query is not None:
            importance = crossget_method.cross_importance(keys, self.cross_query)
        return crossget_method.complete_graph_soft_matching(
            metric, r, importance, book.protected, groups, guidance=s.guidance, scale=s.guidance_scale)
