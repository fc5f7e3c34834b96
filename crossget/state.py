"""Per-forward state of one reduced encoder, shared by its layers and attentions.

ToMe keeps a ``_tome_info`` dict on the model; here each patched tower has one
:class:`TowerState`: the settings chosen at :func:`crossget.patch` time and the token
bookkeeping of the forward in flight (sizes, positions, padding, protected tokens,
which output token covers each input token, the cross token). Model families only
call into this object; none of them holds merging logic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from crossget.merge import (
    Merge,
    attention_bias,
    bipartite_soft_matching,
    complete_graph_soft_matching,
    gather_tokens,
)

METHODS = ("crossget", "tome", "none")
METRICS = ("keys", "keys_mean")


@dataclass
class TowerSettings:
    """What :func:`crossget.patch` chose for one encoder.

    ``r`` has one entry per layer; ``method`` is ``crossget``, ``tome`` or ``none``
    (patched, never merges); ``metric`` is ``keys`` (heads concatenated) or
    ``keys_mean`` (ToMe's mean over heads).
    """

    kind: str  # "vision" or "text"
    r: list[int]
    method: str = "crossget"
    prop_attn: bool = True
    metric: str = "keys"
    trace_sources: bool = False  # keep the input -> output token map (visualisation)
    # how the cross token rates tokens: "cross" is SPEC §3's cos(q_cross, k_i); "attention"
    # is the authors' LLaVA rule: mean attention a token receives plus the cross token's
    # attention to it (needs the attention's head-mean probabilities, see observe());
    # "none" is complete-graph matching with a plain size-weighted average (ablation: no
    # cross token at all)
    importance: str = "cross"

    @property
    def uses_cross_token(self) -> bool:
        return self.method == "crossget" and self.importance != "none"


@dataclass
class TowerState:
    """Settings plus the bookkeeping of the current forward. Shapes: ``B`` batch,
    ``N`` current tokens, ``N0`` tokens at the encoder input, ``C`` width."""

    settings: TowerSettings
    heads: int = 1  # attention heads, for the keys_mean metric
    cross_tokens: nn.Parameter | None = None  # theta, [layers, C]
    causal: bool = False
    restore_length: bool = False  # give the encoder output its input length back (text)
    # inputs of the tower, set by its pre-hook
    anchor: torch.Tensor | None = None  # [B] index of CLS / EOT
    input_valid: torch.Tensor | None = None  # [B, N0] bool, text padding
    # token bookkeeping, reset by start()
    size: torch.Tensor | None = None  # [B, N, 1]
    pos: torch.Tensor | None = None  # [B, N] largest original position covered (causal)
    valid: torch.Tensor | None = None  # [B, N] bool
    protected: torch.Tensor | None = None  # [B, N] bool
    token_map: torch.Tensor | None = None  # [B, N0] output index of every input token (if tracked)
    merged: bool = False
    cross: torch.Tensor | None = None  # [B, 1, C] cross token output of the last layer
    cross_outputs: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens after each layer
    match_seconds: list[float] | None = None  # set to [] to time matching + merging
    # handed from the attention to its layer within one layer call
    keys: torch.Tensor | None = None  # [B, N (+1), C]
    cross_query: torch.Tensor | None = None  # [B, 1, C]
    attention: torch.Tensor | None = None  # [B, N (+1), N (+1)] head-mean probabilities (importance="attention")
    _with_cross: bool = False

    # ----------------------------------------------------------------- forward start/end
    def start(self, x: torch.Tensor) -> None:
        """Reset the bookkeeping for encoder input ``x`` ``[B, N0, C]``."""
        b, n, _ = x.shape
        dev = x.device
        anchor = self.anchor if self.anchor is not None else torch.zeros(b, dtype=torch.long, device=dev)
        self.size = None  # all ones until the first merge
        self.valid = self.input_valid
        self.pos = torch.arange(n, device=dev).expand(b, n) if self.causal else None
        self.protected = torch.zeros(b, n, dtype=torch.bool, device=dev)
        self.protected[torch.arange(b, device=dev), anchor] = True
        track = self.restore_length or self.settings.trace_sources
        self.token_map = torch.arange(n, device=dev).expand(b, n) if track else None
        self.merged = False
        self.cross_outputs = []
        self.tokens = []
        self.cross = None
        if self.settings.uses_cross_token:
            # SPEC §3: the cross token starts as a copy of CLS (vision) / EOT (text).
            self.cross = x[torch.arange(b, device=dev), anchor].unsqueeze(1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """End of the encoder: optionally give every input position its token back.

        Text towers pool by original positions (EOT), so they get ``[B, N0, C]`` back,
        each position holding the state of the token that covers it. Vision towers keep
        the reduced sequence (CLS first).
        """
        self.keys = self.cross_query = None
        if self.restore_length and self.merged:
            return gather_tokens(x, self.token_map)
        return x

    # --------------------------------------------------------------------- per layer
    # A patched layer runs: begin_layer -> attention (observe) -> reduce -> MLP -> end_layer.
    def begin_layer(
        self, x: torch.Tensor, upstream_mask: torch.Tensor | None, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Append the cross token and choose the attention mask.

        The cross token entering ``layer`` is ``stopgrad(its previous output) + theta_layer``
        (SPEC §3). It sees every token but no token sees it, so it never changes the
        other tokens' states. Returns ``(x [B, N (+1), C], mask, upstream_kept)``; until
        something merged and without a cross token, upstream's mask (and ``is_causal``)
        is exact and kept.
        """
        self._with_cross = self.cross is not None and self.cross_tokens is not None
        if not self._with_cross:
            if not self.merged:
                return x, upstream_mask, True
            size = self.size if self.settings.prop_attn else None
            return x, attention_bias(size, self.valid, self.pos, x.dtype), False
        cross = self.cross.detach() + self.cross_tokens[layer].to(x.dtype)
        size = self.size if (self.merged and self.settings.prop_attn) else None
        if size is None and self.valid is None and self.pos is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)  # the mask needs a shape
        mask = attention_bias(size, self.valid, self.pos, x.dtype, observer=True)
        return torch.cat([x, cross], 1), mask, False

    def needs_attention(self, layer: int) -> bool:
        """Whether ``layer``'s attention must hand its probabilities to :meth:`observe`
        (``importance="attention"`` in a layer that merges)."""
        s = self.settings
        return s.importance == "attention" and s.method != "none" and s.r[layer] > 0

    def observe(self, query: torch.Tensor, key: torch.Tensor, attention: torch.Tensor | None = None) -> None:
        """Called by the patched attention with its ``[B, N (+1), C]`` projected queries and
        keys, heads concatenated (before the split into heads), and for
        ``importance="attention"`` its softmax probabilities averaged over heads,
        ``[B, N (+1), N (+1)]`` (queries x keys)."""
        self.keys = key
        self.cross_query = query[:, -1:] if self._with_cross else None
        self.attention = attention

    def end_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Record and strip the cross token: the layer returns ``[B, N, C]``."""
        if not self._with_cross:
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
            timed = self.match_seconds is not None
            if timed:
                _sync(x)
                start = time.perf_counter()
            with torch.profiler.record_function("crossget.match"):
                x = self._merge(x, self._match(r))
            if timed:
                _sync(x)
                self.match_seconds.append(time.perf_counter() - start)
        self.keys = self.cross_query = self.attention = None
        self.tokens.append(x.shape[1] - self._with_cross)
        return x

    def _match(self, r: int) -> Merge:
        keys = self.keys[:, :-1] if self._with_cross else self.keys  # [B, N, C]
        if self.settings.metric == "keys_mean":
            b, n, _ = keys.shape
            metric = keys.view(b, n, self.heads, -1).mean(2)
        else:
            metric = keys
        groups = None if self.valid is None else self.valid.long()
        if self.settings.method == "tome":
            return bipartite_soft_matching(metric, r, self.protected, groups)
        importance = None
        if self.settings.importance == "attention" and self.attention is not None:
            # the authors' LLaVA rule: mean attention token i receives from the N tokens,
            # plus the cross token's attention to it (the cross token's query is the last row)
            n = keys.shape[1]
            importance = self.attention[:, :n, :n].mean(1)
            if self._with_cross:
                importance = importance + self.attention[:, -1, :n]
        elif self.cross_query is not None:
            # SPEC §3: I_i = cos(q_cross, k_i), heads concatenated.
            q = self.cross_query.transpose(1, 2)  # [B, C, 1]
            importance = (keys @ q).squeeze(-1) / (keys.norm(dim=-1) * q.norm(dim=1)).clamp_min(1e-12)
        return complete_graph_soft_matching(metric, r, importance, self.protected, groups)

    def _merge(self, x: torch.Tensor, merge: Merge) -> torch.Tensor:
        x, self.size = merge(x, self.size)
        # protected and padding flags are equal within a group: the kept token's value holds
        self.protected = merge.keep_only(self.protected)
        if self.valid is not None:
            self.valid = merge.keep_only(self.valid)
        if self.pos is not None:
            self.pos = merge.amax(self.pos)  # strict causality: a group is as late as its last token
        if self.token_map is not None:
            self.token_map = merge.slots().gather(1, self.token_map)
        self.merged = True
        return x


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
