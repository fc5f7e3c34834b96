"""Token merging: pure, batched torch functions shared by every method (no model code here).

A matcher (:func:`crossget.methods.crossget.complete_graph_soft_matching`,
:func:`crossget.methods.tome.bipartite_soft_matching`) returns a :class:`Merge`, which
applies the chosen groups to any ``[B, N, D]`` tensor; :class:`TokenBookkeeping` applies
it to the per-token facts a forward tracks (sizes, positions, padding, protected tokens,
the token map). Also here: the additive attention mask of merged tokens
(docs/method.md §6) and the helpers matchers share.

Shapes: ``B`` batch, ``N`` tokens in, ``N - r`` tokens out, ``C``/``D`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "Merge",
    "TokenBookkeeping",
    "attention_bias",
    "clamp_r",
    "cosine_similarity",
    "gather_tokens",
    "protected_mask",
    "sources_from_token_map",
]


@dataclass
class Merge:
    """The groups one layer forms, applicable to any per-token tensor.

    Attributes:
        keep: ``[B, N - r]`` indices of the surviving tokens (destinations and untouched
            tokens), ascending, so surviving tokens keep their original order.
        src: ``[B, r]`` indices of the tokens merged away.
        dst: ``[B, r]`` output slot (index into ``keep``) that each source joins.
        weight: ``[B, N, 1]`` ensemble weight of every input token (``exp(importance)``),
            or None for a plain size-weighted average.
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor | None = None
    _flats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def flat_indices(self, rows_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of keep, src and dst rows in a flattened ``[B * rows_in, D]`` input and
        its ``[B * (rows_in - r), D]`` output; rows past ``N`` are kept after the merged
        ones. Row gathers on the flattened batch are several times faster than
        ``gather(1, ...)`` on CPU; cached, since every tensor of a layer reuses them."""
        if rows_in not in self._flats:
            b, n_out = self.keep.shape
            n_in = n_out + self.r
            keep = self.keep
            if rows_in > n_in:
                extra = torch.arange(n_in, rows_in, device=keep.device).expand(b, -1)
                keep = torch.cat([keep, extra], 1)
            base = torch.arange(b, device=keep.device).unsqueeze(1)
            rows_out = rows_in - self.r
            self._flats[rows_in] = (
                (keep + base * rows_in).flatten(),
                (self.src + base * rows_in).flatten(),
                (self.dst + base * rows_out).flatten(),
            )
        return self._flats[rows_in]

    def __call__(
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble ``x`` ``[B, N + E, D]`` with token sizes ``size`` ``[B, N, 1]`` (ones if None).

        Each group ``G`` becomes ``sum s_i w_i x_i / sum s_i w_i`` and has size ``sum s_i``
        (docs/method.md §5). ``E`` trailing tokens that took no part in matching (a cross token)
        pass through unchanged, after the merged ones. Returns
        ``(x [B, N - r + E, D], size [B, N - r, 1])``; sizes are float32 (bfloat16 is
        not exact above 256).
        """
        b, n_out = self.keep.shape
        n_in = n_out + self.r
        if x.dim() != 3 or x.shape[0] != b or x.shape[1] < n_in:
            raise ValueError(f"merge expects [B={b}, N>={n_in}, D], got {tuple(x.shape)}")
        rows, d = x.shape[1], x.shape[2]
        keep_x, src_x, dst_x = self.flat_indices(rows)
        keep_t, src_t, dst_t = self.flat_indices(n_in)
        s = None if size is None else size.reshape(-1, 1).float()
        if self.weight is None:
            w = x.new_ones(b * n_in, 1, dtype=torch.float32) if s is None else s
        else:
            w = self.weight.reshape(-1, 1).float()
            w = w if s is None else w * s
        w_src = w.index_select(0, src_t)
        total = w.index_select(0, keep_t).index_add_(0, dst_t, w_src)  # [B * (N - r), 1]
        flat = x.reshape(-1, d)
        out = flat.index_select(0, keep_x)
        if self.r:
            # x_G = x_dst + sum_src (w_src / W_G) (x_src - x_dst): only the r sources and
            # their destinations are touched, in float32 (half precision loses digits).
            x_src = flat.index_select(0, src_x).float()
            x_dst = out.index_select(0, dst_x).float()
            coef = w_src / total.index_select(0, dst_t)
            out.index_add_(0, dst_x, (coef * (x_src - x_dst)).to(x.dtype))
        if self.weight is None:
            new_size = total
        else:
            s = x.new_ones(b * n_in, 1, dtype=torch.float32) if s is None else s
            new_size = s.index_select(0, keep_t).index_add_(0, dst_t, s.index_select(0, src_t))
        return out.view(b, -1, d), new_size.view(b, -1, 1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` ``[B, N, D]`` over each group: ``[B, N - r, D]``."""
        b, n, d = t.shape
        keep, src, dst = self.flat_indices(n)
        flat = t.reshape(-1, d)
        return flat.index_select(0, keep).index_add_(0, dst, flat.index_select(0, src)).view(b, -1, d)

    def amax(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of ``t`` ``[B, N]`` over each group (e.g. positions for causality)."""
        out = t.gather(1, self.keep)
        if self.r:
            out = out.scatter_reduce(1, self.dst, t.gather(1, self.src), reduce="amax")
        return out

    def keep_only(self, t: torch.Tensor) -> torch.Tensor:
        """Value of the surviving token of each group (for flags that match within groups)."""
        return t.gather(1, self.keep) if t.dim() == 2 else gather_tokens(t, self.keep)

    def slots(self) -> torch.Tensor:
        """``[B, N]`` output index of every input token (its group's slot)."""
        b, n_out = self.keep.shape
        slot = self.keep.new_empty(b, n_out + self.r)
        slot.scatter_(1, self.keep, torch.arange(n_out, device=slot.device).expand(b, -1))
        if self.r:
            slot.scatter_(1, self.src, self.dst)
        return slot


@dataclass
class TokenBookkeeping:
    """What one forward knows about its current tokens; :meth:`apply` updates it for a merge.

    Attributes (``B`` batch, ``N`` current tokens, ``N0`` tokens at the encoder input):
        size: ``[B, N, 1]`` input tokens each token covers (None: all ones, nothing merged).
        valid: ``[B, N]`` bool, real (not padding) tokens; None: all real.
        pos: ``[B, N]`` largest original position covered (causal text); None otherwise.
        protected: ``[B, N]`` bool, never merged (CLS / EOT).
        token_map: ``[B, N0]`` output index of every input token (None: not tracked).
        merged: whether any merge happened.
    """

    protected: torch.Tensor
    valid: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    token_map: torch.Tensor | None = None
    size: torch.Tensor | None = None
    merged: bool = False

    @classmethod
    def start(
        cls, x: torch.Tensor, anchor: torch.Tensor | None, valid: torch.Tensor | None, causal: bool, track: bool,
        protect_anchor: bool = True, protect_leading: int = 0,
    ) -> TokenBookkeeping:
        """Fresh bookkeeping for encoder input ``x`` ``[B, N0, C]``. Protected (docs/method.md §4):
        ``anchor`` ``[B]`` (default token 0) unless ``protect_anchor`` is False (SigLIP vision:
        no CLS), and the ``protect_leading`` first tokens (DeiT's distillation token, registers);
        ``track`` keeps the token map."""
        b, n, _ = x.shape
        dev = x.device
        anchor = anchor if anchor is not None else torch.zeros(b, dtype=torch.long, device=dev)
        protected = torch.zeros(b, n, dtype=torch.bool, device=dev)
        if protect_anchor:
            protected[torch.arange(b, device=dev), anchor] = True
        protected[:, :protect_leading] = True
        return cls(
            protected=protected,
            valid=valid,
            pos=torch.arange(n, device=dev).expand(b, n) if causal else None,
            token_map=torch.arange(n, device=dev).expand(b, n) if track else None,
        )

    def append_padding(self, k: int) -> None:
        """Account for ``k`` padding tokens appended after the current ``N`` (see
        :func:`padding_room`): unprotected, not valid, visible to nobody."""
        b = self.protected.shape[0]
        self.protected = torch.cat([self.protected, self.protected.new_zeros(b, k)], 1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(b, k)], 1)
        if self.pos is not None:
            self.pos = torch.cat([self.pos, self.pos.amax(1, keepdim=True).expand(b, k)], 1)
        if self.size is not None:
            self.size = torch.cat([self.size, self.size.new_ones(b, k, 1)], 1)

    def apply(self, merge: Merge, x: torch.Tensor) -> torch.Tensor:
        """Merge ``x`` ``[B, N, C]`` and update every fact; returns ``[B, N - r, C]``."""
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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x`` ``[B, N, D]`` and ``index`` ``[B, M]``: ``[B, M, D]``."""
    b, n, d = x.shape
    # a row gather on the flattened batch is several times faster than gather(1, ...) on CPU
    return x.reshape(b * n, d).index_select(0, _flat(index, n)).view(b, -1, d)


def _flat(index: torch.Tensor, n: int) -> torch.Tensor:
    """Row indices ``[B, M]`` into a ``[B, n, D]`` tensor as indices into ``[B * n, D]``."""
    offsets = torch.arange(0, index.shape[0] * n, n, device=index.device).unsqueeze(1)
    return (index + offsets).flatten()


def expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, like.shape[-1])


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Na, Nb]`` cosine similarities of the rows of ``a`` ``[B, Na, C]`` and ``b``
    (``b=None``: of ``a`` with itself).

    Scaling the ``Na x Nb`` products is cheaper than normalising ``C``-wide rows; for
    ``a`` with itself the squared norms are the diagonal of the product, for free.
    """
    a = a.float()
    if b is None:
        prod = a @ a.transpose(1, 2)
        # a matmul is not bit-symmetric (its blocking depends on N): average with the
        # transpose so that mutual best pairs tie exactly and ties break by token index
        # (docs/method.md §4), whatever the sequence length or padding
        prod = (prod + prod.transpose(1, 2)).mul_(0.5)
        inv_a = inv_b = prod.diagonal(dim1=1, dim2=2).clamp_min(1e-24).rsqrt()
    else:
        b = b.float()
        prod = a @ b.transpose(1, 2)
        inv_a = a.norm(dim=-1).clamp_min(1e-12).reciprocal()
        inv_b = b.norm(dim=-1).clamp_min(1e-12).reciprocal()
    # one symmetric scale, so that cos(i, j) == cos(j, i) bit for bit (ties stay ties)
    return prod.mul_(inv_a.unsqueeze(2) * inv_b.unsqueeze(1))


def protected_mask(
    protected: torch.Tensor | None, b: int, n: int, device: torch.device
) -> torch.Tensor:
    if protected is None:
        return torch.zeros(b, n, dtype=torch.bool, device=device)
    protected = protected.to(device=device, dtype=torch.bool)
    if protected.dim() == 1:
        protected = protected.unsqueeze(0)
    if protected.shape[-1] != n or protected.shape[0] not in (1, b):
        raise ValueError(f"protected must be [N={n}] or [B={b}, N={n}], got {tuple(protected.shape)}")
    return protected.expand(b, n)


def check_match_inputs(metric: torch.Tensor, r: int, groups: torch.Tensor | None) -> None:
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int, got {r!r}")
    if groups is not None and groups.shape != metric.shape[:2]:
        raise ValueError(f"groups must be [B, N]={tuple(metric.shape[:2])}, got {tuple(groups.shape)}")


def clamp_r(r: int, n_free: torch.Tensor, n_finite: torch.Tensor | None) -> int:
    """docs/method.md §4: ``r <= floor((N - P) / 2)``, for the row with the most protected tokens.

    With groups (padding) a row may also run out of tokens that have a partner in
    their own group; r then shrinks for the whole batch so that no token ever joins a
    group it must not join.
    """
    r = min(r, int(n_free.min()) // 2)
    if n_finite is not None:
        r = min(r, int(n_finite.min()))
    return max(r, 0)


def padding_budget(
    r: int, n_free: torch.Tensor, n_free_real: torch.Tensor, real: torch.Tensor, finite: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """The batch's ``r`` and each row's share of it spent on real tokens (docs/method.md §4).

    A row merges its real tokens exactly as it would alone, unpadded: ``cap = min(r,
    floor((N_real - P) / 2), real candidates with a partner)``; its padding (group 0)
    absorbs the rest of the batch's ``r``. ``r`` shrinks for the whole batch only by the
    usual ``floor((N - P) / 2)`` or when a row has too little padding with a partner.

    Args:
        r: tokens the layer removes.
        n_free: ``[B]`` unprotected tokens per row.
        n_free_real: ``[B]`` unprotected real (not padding) tokens per row.
        real: bool ``[B, M]`` candidates that are real tokens.
        finite: bool ``[B, M]`` candidates that have a partner to merge into.

    Returns:
        ``(r, cap)``: the batch's r and ``[B]`` real merges per row.
    """
    cap = torch.minimum(n_free_real // 2, (finite & real).sum(-1)).clamp(max=r)
    room = cap + (finite & ~real).sum(-1)
    r = max(min(r, int(n_free.min()) // 2, int(room.min())), 0)
    return r, cap.clamp(max=r)


def padding_room(
    r: int, valid: torch.Tensor, protected: torch.Tensor, bipartite: bool
) -> tuple[int, int]:
    """``(r, k)``: the batch's ``r`` and how many padding tokens to append so that every row
    can spend ``min(r, floor((N_real - P) / 2))`` merges on its real tokens and absorb the rest
    of ``r`` in its padding (docs/method.md §4). ``k`` is 0 unless some row has too little
    padding left (deep layers, after earlier layers' merges went into it).

    ``valid``, ``protected``: bool ``[B, N]``; ``bipartite``: ToMe's alternating sets (padding
    absorbs through its A tokens that have a B partner) rather than the complete graph.
    """
    n = valid.shape[1]
    r = max(min(r, int((~protected).sum(-1).min()) // 2), 0)
    need = (r - ((valid & ~protected).sum(-1) // 2).clamp(max=r)).clamp(min=0)  # [B]
    pad = ~valid
    if not bipartite:  # n_pad + k padding tokens absorb n_pad + k - 1 merges
        k = int((need - pad.sum(-1) + 1).masked_fill(need == 0, 0).clamp(min=0).max())
        return r, k
    is_a = torch.arange(n, device=valid.device) % 2 == 0
    for k in range(0, 2 * int(need.max()) + 3):
        extra_a = (torch.arange(n, n + k, device=valid.device) % 2 == 0).sum()
        pad_a = (pad & is_a).sum(-1) + extra_a
        pad_b = (pad & ~is_a).sum(-1) + (k - extra_a)
        room = torch.where(pad_b > 0, pad_a, 0)
        if bool((room >= need).all()):
            return r, k
    return r, 0  # not reached: k = 2 * need + 1 always suffices


def real_tokens_first(order: torch.Tensor, real: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Reorder candidates ``order`` ``[B, M]`` (best first) so that each row takes its first
    ``cap`` ``[B]`` real ones, then its padding, then the rest; each part keeps its order."""
    real_sorted = real.gather(1, order)
    real_rank = real_sorted.cumsum(-1) - 1
    part = torch.where(real_sorted, torch.where(real_rank < cap.unsqueeze(1), 0, 2), 1)
    return order.gather(1, part.argsort(dim=-1, stable=True))


def attention_bias(
    size: torch.Tensor | None,
    valid: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    observer: bool = False,
) -> torch.Tensor | None:
    """Additive attention mask for merged tokens (docs/method.md §6).

    Args:
        size: ``[B, N, 1]`` token sizes; adds ``log(s_j)`` to the logits of key ``j``
            (proportional attention) or nothing if None.
        valid: bool ``[B, N]``; keys that are padding are masked.
        pos: ``[B, N]`` largest original position each token covers; if given, query
            ``i`` only sees keys with ``pos_j <= pos_i`` (causal text).
        observer: one more token follows the ``N``: it sees every valid key (itself
            included, with size 1) and no other query sees it (the cross token).

    Returns:
        ``[B, 1, 1, N]`` (no causality, no observer) or ``[B, 1, N (+1), N (+1)]`` float
        mask, or None if nothing needs masking.
    """
    if size is None and valid is None and pos is None and not observer:
        return None
    ref = next((t for t in (size, valid, pos) if t is not None), None)
    b, n = ref.shape[:2] if ref is not None else (None, None)
    if observer:
        if ref is None:
            raise ValueError("attention_bias(observer=True) needs size, valid or pos")
        size = None if size is None else _append(size, 1)
        valid = None if valid is None else _append(valid, True)
        n += 1
    device = ref.device
    low = torch.finfo(dtype).min
    bias = torch.zeros(b, 1, 1, n, dtype=dtype, device=device)
    if size is not None:
        bias = size[..., 0].log().to(dtype)[:, None, None, :]
    if valid is not None:
        bias = bias.masked_fill(~valid[:, None, None, :], low)
    if pos is not None:
        if observer:  # the observer's query comes after every position
            pos = torch.cat([pos, pos.new_full((b, 1), torch.iinfo(pos.dtype).max)], 1)
        bias = bias.masked_fill(pos[:, None, None, :] > pos[:, None, :, None], low)
    elif observer:
        bias = bias.expand(b, 1, n, n).clone()
    if observer:
        bias[..., :-1, -1] = low  # no token attends to the observer
    return bias


def _append(t: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``t`` ``[B, N, ...]`` with one more token of ``value``."""
    return torch.cat([t, torch.full_like(t[:, :1], value)], 1)


def sources_from_token_map(token_map: torch.Tensor, n_out: int) -> torch.Tensor:
    """Bool ``[B, n_out, N0]``: which input tokens each output token covers.

    ``token_map`` ``[B, N0]`` holds the output index of every original input token.
    """
    return torch.nn.functional.one_hot(token_map, n_out).transpose(1, 2).bool()
