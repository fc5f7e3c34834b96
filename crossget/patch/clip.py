"""CLIP (Hugging Face transformers >= 5.6): where to merge, and how the towers pool.

Patched: ``CLIPModel``, ``CLIPVisionModel(WithProjection)``, ``CLIPTextModel(WithProjection)``
and any model that holds a ``CLIPVisionModel`` tower (e.g. LLaVA's vision tower).
Each encoder layer runs ``x + Attn(LN1(x))``, merges, then ``x + MLP(LN2(x))``
(SPEC §1). The cross token (SPEC §3) rides beside the sequence: it attends to every
token, but no token attends to it, so with ``r = 0`` the outputs are exactly the
stock model's, and it never changes an output's shape or meaning.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as hf

from ..schedule import EncoderCost
from .common import Tower


def cross_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The cross token's attention over the main tokens and itself.

    ``q``, ``k_self``, ``v_self``: ``[B, H, 1, D]``; ``k``, ``v``: ``[B, H, N, D]``;
    ``bias``: ``[B, 1, 1, N]`` or None. Returns ``[B, 1, H * D]``.
    """
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, 1, N]
    if bias is not None:
        scores = scores + bias
    self_score = (q * k_self).sum(-1, keepdim=True) * scale  # [B, H, 1, 1]
    probs = torch.cat([scores, self_score], -1).softmax(-1, dtype=torch.float32).to(q.dtype)
    out = probs[..., :-1] @ v + probs[..., -1:] * v_self  # [B, H, 1, D]
    return out.transpose(1, 2).flatten(2)


class CrossGETCLIPAttention(hf.CLIPAttention):
    """CLIP attention that hands its keys (and the cross token's query) to the state."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cross_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        state = self._crossget
        b, n, _ = hidden_states.shape

        def heads(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj, hidden_states), heads(self.k_proj, hidden_states), heads(self.v_proj, hidden_states)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        out, weights = attend(
            self, q, k, v, attention_mask,
            scaling=self.scale, dropout=self.dropout if self.training else 0.0, **kwargs,
        )
        out = self.out_proj(out.reshape(b, n, -1))

        cross_out = None
        state.keys, state.cross_query = k, None
        if cross_states is not None:
            qc, kc, vc = (heads(p, cross_states) for p in (self.q_proj, self.k_proj, self.v_proj))
            state.cross_query = qc
            bias = state.cross_key_bias(q.dtype)
            cross_out = self.out_proj(cross_attend(qc, k, v, kc, vc, bias, self.scale))
        return out, weights, cross_out


class CrossGETCLIPEncoderLayer(hf.CLIPEncoderLayer):
    """Pre-LN layer with token reduction between attention and MLP (SPEC §1)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        state, layer = self._crossget, self._crossget_layer
        mask, upstream = state.attention_mask(attention_mask, hidden_states.dtype)
        if not upstream:
            kwargs["is_causal"] = False  # causality now lives in the rebuilt mask
        cross = state.cross_input(layer)
        attn, _, cross_attn = self.self_attn(
            self.layer_norm1(hidden_states),
            attention_mask=mask,
            cross_states=None if cross is None else self.layer_norm1(cross),
            **kwargs,
        )
        x = state.reduce(hidden_states + attn, layer)
        x = x + self.mlp(self.layer_norm2(x))
        if cross is not None:
            cross = cross + cross_attn
            cross = cross + self.mlp(self.layer_norm2(cross))
        state.cross_done(cross)
        return x


# --------------------------------------------------------------------------- towers
def _vision_inputs(args: tuple, kwargs: dict) -> tuple[None, None]:
    return None, None  # CLS is token 0, no padding


def _text_inputs_reader(eos_token_id: int):
    def read(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            raise ValueError("a patched CLIP text tower needs input_ids (to find the EOT token)")
        ids = input_ids.view(-1, input_ids.shape[-1]).int()
        # the same EOT position CLIPTextModel pools from
        anchor = ids.argmax(-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(-1)
        valid = None
        if mask is not None:
            mask = mask.view(ids.shape).bool()
            valid = None if bool(mask.all()) else mask
        return anchor.long(), valid

    return read


def _tower(kind: str, module: nn.Module) -> Tower:
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
        read_inputs=_text_inputs_reader(module.config.eos_token_id) if text else _vision_inputs,
        hidden=module.config.hidden_size,
    )


TOWER_CLASSES = {hf.CLIPVisionModel: "vision", hf.CLIPTextModel: "text"}
SUPPORTED = (
    hf.CLIPModel,
    hf.CLIPVisionModel,
    hf.CLIPVisionModelWithProjection,
    hf.CLIPTextModel,
    hf.CLIPTextModelWithProjection,
)


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


def towers(model: nn.Module) -> dict[str, Tower]:
    return {kind: _tower(kind, m) for kind, m in find_towers(model).items()}


def encoder_cost(module: nn.Module, kind: str, text_len: int | None = None) -> EncoderCost:
    """Analytic cost of one tower, for :func:`crossget.schedule.solve_flops`."""
    cfg = module.config
    if kind == "vision":
        patches = (cfg.image_size // cfg.patch_size) ** 2
        n, fixed = patches + 1, 2 * patches * cfg.hidden_size * cfg.num_channels * cfg.patch_size**2
    else:
        n, fixed = text_len or cfg.max_position_embeddings, 0.0
    return EncoderCost(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, n, 1, fixed)


def joint_projection(model: nn.Module, kind: str):
    """``[*, C] -> [*, P]``: final norm and projection into the joint space, weights detached.

    Used by the cross-token loss (SPEC §3); None if the model has no joint space.
    """
    tower = find_towers(model).get(kind)
    if kind == "vision":
        norm, proj = getattr(tower, "post_layernorm", None), getattr(model, "visual_projection", None)
    else:
        norm, proj = getattr(tower, "final_layer_norm", None), getattr(model, "text_projection", None)
    if norm is None or proj is None:
        return None

    def project(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(
            x, norm.normalized_shape, norm.weight.detach(), norm.bias.detach(), norm.eps
        )
        return nn.functional.linear(x, proj.weight.detach())

    return project
