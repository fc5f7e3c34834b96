"""CLIP (Hugging Face transformers >= 5.6): where to merge, and how the towers pool.

Patched: ``CLIPModel``, ``CLIPVisionModel(WithProjection)``, ``CLIPTextModel(WithProjection)``
and any model that holds a ``CLIPVisionModel`` tower (e.g. LLaVA's vision tower).
Each encoder layer runs ``x + Attn(LN1(x))``, merges, then ``x + MLP(LN2(x))``
(docs/method.md §1); the token bookkeeping and the cross token live in
:class:`crossget.state.TowerState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as hf

from crossget.families.base import Family, Tower, no_inputs
from crossget.schedule import EncoderCost


class CrossGETCLIPAttention(hf.CLIPAttention):
    """CLIP attention that shows its queries and keys to the tower state (metric, importance)."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        state = self._crossget.state
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q_heads, k_heads, v_heads = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        probs_needed = state.needs_attention(self._crossget.layer)
        if probs_needed:  # eager: the probabilities are the point (LLaVA's importance)
            attend = hf.eager_attention_forward
            kwargs.pop("is_causal", None)
        else:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        out, weights = attend(
            self, q_heads, k_heads, v_heads, attention_mask,
            scaling=self.scale, dropout=self.dropout if self.training else 0.0, **kwargs,
        )
        state.observe(q, k, weights.mean(1) if probs_needed else None)
        return self.out_proj(out.reshape(b, n, -1)), weights


class CrossGETCLIPEncoderLayer(hf.CLIPEncoderLayer):
    """Pre-LN layer with token reduction between attention and MLP (docs/method.md §1)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        state, layer = self._crossget.state, self._crossget.layer
        x, mask, upstream = state.begin_layer(hidden_states, attention_mask, layer)
        if not upstream:
            kwargs["is_causal"] = False  # causality now lives in the rebuilt mask
        x = x + self.self_attn(self.layer_norm1(x), attention_mask=mask, **kwargs)[0]
        x = state.reduce(x, layer)
        x = x + self.mlp(self.layer_norm2(x))
        return state.end_layer(x)


# --------------------------------------------------------------------------- towers
@dataclass(frozen=True)
class TextInputs:
    """Reads a CLIP text tower's inputs: EOT position (the anchor) and padding."""

    eos_token_id: int

    def __call__(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            raise ValueError("a patched CLIP text tower needs input_ids (to find the EOT token)")
        ids = input_ids.view(-1, input_ids.shape[-1]).int()
        # the same EOT position CLIPTextModel pools from
        anchor = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
        valid = None
        if mask is not None:
            mask = mask.view(ids.shape).bool()
            valid = None if bool(mask.all()) else mask
        return anchor.long(), valid


def tower(kind: str, module: nn.Module) -> Tower:
    """The :class:`Tower` record of a CLIP vision or text model (also LLaVA's vision tower)."""
    text = kind == "text"
    return Tower(
        kind=kind,
        module=module,
        encoder=module.encoder,
        layers=list(module.encoder.layers),
        layer_class=CrossGETCLIPEncoderLayer,
        attention_class=CrossGETCLIPAttention,
        attention_attr="self_attn",
        causal=text,
        restore_length=text,
        read_inputs=TextInputs(module.config.eos_token_id) if text else no_inputs,
        hidden=module.config.hidden_size,
        heads=module.config.num_attention_heads,
    )


TOWER_CLASSES = {hf.CLIPVisionModel: "vision", hf.CLIPTextModel: "text"}


def find_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The CLIP towers of ``model`` by kind (``vision``/``text``), or {} if none."""
    if isinstance(model, tuple(TOWER_CLASSES)):
        return {TOWER_CLASSES[type(model)]: model}
    found = {}
    for attr, kind in (("vision_model", "vision"), ("text_model", "text")):
        sub = getattr(model, attr, None)
        if isinstance(sub, tuple(TOWER_CLASSES)):
            found[kind] = sub
    return found


def encoder_cost(module: nn.Module, kind: str, text_len: int | None = None) -> EncoderCost:
    """Analytic cost of one CLIP tower (also LLaVA's vision tower)."""
    cfg = module.config
    if kind == "vision":
        patches = (cfg.image_size // cfg.patch_size) ** 2
        n, fixed = patches + 1, 2 * patches * cfg.hidden_size * cfg.num_channels * cfg.patch_size**2
    else:
        n, fixed = text_len or cfg.max_position_embeddings, 0.0
    return EncoderCost(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, n, 1, fixed)


class CLIPFamily(Family):
    name = "CLIP"
    classes = (
        hf.CLIPModel,
        hf.CLIPVisionModel,
        hf.CLIPVisionModelWithProjection,
        hf.CLIPTextModel,
        hf.CLIPTextModelWithProjection,
    )

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        return {kind: tower(kind, m) for kind, m in find_towers(model).items()}

    def encoder_cost(self, module: nn.Module, kind: str, text_len: int | None = None) -> EncoderCost:
        return encoder_cost(module, kind, text_len)

    def joint_projection(self, model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Final norm and projection into the joint space, weights detached (docs/method.md §3)."""
        found = find_towers(model).get(kind)
        if kind == "vision":
            norm, proj = getattr(found, "post_layernorm", None), getattr(model, "visual_projection", None)
        else:
            norm, proj = getattr(found, "final_layer_norm", None), getattr(model, "text_projection", None)
        if norm is None or proj is None:
            return None
        return DetachedProjection(norm, proj)


@dataclass(eq=False)
class DetachedProjection:
    """``[*, C] -> [*, P]``: LayerNorm ``norm`` (optional) then linear ``proj``, weights detached:
    the cross-token loss trains the cross tokens only."""

    norm: nn.LayerNorm | None
    proj: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, p = self.norm, self.proj
        if n is not None:
            x = nn.functional.layer_norm(x, n.normalized_shape, n.weight.detach(), n.bias.detach(), n.eps)
        return nn.functional.linear(x, p.weight.detach(), None if p.bias is None else p.bias.detach())


FAMILY = CLIPFamily()
