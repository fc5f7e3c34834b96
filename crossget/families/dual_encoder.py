"""BERT-style text encoders and ``VisionTextDualEncoderModel`` (Hugging Face transformers 5.23).

Patched: ``BertModel`` and ``RobertaModel`` (the text tower alone), and
``VisionTextDualEncoderModel`` whose ``vision_model`` is any vision tower another family
supports (``CLIPVisionModel``, ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
``SiglipVisionModel``...) and whose ``text_model`` is a ``BertModel`` / ``RobertaModel``.

- Text tower (post-LN BERT, as BLIP's text encoder without cross-attention): self-attention
  (eager or any attention interface, the layer's mask, ``log(size)`` proportional attention
  once merged), merge, intermediate / output. ``[CLS]`` (token 0, which the pooler reads) is
  protected and anchors the text cross token; padding from ``attention_mask`` only merges
  with padding (the tower state's rule, so a caption alone equals the same caption in a
  padded batch); ``last_hidden_state`` and ``hidden_states`` get their input length back
  (each position holds the token covering it), as CLIP's text tower. Decoder configs
  (``is_decoder``, cross-attention, caches) are refused.
- Vision tower: the :class:`~crossget.families.base.Tower` record, cost and glue of the family
  that supports the vision model's class (:func:`vision_family`).
- Cross-token loss (``towers=("vision", "text")``): vision cross tokens go through the vision
  tower's pooled path for one token (CLIP: ``post_layernorm``; ViT / DeiT: final ``layernorm``
  then the pooler's dense + activation; DINOv2: final ``layernorm``) then
  ``visual_projection``; text cross tokens through the BERT pooler (dense + tanh) then
  ``text_projection``; weights detached. Other vision towers (SigLIP's attention-pooling head)
  have no single-token path: the loss is refused for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert import modeling_bert as hf_bert
from transformers.models.clip import modeling_clip as hf_clip
from transformers.models.deit import modeling_deit as hf_deit
from transformers.models.dinov2 import modeling_dinov2 as hf_dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as hf_dinov2_reg
from transformers.models.roberta import modeling_roberta as hf_roberta
from transformers.models.vision_text_dual_encoder import modeling_vision_text_dual_encoder as hf
from transformers.models.vit import modeling_vit as hf_vit
from transformers.pytorch_utils import apply_chunking_to_forward

from crossget.families import blip, blip2, clip, siglip, vit
from crossget.families.base import Family, Tower
from crossget.families.clip import own_checkpointing, restore_hidden_states, run_layer, without_cross
from crossget.record import mark, record
from crossget.schedule import EncoderCost

# the text length the FLOPs solver assumes unless patch(text_len=...) says otherwise
# (captions; capped at the model's max_position_embeddings)
TEXT_LEN = 64


# --------------------------------------------------------------------------- text layers
def self_attention(
    attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BERT self-attention ``[B, N, C] -> [B, N, C]`` with the layer's mask, showing its queries
    and keys ``[B, N, C]`` to the tower state; the weights (``output_attentions=True``) leave
    the cross token out, ``[B, H, N, N]`` over the layer's tokens before its merge."""
    b, n, _ = hidden_states.shape
    q, k, v = attn.query(hidden_states), attn.key(hidden_states), attn.value(hidden_states)
    state = attn._crossget.state
    state.observe(q, k)
    q, k, v = (t.view(b, n, -1, attn.attention_head_size).transpose(1, 2) for t in (q, k, v))
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, hf_bert.eager_attention_forward)
    out, weights = attend(
        attn, q, k, v, attention_mask, scaling=attn.scaling, dropout=attn.dropout.p if attn.training else 0.0,
    )
    return out.reshape(b, n, -1).contiguous(), without_cross(weights, state)


class CrossGETBertSelfAttention(hf_bert.BertSelfAttention):
    """Self-attention of a reduced BERT layer (no cache, no cross-attention)."""

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        return self_attention(self, hidden_states, attention_mask)


class CrossGETRobertaSelfAttention(hf_roberta.RobertaSelfAttention):
    """Self-attention of a reduced RoBERTa layer (no cache, no cross-attention)."""

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        return self_attention(self, hidden_states, attention_mask)


