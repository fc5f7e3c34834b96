"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", 2024), as a peer at LLaVA's feature layer (docs/method.md §9).

At the feature layer, keep the "dominant" patches that CLS attends to most (summed over
heads) in spatial order, and merge the rest into a few "contextual" tokens: evenly spaced
targets, each other token averaged into its most similar target by head-mean keys. The
contextual share is 10/64, as in the paper's 64/128/192 settings (54+10, 108+20, 162+30).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip import modeling_clip as hf_clip

from crossget.merge import gather_tokens
from crossget.record import record, swap_class, unmark

CONTEXTUAL_SHARE = 10 / 64  # contextual share of VisionZip's budgets (54+10, 108+20, 162+30)


def visionzip_select(
    x: torch.Tensor, cls_attention: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """VisionZip's token selection on one layer's output.

    Args:
        x: ``[B, N, C]``, CLS first.
        cls_attention: ``[B, N - 1]`` attention of CLS to every patch, summed over heads.
        metric: ``[B, N, D]`` keys averaged over heads (contextual merging by cosine).
        dominant: patches kept as they are (highest CLS attention), in spatial order.
        contextual: tokens the remaining patches are merged into: evenly spaced targets
            among them; every other remaining patch joins its most similar target; each
            group is averaged.

    Returns:
        ``[B, 1 + dominant + contextual, C]``: CLS, dominant patches, contextual tokens.
    """
    b, n, c = x.shape
    dom = cls_attention.topk(dominant, dim=-1).indices.sort(dim=-1).values + 1
    keep = torch.cat([dom.new_zeros(b, 1), dom], 1)
    out = gather_tokens(x, keep)
    if not contextual:
        return out
    taken = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
    rest = torch.arange(n, device=x.device).expand(b, n)[~taken].view(b, n - keep.shape[1])  # ascending
    step = max(1, rest.shape[1] // contextual)
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=x.device)
    is_target[torch.arange(0, rest.shape[1], step, device=x.device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    m = nn.functional.normalize(metric.float(), dim=-1)
    assign = (gather_tokens(m, others) @ gather_tokens(m, targets).transpose(1, 2)).argmax(-1)  # [B, O]
    sums = gather_tokens(x, targets).float()
    sums = sums.scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, c), gather_tokens(x, others).float())
    counts = torch.ones(b, targets.shape[1], device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float))
    return torch.cat([out, (sums / counts.unsqueeze(-1)).to(x.dtype)], 1)


def split_budget(room: int, patches: int, contextual: int | None) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``room`` output tokens besides CLS out of ``patches``.

    Raises:
        ValueError: ``contextual`` not an int in ``[0, room]``.
    """
    if contextual is None:
        contextual = round(room * CONTEXTUAL_SHARE)
    if isinstance(contextual, bool) or not isinstance(contextual, int) or not 0 <= contextual <= room:
        raise ValueError(f"contextual must be an int in [0, {room}], got {contextual!r}")
    dominant = room - contextual
    if contextual and dominant + contextual >= patches:
        return room, 0  # nothing left to merge: keep the dominant patches only
    return dominant, contextual


class VisionZipCLIPAttention(hf_clip.CLIPAttention):
    """Eager CLIP attention that hands CLS's attention and the head-mean keys to its layer."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out, probs = hf_clip.eager_attention_forward(
            self, q, k, v, attention_mask, scaling=self.scale, dropout=self.dropout if self.training else 0.0
        )
        self._crossget.glue = (probs[:, :, 0, 1:].sum(1), k.mean(1))  # [B, N-1], [B, N, head_dim]
        return self.out_proj(out.reshape(b, n, -1)), probs


class VisionZipCLIPEncoderLayer(hf_clip.CLIPEncoderLayer):
    """The feature layer: a stock CLIP layer, then VisionZip's selection of its output."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        x = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)[0]
        x = x + self.mlp(self.layer_norm2(x))
        attn = self.self_attn._crossget
        (cls_attention, metric), attn.glue = attn.glue, None
        return visionzip_select(x, cls_attention, metric, *self._crossget.glue)


def install(layer: nn.Module, dominant: int, contextual: int) -> None:
    """Make CLIP encoder ``layer`` select its output as VisionZip does."""
    swap_class(layer, VisionZipCLIPEncoderLayer, glue=(dominant, contextual))
    swap_class(layer.self_attn, VisionZipCLIPAttention)


def budget(layer: nn.Module) -> tuple[int, int] | None:
    """``(dominant, contextual)`` of an installed layer, None if not installed."""
    rec = record(layer)
    return rec.glue if rec is not None and rec.original_class is not None else None


def uninstall(layer: nn.Module) -> None:
    unmark(layer.self_attn, ("original_class", "glue"))
    unmark(layer, ("original_class", "glue"))
