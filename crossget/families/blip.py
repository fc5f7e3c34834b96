"""BLIP (Hugging Face transformers >= 5.6): where to merge, and how merged image tokens
reach the text side.

Patched: ``BlipForImageTextRetrieval`` (ITM and ITC heads), ``BlipForConditionalGeneration``,
``BlipForQuestionAnswering`` and ``BlipVisionModel``.

- Vision tower (pre-LN ViT): ``x + Attn(LN1(x))``, merge, ``x + MLP(LN2(x))`` (docs/method.md §1), the
  same layer as CLIP's. Upstream's attention is eager-only with no mask argument, so the
  patched one takes the additive mask (proportional attention, the cross token).
- Text encoder (ITM / VQA question encoder, post-LN BERT, ``towers=("vision", "text")``):
  self-attention, merge, cross-attention to the image, feed-forward. ``[CLS]``/``[ENC]``
  (token 0, which the heads pool) is protected and anchors the text cross token;
  padding only merges with padding; the output gets its input length back (each position
  holds the token covering it), so VQA's answer decoder attending to the restored question
  is exactly proportional attention over the merged one.
- The decoders that generate (captions, answers) are never reduced.
- Every cross-attention over merged image tokens adds ``log(size)`` of each image token:
  the bias travels as a 4D float ``encoder_attention_mask`` ``[B, 1, 1, K]`` (a tensor in
  ``generate``'s model kwargs, so beams and ``num_return_sequences`` expand it). BLIP's text
  cross-attention drops its mask upstream (transformers 5.x); the patch makes it honour it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.blip import modeling_blip as hf
from transformers.models.blip import modeling_blip_text as hf_text
from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward
from transformers.pytorch_utils import apply_chunking_to_forward

from crossget.families.base import Family, Tower
from crossget.families.clip import (
    DetachedProjection,
    own_checkpointing,
    pre_ln_layer,
    restore_hidden_states,
    run_layer,
    without_cross,
)
from crossget.merge import attention_bias
from crossget.record import mark, record, unmark
from crossget.schedule import EncoderCost

# BLIP truncates retrieval captions and VQA questions to 35 tokens: the text length the
# FLOPs solver assumes unless patch(text_len=...) says otherwise.
TEXT_LEN = 35
# text encoder -> unreduced image tokens it cross-attends to (set by find_towers)
_IMAGE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- vision
def fused_qkv_attention(
    attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BLIP / BLIP-2 vision self-attention (fused ``qkv``) with an additive mask, showing its
    queries and keys ``[B, N, C]`` (heads concatenated) to the tower state.

    ``hidden_states``: ``[B, N, C]``; ``attention_mask``: float ``[B, 1, 1 | N, N]`` or None.
    Eager math is BLIP's own (``softmax(q k^T * scale + mask) v``), so with no mask the
    result equals the stock attention; other implementations (BLIP-2's ``sdpa``) come
    from the model's ``_attn_implementation``. Returns ``(out [B, N, C], weights or None)``;
    the weights (what ``output_attentions=True`` collects) leave the cross token out,
    ``[B, H, N, N]`` over the layer's tokens before its merge.
    """
    b, n, c = hidden_states.shape
    q, k, v = attn.qkv(hidden_states).view(b, n, 3, c).unbind(2)
    state = attn._crossget.state
    state.observe(q, k)
    q, k, v = (t.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, weights = attend(
        attn, q, k, v, attention_mask,
        scaling=attn.scale, dropout=attn.config.attention_dropout if attn.training else 0.0, **kwargs,
    )
    return attn.projection(out.reshape(b, n, c)), without_cross(weights, state)


class CrossGETBlipAttention(hf.BlipAttention):
    """BLIP vision attention with a mask path (proportional attention) and visible keys."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return fused_qkv_attention(self, hidden_states, attention_mask, **kwargs)


@own_checkpointing
class CrossGETBlipEncoderLayer(hf.BlipEncoderLayer):
    """Pre-LN vision layer with token reduction between attention and MLP (docs/method.md §1).

    As CLIP's (:class:`~crossget.families.clip.CrossGETCLIPEncoderLayer`): hidden states are
    the merged sequences, attention maps leave the cross token out, gradient checkpointing
    recomputes the layer's merge exactly."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        # CLIP's layer structure (layer_norm1, self_attn, layer_norm2, mlp); upstream passes no mask
        return run_layer(self, pre_ln_layer, hidden_states, attention_mask=attention_mask, **kwargs)


# --------------------------------------------------------------------------- text
class CrossGETBlipTextSelfAttention(hf_text.BlipTextSelfAttention):
    """Self-attention of a reduced BLIP text-encoder layer: takes the layer's mask and shows
    its queries and keys ``[B, N, C]`` to the tower state. Never a decoder's (no cache).
    Its weights (``output_attentions=True``) leave the cross token out: ``[B, H, N, N]`` over
    the layer's tokens before its merge."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = hidden_states.shape
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        state = self._crossget.state
        state.observe(q, k)
        q, k, v = (t.view(b, n, -1, self.attention_head_size).transpose(1, 2) for t in (q, k, v))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(
            self, q, k, v, attention_mask,
            scaling=self.attention_head_size**-0.5, dropout=self.dropout.p if self.training else 0.0,
        )
        return out.reshape(b, n, self.all_head_size), without_cross(weights, state)


def post_ln_text_layer(
    module: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reduced BLIP text-encoder layer: self-attention, merge, cross-attention, feed-forward."""
    state, layer = module._crossget.state, module._crossget.layer
    x, mask, _ = state.begin_layer(hidden_states, attention_mask, layer)
    x = module.attention(x, attention_mask=mask)[0]
    x = state.reduce(x, layer)
    if encoder_hidden_states is not None:
        x = module.crossattention(x, attention_mask=encoder_attention_mask, encoder_hidden_states=encoder_hidden_states)[0]
    x = apply_chunking_to_forward(module.feed_forward_chunk, module.chunk_size_feed_forward, module.seq_len_dim, x)
    return state.end_layer(x)


@own_checkpointing
class CrossGETBlipTextLayer(hf_text.BlipTextLayer):
    """Post-LN BERT layer of a reduced text encoder: self-attention, merge, cross-attention
    to the image (on the reduced text), feed-forward (docs/method.md §1 for a post-LN layer).

    ``output_attentions=True``: self- and cross-attention maps over the layer's text tokens
    (before / after its merge), without the cross token. ``output_hidden_states=True``: every
    layer's output at the input length, as ``last_hidden_state``
    (:class:`~crossget.families.clip.FullLengthHiddenStates`). Gradient checkpointing
    recomputes the layer's merge exactly (:func:`~crossget.families.clip.run_layer`)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        if past_key_values is not None:
            raise ValueError("a reduced BLIP text encoder cannot run as a cached decoder (past_key_values given)")
        return run_layer(
            self, post_ln_text_layer, hidden_states, encoder_hidden_states,
            attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
        )


class BlipTextCrossAttention(hf_text.BlipTextSelfAttention):
    """Text cross-attention that honours its mask: upstream's ``BlipTextAttention`` hands the
    cross-attention mask over as ``attention_mask`` and ``BlipTextSelfAttention`` then reads
    ``encoder_attention_mask`` (None), so the mask, and with it any ``log(size)`` bias, is dropped.

    In a reduced text-encoder layer (its record holds the tower state) the cross token's
    query row is left out of the weights it returns (``output_attentions=True``)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, **kwargs):
        if encoder_hidden_states is not None and encoder_attention_mask is None:
            encoder_attention_mask = attention_mask
        out, weights = super().forward(
            hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, past_key_values, **kwargs
        )
        rec = record(self)
        if weights is not None and rec is not None and rec.state is not None and rec.state.with_cross:
            weights = weights[:, :, :-1]
        return out, weights