def post_ln_layer(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """One reduced post-LN BERT layer: self-attention (+ output LayerNorm), merge, feed-forward."""
    state, layer = module._crossget.state, module._crossget.layer
    x, mask, _ = state.begin_layer(hidden_states, attention_mask, layer)
    x = module.attention(x, attention_mask=mask)[0]
    x = state.reduce(x, layer)
    x = apply_chunking_to_forward(module.feed_forward_chunk, module.chunk_size_feed_forward, module.seq_len_dim, x)
    return state.end_layer(x)


def _layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                   past_key_values=None, **kwargs):
    if encoder_hidden_states is not None or past_key_values is not None:
        raise ValueError(
            f"a reduced {type(self).__mro__[1].__name__} is an encoder: it takes no encoder_hidden_states "
            "and no past_key_values"
        )
    return run_layer(self, post_ln_layer, hidden_states, attention_mask=attention_mask)


@own_checkpointing
class CrossGETBertLayer(hf_bert.BertLayer):
    """Post-LN BERT layer with token reduction between self-attention and feed-forward
    (docs/method.md §1); gradient checkpointing recomputes its merge exactly
    (:func:`~crossget.families.clip.run_layer`)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, **kwargs):
        return _layer_forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                              past_key_values)


@own_checkpointing
class CrossGETRobertaLayer(hf_roberta.RobertaLayer):
    """As :class:`CrossGETBertLayer`, for RoBERTa."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, **kwargs):
        return _layer_forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                              past_key_values)


TEXT_CLASSES = {
    hf_bert.BertModel: (CrossGETBertLayer, CrossGETBertSelfAttention),
    hf_roberta.RobertaModel: (CrossGETRobertaLayer, CrossGETRobertaSelfAttention),
}


# --------------------------------------------------------------------------- towers
@dataclass(frozen=True)
class TextInputs:
    """A BERT tower's pre-hook: the anchor is ``[CLS]`` (token 0); padding from a 2D
    ``attention_mask`` (argument 1)."""

    name: str

    def __call__(self, args: tuple, kwargs: dict) -> tuple[None, torch.Tensor | None]:
        if kwargs.get("encoder_hidden_states") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError(f"a patched {self.name} is an encoder: it takes no encoder_hidden_states / past_key_values")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            return None, None
        if mask.dim() != 2:
            raise ValueError(f"a patched {self.name} needs a 2D attention_mask [B, N] (1 = token, 0 = padding), "
                             f"got {tuple(mask.shape)}")
        mask = mask.bool()
        return None, None if bool(mask.all()) else mask


def text_tower(module: nn.Module) -> Tower:
    layer_class, attention_class = TEXT_CLASSES[next(c for c in TEXT_CLASSES if isinstance(module, c))]
    return Tower.of("text", module, layer_class, attention_class, layers=list(module.encoder.layer),
                    attention_attr="attention.self", restore_length=True, read_inputs=TextInputs(type(module).__name__))


def _check_text(module: nn.Module) -> nn.Module:
    if not isinstance(module, tuple(TEXT_CLASSES)):
        names = ", ".join(c.__name__ for c in TEXT_CLASSES)
        raise TypeError(f"crossget patches a VisionTextDualEncoderModel whose text_model is one of {names}, "
                        f"got {type(module).__name__}")
    cfg = module.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"crossget reduces {type(module).__name__} as an encoder; this one is configured as a "
                         "decoder (is_decoder / add_cross_attention)")
    return module


# the families whose vision towers a dual encoder may hold (not the registry: it imports this module)
VISION_FAMILIES = (clip.FAMILY, vit.FAMILY, siglip.FAMILY, blip.FAMILY, blip2.FAMILY)


def vision_family(vision: nn.Module) -> Family:
    """The family that supports the vision model ``vision``."""
    for fam in VISION_FAMILIES:
        if isinstance(vision, fam.classes):
            return fam
    names = ", ".join(c.__name__ for f in VISION_FAMILIES for c in f.classes if "Vision" in c.__name__ or f is vit.FAMILY)
    raise TypeError(f"{type(vision).__name__} is not a vision tower crossget reduces; supported: {names}")


def _vision_family(model: nn.Module) -> Family:
    return vision_family(model.vision_model)


