"""BLIP-2 (Hugging Face transformers >= 5.6): the vision tower merges, the Q-Former reads
the merged image tokens with proportional attention.

Patched: ``Blip2ForConditionalGeneration``, ``Blip2Model``, ``Blip2ForImageTextRetrieval``,
``Blip2VisionModelWithProjection`` and ``Blip2VisionModel``.

- Vision tower (pre-LN ViT, CLS pooled): the layer of BLIP and CLIP; upstream's attention
  hard-codes ``attention_mask=None``, the patched one takes the mask (eager, sdpa, ...).
- Q-Former: every cross-attention to the image adds ``log(size)`` of each image token. A
  forward pre-hook on ``model.qformer`` puts the 4D float bias ``[B, 1, 1, K]`` into its
  ``encoder_attention_mask`` (the callers build a mask of ones themselves); the Q-Former
  passes a ready 4D mask through unchanged, to eager and sdpa alike.
- The Q-Former always emits ``num_query_tokens`` outputs, so the language model, its
  prompt and its KV cache never see the reduction; they are not patched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.blip_2 import modeling_blip_2 as hf

from crossget.families.base import Family, Tower
from crossget.families.blip import encoder_cost, fused_qkv_attention, inject_bias, release_vision, watch_vision
from crossget.families.clip import own_checkpointing, pre_ln_layer, run_layer
from crossget.record import mark


class CrossGETBlip2Attention(hf.Blip2Attention):
    """BLIP-2 vision attention that takes a mask (upstream passes None) and shows its keys."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return fused_qkv_attention(self, hidden_states, attention_mask, **kwargs)


@own_checkpointing
class CrossGETBlip2EncoderLayer(hf.Blip2EncoderLayer):
    """Pre-LN vision layer with token reduction between attention and MLP (docs/method.md §1).

    As CLIP's (:class:`~crossget.families.clip.CrossGETCLIPEncoderLayer`): hidden states are
    the merged sequences, attention maps (eager) leave the cross token out, gradient
    checkpointing recomputes the layer's merge exactly."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # CLIP's layer structure (layer_norm1, self_attn, layer_norm2, mlp); upstream passes no mask
        return run_layer(self, pre_ln_layer, hidden_states, attention_mask=attention_mask, **kwargs)


CLASSES = (
    hf.Blip2ForConditionalGeneration,
    hf.Blip2Model,
    hf.Blip2ForImageTextRetrieval,
    hf.Blip2VisionModelWithProjection,
    hf.Blip2VisionModel,
)


def _vision(model: nn.Module) -> hf.Blip2VisionModel:
    return model if isinstance(model, hf.Blip2VisionModel) else model.vision_model


class Blip2Family(Family):
    name = "BLIP-2"
    classes = CLASSES

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """The one reducible encoder of a BLIP-2 model, its vision tower (the Q-Former's query
        tokens and the language model are never reduced)."""
        return {"vision": Tower.of("vision", _vision(model), CrossGETBlip2EncoderLayer, CrossGETBlip2Attention)}

    cost = staticmethod(encoder_cost)

    # joint_projection: None, BLIP-2's joint space is reached through the Q-Former, not from a vision token

    def install_glue(self, model: nn.Module) -> None:
        """Record the vision output and inject its ``log(size)`` bias into the Q-Former's
        cross-attention mask."""
        vision = _vision(model)
        handles = [watch_vision(vision)]
        qformer = getattr(model, "qformer", None)
        if qformer is not None:
            handles.append(inject_bias(qformer, vision))
        mark(model, glue=handles)

    def uninstall_glue(self, model: nn.Module) -> None:
        super().uninstall_glue(model)
        release_vision(_vision(model))


FAMILY = Blip2Family()