# --------------------------------------------------------------------------- towers
def text_inputs(args: tuple, kwargs: dict) -> tuple[None, torch.Tensor | None]:
    """[CLS]/[ENC] is token 0 (the anchor by default); padding from ``attention_mask``."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        return None, None
    if mask.dim() != 2:
        raise ValueError(f"a reduced BLIP text encoder needs a 2D attention_mask [B, N], got {tuple(mask.shape)}")
    mask = mask.bool()
    return None, None if bool(mask.all()) else mask


def tower(kind: str, module: nn.Module) -> Tower:
    if kind == "vision":
        return Tower.of(kind, module, CrossGETBlipEncoderLayer, CrossGETBlipAttention)
    return Tower.of(kind, module, CrossGETBlipTextLayer, CrossGETBlipTextSelfAttention, layers=list(module.encoder.layer),
                    attention_attr="attention.self", restore_length=True, read_inputs=text_inputs)


def find_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The reducible encoders of a BLIP model: ``vision`` and, for ITM/ITC and VQA, the
    ``text`` encoder. Decoders (``text_decoder``) are never towers."""
    if isinstance(model, hf.BlipVisionModel):
        return {"vision": model}
    found = {"vision": model.vision_model}
    if isinstance(getattr(model, "text_encoder", None), hf_text.BlipTextModel):
        found["text"] = model.text_encoder
        vc = model.vision_model.config
        _IMAGE_TOKENS[model.text_encoder] = (vc.image_size // vc.patch_size) ** 2 + 1  # for encoder_cost
    return found


def encoder_cost(
    module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
) -> EncoderCost:
    """Analytic cost of one tower, for :func:`crossget.schedule.solve_flops` (BLIP-2's vision too).

    The BLIP text encoder's cross-attention is counted as fixed, at the unreduced image
    length (the key/value projections of the image tokens dominate it), so with a reduced
    vision tower the measured ratio comes out below the estimate.
    """
    cfg = module.config
    c = cfg.hidden_size
    if kind == "vision":
        patches = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
        fixed = 2 * patches * c * getattr(cfg, "num_channels", 3) * cfg.patch_size**2  # patch embedding
        return EncoderCost(c, cfg.intermediate_size, cfg.num_hidden_layers, patches + 1, 1, fixed)
    n = text_len or TEXT_LEN
    fixed = 0.0
    if getattr(cfg, "is_decoder", False):  # every layer has cross-attention (used by ITM and VQA)
        k = _IMAGE_TOKENS.get(module)
        if k:
            # per layer: keys and values of k image tokens, queries and outputs of n text
            # tokens, and the attention itself (FLOPs = 2 x multiply-adds)
            fixed = cfg.num_hidden_layers * 2 * (2 * k * cfg.encoder_hidden_size * c + 2 * n * c * c + 2 * n * k * c)
    return EncoderCost(c, cfg.intermediate_size, cfg.num_hidden_layers, n, 1, fixed)


def joint_projection(model: nn.Module, kind: str) -> DetachedProjection | None:
    """``[*, C] -> [*, P]`` into ITC's joint space (weights detached), for the cross-token
    loss; None for models without one (captioning, VQA, a lone vision tower).

    Vision: ``post_layernorm`` then ``vision_proj`` (what ITC applies to ``[CLS]``); text:
    ``text_proj`` (BERT layers end in their own LayerNorm).
    """
    if not isinstance(model, hf.BlipForImageTextRetrieval):
        return None
    if kind == "vision":
        return DetachedProjection(model.vision_model.post_layernorm, model.vision_proj)
    return DetachedProjection(None, model.text_proj)


# --------------------------------------------------------------------------- glue
def encoder_bias(
    vision: nn.Module, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The cross-attention mask for ``encoder_hidden_states`` if they are ``vision``'s last,
    merged output: float ``[B, 1, 1, K]`` holding ``log(size)`` of every image token (and
    ``finfo.min`` where a 2D ``mask`` ``[B, K]`` is 0). None when nothing needs changing:
    other states, nothing merged, proportional attention off, or ``mask`` already 4D (a
    bias made here, expanded by ``generate``)."""
    enc_rec, rec = record(getattr(vision, "encoder", vision)), record(vision)
    state = enc_rec.state if enc_rec is not None else None
    ref = rec.output if rec is not None else None
    if state is None or ref is None or ref() is not encoder_hidden_states:
        return None
    if not state.merged or not state.settings.prop_attn or (mask is not None and mask.dim() == 4):
        return None
    if mask is not None and mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(
            f"encoder_attention_mask is {tuple(mask.shape)} but the image tokens are {tuple(encoder_hidden_states.shape[:2])}"
        )
    valid = None if mask is None else mask.to(state.size.device).bool()
    return attention_bias(state.size, valid, dtype=dtype)


@dataclass(eq=False)
class OutputRecorder:
    """Forward hook: remember (weakly) the tensor the vision tower last returned, so that
    consumers recognise its merged image tokens."""

    def __call__(self, module: nn.Module, _args, output) -> None:
        mark(module, output=weakref.ref(output[0]))


@dataclass(eq=False)
class BiasInjector:
    """Forward pre-hook on a module taking ``encoder_hidden_states`` and
    ``encoder_attention_mask`` keyword arguments: puts the image tokens' ``log(size)``
    bias into ``encoder_attention_mask``."""

    vision: nn.Module

    def __call__(self, module: nn.Module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states")
        if enc is None:
            return None
        bias = encoder_bias(self.vision, enc, kwargs.get("encoder_attention_mask"), module.dtype)
        if bias is None:
            return None
        kwargs["encoder_attention_mask"] = bias
        return args, kwargs


@dataclass(eq=False)
class BiasedGenerate:
    """``decoder.generate`` that turns the image mask into the bias before ``generate``
    expands its inputs for beams / ``num_return_sequences`` (module state would not be)."""

    decoder: nn.Module
    vision: nn.Module

    def __call__(self, *args, **kwargs):
        enc = kwargs.get("encoder_hidden_states")
        if enc is not None:
            bias = encoder_bias(self.vision, enc, kwargs.get("encoder_attention_mask"), self.decoder.dtype)
            if bias is not None:
                kwargs["encoder_attention_mask"] = bias
        return type(self.decoder).generate(self.decoder, *args, **kwargs)


def watch_vision(vision: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Record the vision tower's outputs (for :func:`encoder_bias`)."""
    return vision.register_forward_hook(OutputRecorder())


def inject_bias(consumer: nn.Module, vision: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Put ``vision``'s ``log(size)`` bias into ``consumer``'s ``encoder_attention_mask``."""
    return consumer.register_forward_pre_hook(BiasInjector(vision), with_kwargs=True)


def release_vision(vision: nn.Module) -> None:
    """Forget the recorded output (undo :func:`watch_vision`'s state)."""
    if record(vision) is not None:
        unmark(vision, ("output",))


@dataclass(eq=False)
class Glue:
    """What :meth:`BlipFamily.install_glue` changed on a model."""

    handles: list
    swapped: list


class BlipFamily(Family):
    name = "BLIP"
    classes = (
        hf.BlipForImageTextRetrieval,
        hf.BlipForConditionalGeneration,
        hf.BlipForQuestionAnswering,
        hf.BlipVisionModel,
    )

    find_towers = staticmethod(find_towers)
    tower_record = staticmethod(tower)
    cost = staticmethod(encoder_cost)

    def joint_projection(self, model: nn.Module, kind: str) -> DetachedProjection | None:
        return joint_projection(model, kind)

    def install_glue(self, model: nn.Module) -> None:
        """Model-level patch: bias injection into every text model fed the image, the
        cross-attention mask fix, and ``text_decoder.generate``."""
        towers = find_towers(model)
        vision = towers["vision"]
        handles = [watch_vision(vision)]
        text_tower = towers.get("text")
        if text_tower is not None and record(text_tower.encoder) is not None:
            handles += restore_hidden_states(text_tower, text_tower.encoder)
        swapped = []
        for text in (m for m in model.modules() if isinstance(m, hf_text.BlipTextModel)):
            handles.append(inject_bias(text, vision))
            for layer in text.encoder.layer:
                cross = getattr(layer, "crossattention", None)
                if cross is not None:
                    cross.self.__class__ = BlipTextCrossAttention
                    swapped.append(cross.self)
                    layer_rec = record(layer)
                    if layer_rec is not None and layer_rec.state is not None:  # a reduced text encoder's
                        mark(cross.self, state=layer_rec.state)
        decoder = getattr(model, "text_decoder", None)
        if isinstance(decoder, hf_text.BlipTextLMHeadModel):
            decoder.generate = BiasedGenerate(decoder, vision)
        mark(model, glue=Glue(handles, swapped))

    def uninstall_glue(self, model: nn.Module) -> None:
        rec = record(model)
        glue = rec.glue if rec is not None else None
        if glue is None:
            return
        for h in glue.handles:
            h.remove()
        for m in glue.swapped:
            m.__class__ = hf_text.BlipTextSelfAttention
            unmark(m, ("state",))
        unmark(model, ("glue",))
        release_vision(find_towers(model)["vision"])
        decoder = getattr(model, "text_decoder", None)
        if decoder is not None:
            decoder.__dict__.pop("generate", None)


FAMILY = BlipFamily()