def text_cost(module: nn.Module, text_len: int | None = None) -> EncoderCost:
    """Analytic cost of a BERT tower: ``text_len`` tokens (default ``min(64, max_position_embeddings)``),
    ``[CLS]`` protected; the embeddings are not counted."""
    cfg = module.config
    n = text_len or min(TEXT_LEN, cfg.max_position_embeddings)
    return EncoderCost(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, n, 1, 0.0)


# --------------------------------------------------------------------------- projections
def _linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    return nn.functional.linear(x, lin.weight.detach(), None if lin.bias is None else lin.bias.detach())


@dataclass(eq=False)
class PooledProjection:
    """``[*, C] -> [*, P]`` for single tokens, weights detached: LayerNorm ``norm`` (optional),
    pooler ``dense`` + ``activation`` (optional), then the linear ``proj``."""

    norm: nn.LayerNorm | None
    dense: nn.Linear | None
    activation: nn.Module | None
    proj: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if n is not None:
            x = nn.functional.layer_norm(x, n.normalized_shape, n.weight.detach(), n.bias.detach(), n.eps)
        if self.dense is not None:
            x = self.activation(_linear(x, self.dense))
        return _linear(x, self.proj)


def vision_projection(model: hf.VisionTextDualEncoderModel) -> PooledProjection | None:
    """The vision tower's ``pooler_output`` path for one token, then ``visual_projection``."""
    vm, proj = model.vision_model, model.visual_projection
    if isinstance(vm, hf_clip.CLIPVisionModel):
        return PooledProjection(vm.post_layernorm, None, None, proj)
    if isinstance(vm, (hf_vit.ViTModel, hf_deit.DeiTModel)):
        if vm.pooler is None:  # no pooler_output: get_image_features cannot run either
            return None
        return PooledProjection(vm.layernorm, vm.pooler.dense, vm.pooler.activation, proj)
    if isinstance(vm, (hf_dinov2.Dinov2Model, hf_dinov2_reg.Dinov2WithRegistersModel)):
        return PooledProjection(vm.layernorm, None, None, proj)
    return None


def text_projection(model: hf.VisionTextDualEncoderModel) -> PooledProjection | None:
    """The BERT pooler (dense + tanh) for one token, then ``text_projection``."""
    pooler = model.text_model.pooler
    if pooler is None:
        return None
    return PooledProjection(None, pooler.dense, pooler.activation, model.text_projection)


# --------------------------------------------------------------------------- family
class DualEncoderFamily(Family):
    name = "VisionTextDualEncoder"
    classes = (hf.VisionTextDualEncoderModel, *TEXT_CLASSES)

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        if not isinstance(model, hf.VisionTextDualEncoderModel):
            return {"text": text_tower(_check_text(model))}
        vision = _vision_family(model).towers(model.vision_model)
        if "vision" not in vision:
            raise TypeError(f"{type(model.vision_model).__name__} has no vision tower crossget can reduce")
        return {"vision": vision["vision"], "text": text_tower(_check_text(model.text_model))}

    def encoder_cost(self, module: nn.Module, kind: str, text_len: int | None = None,
                     image_size: int | None = None) -> EncoderCost:
        if kind == "text":
            return text_cost(module, text_len)
        return vision_family(module).encoder_cost(module, kind, text_len, image_size)

    def joint_projection(self, model: nn.Module, kind: str) -> PooledProjection | None:
        if not isinstance(model, hf.VisionTextDualEncoderModel):
            return None
        return vision_projection(model) if kind == "vision" else text_projection(model)

    def install_glue(self, model: nn.Module) -> None:
        """The vision family's glue on the vision model (e.g. ViT's embedding hook); the text
        tower's ``hidden_states`` at full length."""
        if isinstance(model, hf.VisionTextDualEncoderModel):
            _vision_family(model).install_glue(model.vision_model)
            text = model.text_model
        else:
            text = model
        if record(text.encoder) is not None:
            mark(model, glue=restore_hidden_states(text, text.encoder))

    def uninstall_glue(self, model: nn.Module) -> None:
        if isinstance(model, hf.VisionTextDualEncoderModel):
            _vision_family(model).uninstall_glue(model.vision_model)
        super().uninstall_glue(model)


FAMILY = DualEncoderFamily()
