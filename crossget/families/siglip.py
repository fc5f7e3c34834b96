"""SigLIP and SigLIP2 (Hugging Face transformers >= 5.6): no CLS token, attention pooling.

Patched: ``SiglipModel``, ``SiglipVisionModel``, ``SiglipTextModel``, ``Siglip2Model``,
``Siglip2VisionModel`` and ``Siglip2TextModel``. The encoder layers are CLIP's pre-LN layers
(``x + Attn(LN1(x))``, merge, ``x + MLP(LN2(x))``, docs/method.md §1), run by
:func:`~crossget.families.clip.pre_ln_layer`; gradient checkpointing and
``output_attentions`` / ``output_hidden_states`` behave as for CLIP (the cross token never
shows; text hidden states get the input length back).

What differs from CLIP:

- **Vision: no protected token** (``P = 0``, docs/method.md §4: ``r <= floor(N / 2)``).
  SigLIP has no CLS; its image embedding is the attention-pooling head
  (``Siglip(2)MultiheadAttentionPoolingHead``: a learned probe attends over all tokens of
  ``post_layernorm(last_hidden_state)``). :class:`AnchorFree`, an encoder pre-hook that runs
  after the tower state's start, unprotects token 0 and sets the cross token's start.
- **The pooling head reads merged tokens with proportional attention** (docs/method.md §6):
  its attention over the merged keys adds ``log(size)`` (and masks SigLIP2's padding), so a
  token of size ``k`` weighs as ``k`` copies would (:class:`CrossGETSiglipPoolingHead`,
  :class:`CrossGETSiglip2PoolingHead`). Until something merged the stock head runs.
- **The cross token's anchor (vision): the mean token.** With no CLS, the cross token starts
  as the mean of the (real) patch embeddings; its query in every layer gives the importance
  ``I_i = cos(q_cross, k_i)`` of docs/method.md §3, as for CLIP. Measured against two
  alternatives that let the pooling head's probe (``[C]``, in the hidden size already) be the
  query: (a) the probe as the cross token's start, its own query then guiding every layer,
  and (b) the head's attention itself as the importance, ``I_i = cos(W_q probe,
  W_k post_layernorm(x_i))`` with the head's projections, in every merging layer. On tiny
  random SigLIP vision towers (hidden 32, 2 heads, 3 layers, 64 patches; 20 seeds x 8 smooth
  random images), the pooled output's relative error to the stock one, at ``r = 4 / 8 / 12``
  per layer: mean token 0.017 / 0.035 / 0.060, probe start 0.019 / 0.039 / 0.062, head
  attention 0.022 / 0.046 / 0.071 (mean token better than the probe start on 15, 13, 11 of
  20 seeds). All anchors keep ``r = 0`` exact (bit for bit: the cross token only observes).
  (With random weights the untrained guidance only adds noise: ToMe 0.011 / 0.025 / 0.044,
  CrossGET unguided 0.008 / 0.020 / 0.038.) The mean token lives in the residual stream the
  layers' queries are trained on (the probe is trained against the head's keys of
  ``post_layernorm`` outputs), exists when ``vision_use_head=False``, and leaves ``theta``
  acting on the importance; the head's attention would cost its key projection in every
  merging layer (``2 N C^2``) and ignore ``theta``. The probe's reading is used where it is
  exact: the head's own attention over the merged tokens (above).
- **Text: bidirectional, pools the last position** (``last_hidden_state[:, -1]``, which may
  be padding). The last token is protected and anchors the text cross token; the output is
  restored to the input length (docs/method.md §5), so the stock pooling reads it. SigLIP is
  run as trained with ``padding="max_length"`` (64; ``Siglip2Processor``'s default), and both
  tokenizers return an ``attention_mask``: SigLIP's pads on the right (the pooled last token
  is then a padding token; padding keys are masked for every query), SigLIP2's on the left.
  Without a mask every position is a token, as upstream. With one, padding is kept apart from
  real tokens (docs/method.md §4), so a row gives the same output alone as in a batch at the
  same padded length.
- **SigLIP2's variable resolution**: ``pixel_attention_mask`` marks the real patches of each
  image (``spatial_shapes`` its grid); padded patches are handled like text padding (never
  merged with real patches, masked for every query, each row's real patches merge as they
  would alone, unpadded). The returned ``last_hidden_state`` is the merged sequence, padding
  included (``crossget.states(model)["vision"].book.valid`` says which tokens are real).
- **Joint space for the cross-token loss** (docs/method.md §3), weights detached: image cross
  tokens through ``post_layernorm`` and the pooling head reading that one token (softmax over
  one key: ``out_proj(v_proj(x))``, then the head's ``x + MLP(LN(x))``); text cross tokens
  through ``final_layer_norm`` and the text ``head`` linear (what SigLIP pools into).
- **Cost** (docs/method.md §7): the patch embedding and the pooling head (``k, v`` projections
  and attention of the probe over the unreduced tokens, its ``q`` and output projections and
  MLP) are the fixed part of the vision tower, the text ``head`` of the text tower. SigLIP2's
  token count is ``vision_config.num_patches`` (the processor's ``max_num_patches`` defaults
  to it), or ``(image_size / patch_size)^2`` with ``image_size=``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.siglip import modeling_siglip as hf
from transformers.models.siglip2 import modeling_siglip2 as hf2

from crossget.families.base import Family, Tower
from crossget.families.clip import (
    CrossGETCLIPAttention,
    DetachedProjection,
    own_checkpointing,
    pre_ln_layer,
    restore_hidden_states,
    run_layer,
)
from crossget.merge import attention_bias
from crossget.record import mark, record, swap_class, unmark
from crossget.schedule import EncoderCost
from crossget.state import TowerState


# --------------------------------------------------------------------------- layers
class CrossGETSiglipAttention(hf.SiglipAttention):
    """SigLIP attention that shows its queries and keys to the tower state; returned maps
    leave the cross token out (CLIP's, :class:`~crossget.families.clip.CrossGETCLIPAttention`)."""

    forward = CrossGETCLIPAttention.forward


class CrossGETSiglip2Attention(hf2.Siglip2Attention):
    """SigLIP2 attention, as :class:`CrossGETSiglipAttention`."""

    forward = CrossGETCLIPAttention.forward


@own_checkpointing
class CrossGETSiglipEncoderLayer(hf.SiglipEncoderLayer):
    """Pre-LN layer with token reduction between attention and MLP (docs/method.md §1); hidden
    states and gradient checkpointing as CLIP's
    (:class:`~crossget.families.clip.CrossGETCLIPEncoderLayer`)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, pre_ln_layer, hidden_states, attention_mask=attention_mask, **kwargs)


@own_checkpointing
class CrossGETSiglip2EncoderLayer(hf2.Siglip2EncoderLayer):
    """SigLIP2's layer, as :class:`CrossGETSiglipEncoderLayer`."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, pre_ln_layer, hidden_states, attention_mask=attention_mask, **kwargs)


# --------------------------------------------------------------------------- the pooling head
def head_bias(head: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor | None:
    """The additive mask ``[B * heads, 1, N]`` of the pooling head's attention over merged
    tokens ``hidden_state`` ``[B, N, C]``: ``log(size)`` of every key (docs/method.md §6;
    ``prop_attn=False``: none) and padding (SigLIP2) masked. None: the stock head is exact
    (nothing merged, or not the tokens of the tower's last forward)."""
    rec = record(head)
    state: TowerState | None = rec.state if rec is not None else None
    book = state.book if state is not None else None
    if book is None or not book.merged or tuple(book.protected.shape) != tuple(hidden_state.shape[:2]):
        return None
    size = book.size.to(hidden_state.device) if state.settings.prop_attn else None
    valid = book.valid.to(hidden_state.device) if book.valid is not None else None
    bias = attention_bias(size, valid, dtype=hidden_state.dtype)  # [B, 1, 1, N]
    if bias is None:
        return None
    b, n = hidden_state.shape[:2]
    heads = head.attention.num_heads
    return bias.expand(b, heads, 1, n).reshape(b * heads, 1, n)


def attention_pool(head: nn.Module, hidden_state: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Upstream's pooling head with the additive mask ``bias`` on its attention: ``[B, C]``."""
    probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
    x = head.attention(probe, hidden_state, hidden_state, attn_mask=bias.to(probe.dtype))[0]
    x = x + head.mlp(head.layernorm(x))
    return x[:, 0]


class CrossGETSiglipPoolingHead(hf.SiglipMultiheadAttentionPoolingHead):
    """SigLIP's attention-pooling head over merged tokens: ``log(size)`` on its attention
    logits (:func:`head_bias`), so a token of size ``k`` counts as ``k`` copies of it."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        bias = head_bias(self, hidden_state)
        if bias is None:
            return super().forward(hidden_state)
        return attention_pool(self, hidden_state, bias)


class CrossGETSiglip2PoolingHead(hf2.Siglip2MultiheadAttentionPoolingHead):
    """SigLIP2's attention-pooling head over merged tokens: ``log(size)`` and the merged
    padding flags (the ``pixel_attention_mask`` it is given covers the unmerged patches)."""

    def forward(self, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = head_bias(self, hidden_state)
        if bias is None:
            return super().forward(hidden_state, attention_mask)
        return attention_pool(self, hidden_state, bias)


HEADS = {hf.SiglipMultiheadAttentionPoolingHead: CrossGETSiglipPoolingHead,
         hf2.Siglip2MultiheadAttentionPoolingHead: CrossGETSiglip2PoolingHead}


# --------------------------------------------------------------------------- inputs, anchors
def mean_token(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, 1, C]``: the mean of each row's real tokens of ``x`` ``[B, N, C]``."""
    if valid is None:
        return x.mean(1, keepdim=True)
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)


@dataclass(eq=False)
class AnchorFree:
    """Encoder pre-hook of a SigLIP vision tower, after the tower state's own start (which
    protects no token: ``Tower.protect_anchor`` is False): the cross token starts as the mean of the real patch embeddings
    (module docstring: the choice and what was measured)."""

    state: TowerState

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        if state.cross is not None:
            x = kwargs.get("inputs_embeds", args[0] if args else None)
            state.cross = mean_token(x, state.input_valid)


@dataclass(frozen=True)
class TextInputs:
    """Reads a SigLIP text tower's inputs: the pooled last position (the anchor) and padding."""

    def __call__(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            raise ValueError("a patched SigLIP text tower needs input_ids (it pools their last position)")
        b, n = input_ids.view(-1, input_ids.shape[-1]).shape
        anchor = torch.full((b,), n - 1, dtype=torch.long, device=input_ids.device)
        if mask is None:
            return anchor, None
        if mask.numel() != b * n:
            raise ValueError(f"attention_mask is {tuple(mask.shape)} but input_ids are {tuple(input_ids.shape)}")
        mask = mask.reshape(b, n).bool()
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask leaves rows {empty} without a single token")
        return anchor, None if bool(mask.all()) else mask


def siglip2_patches(args: tuple, kwargs: dict) -> tuple[None, torch.Tensor | None]:
    """Reads a SigLIP2 vision tower's inputs: no anchor; padding from ``pixel_attention_mask``
    ``[B, N]``, checked against ``pixel_values`` ``[B, N, D]`` and ``spatial_shapes`` ``[B, 2]``."""
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    mask = kwargs.get("pixel_attention_mask", args[1] if len(args) > 1 else None)
    shapes = kwargs.get("spatial_shapes", args[2] if len(args) > 2 else None)
    if mask is None:
        return None, None
    if pixels is None or pixels.dim() != 3 or tuple(mask.shape) != tuple(pixels.shape[:2]):
        got = None if pixels is None else tuple(pixels.shape)
        raise ValueError(
            f"pixel_attention_mask must be [B, N] for pixel_values [B, N, D]: got {tuple(mask.shape)} and {got}"
        )
    mask = mask.bool()
    real = mask.sum(-1)
    if not bool((real > 0).all()):
        raise ValueError(f"pixel_attention_mask leaves images {(real == 0).nonzero().flatten().tolist()} without a patch")
    if shapes is not None:
        grid = shapes.to(real.device).prod(-1)
        if grid.shape != real.shape or not torch.equal(grid.to(real.dtype), real):
            raise ValueError(
                f"pixel_attention_mask marks {real.tolist()} patches per image, spatial_shapes gives {grid.tolist()}"
            )
    return None, None if bool(mask.all()) else mask


# --------------------------------------------------------------------------- towers
LAYERS = {
    hf.SiglipVisionModel: (CrossGETSiglipEncoderLayer, CrossGETSiglipAttention),
    hf.SiglipTextModel: (CrossGETSiglipEncoderLayer, CrossGETSiglipAttention),
    hf2.Siglip2VisionModel: (CrossGETSiglip2EncoderLayer, CrossGETSiglip2Attention),
    hf2.Siglip2TextModel: (CrossGETSiglip2EncoderLayer, CrossGETSiglip2Attention),
}
VISION = (hf.SiglipVisionModel, hf2.Siglip2VisionModel)
TEXT = (hf.SiglipTextModel, hf2.Siglip2TextModel)


def tower(kind: str, module: nn.Module) -> Tower:
    """The :class:`Tower` record of a SigLIP / SigLIP2 vision or text model."""
    layer, attention = next(v for cls, v in LAYERS.items() if isinstance(module, cls))
    if kind == "text":
        return Tower.of(kind, module, layer, attention, restore_length=True, read_inputs=TextInputs())
    inputs = siglip2_patches if isinstance(module, hf2.Siglip2VisionModel) else None
    return Tower.of(kind, module, layer, attention, read_inputs=inputs, protect_anchor=False)  # no CLS: P = 0


def find_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The SigLIP towers of ``model`` by kind (``vision``/``text``), or {} if none."""
    if isinstance(model, VISION):
        return {"vision": model}
    if isinstance(model, TEXT):
        return {"text": model}
    found = {}
    for attr, kind, classes in (("vision_model", "vision", VISION), ("text_model", "text", TEXT)):
        sub = getattr(model, attr, None)
        if isinstance(sub, classes):
            found[kind] = sub
    return found


def head_flops(hidden: int, intermediate: int, n: int) -> float:
    """The attention-pooling head over ``n`` tokens: ``k, v`` projections ``4 n C^2``, the
    probe's ``q`` and output projections ``4 C^2``, its attention ``4 n C``, MLP ``4 C I``."""
    return 4 * n * hidden * hidden + 4 * hidden * hidden + 4 * n * hidden + 4 * hidden * intermediate


def encoder_cost(
    module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
) -> EncoderCost:
    """Analytic cost of one SigLIP / SigLIP2 tower (docs/method.md §7); no protected vision token."""
    cfg = module.config
    c, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    if kind == "text":
        return EncoderCost(c, i, layers, text_len or cfg.max_position_embeddings, 1, 2 * c * cfg.projection_size)
    p = cfg.patch_size
    if image_size:
        patches = (image_size // p) ** 2
    else:
        patches = getattr(cfg, "num_patches", None) or (cfg.image_size // p) ** 2
    fixed = 2 * patches * c * cfg.num_channels * p * p
    if getattr(module, "use_head", False):
        fixed += head_flops(c, i, patches)
    return EncoderCost(c, i, layers, patches, 0, fixed)


@dataclass(eq=False)
class DetachedHead:
    """``[*, C] -> [*, C]``: the image embedding of one token, weights detached: ``post_layernorm``,
    then the pooling head reading that token alone (its attention over one key is
    ``out_proj(v_proj(x))``), then the head's ``x + MLP(LN(x))``."""

    norm: nn.LayerNorm
    head: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        n, h = self.norm, self.head
        x = f.layer_norm(x, n.normalized_shape, n.weight.detach(), n.bias.detach(), n.eps)
        attn, c = h.attention, x.shape[-1]
        v_weight = attn.in_proj_weight.detach()[2 * c :]
        v_bias = None if attn.in_proj_bias is None else attn.in_proj_bias.detach()[2 * c :]
        x = f.linear(f.linear(x, v_weight, v_bias), attn.out_proj.weight.detach(),
                     None if attn.out_proj.bias is None else attn.out_proj.bias.detach())
        ln, mlp = h.layernorm, h.mlp
        y = f.layer_norm(x, ln.normalized_shape, ln.weight.detach(), ln.bias.detach(), ln.eps)
        y = f.linear(mlp.activation_fn(f.linear(y, mlp.fc1.weight.detach(), mlp.fc1.bias.detach())),
                     mlp.fc2.weight.detach(), mlp.fc2.bias.detach())
        return x + y


def install_vision_glue(vision: nn.Module, state: TowerState) -> tuple[list, nn.Module | None]:
    """What a patched SigLIP vision tower ``vision`` (installed, ``state`` its tower state) needs
    besides its layers: the mean-token cross token (:class:`AnchorFree`) and the pooling head over
    merged tokens. Returns ``(hook handles, the swapped head or None)``; undo with
    :func:`uninstall_vision_glue`."""
    # after install()'s pre-hook, which starts the tower state
    handles = [vision.encoder.register_forward_pre_hook(AnchorFree(state), with_kwargs=True)]
    head = getattr(vision, "head", None) if getattr(vision, "use_head", False) else None
    if type(head) in HEADS:
        swap_class(head, HEADS[type(head)], state=state)
        return handles, head
    return handles, None


def uninstall_vision_glue(handles: list, head: nn.Module | None) -> None:
    """Undo :func:`install_vision_glue`."""
    for h in handles:
        h.remove()
    if head is not None:
        unmark(head)


@dataclass(eq=False)
class Glue:
    """What :meth:`SiglipFamily.install_glue` changed on a model."""

    handles: list
    head: nn.Module | None = None


class SiglipFamily(Family):
    name = "SigLIP"
    classes = (
        hf.SiglipModel,
        hf.SiglipVisionModel,
        hf.SiglipTextModel,
        hf2.Siglip2Model,
        hf2.Siglip2VisionModel,
        hf2.Siglip2TextModel,
    )

    find_towers = staticmethod(find_towers)
    tower_record = staticmethod(tower)
    cost = staticmethod(encoder_cost)

    def install_glue(self, model: nn.Module) -> None:
        """A patched vision tower: no protected token, the mean-token cross token
        (:class:`AnchorFree`) and the pooling head over merged tokens; a patched text tower:
        ``hidden_states`` at full length."""
        found = find_towers(model)
        glue = Glue(handles=[])
        vision = found.get("vision")
        state = record(vision.encoder).state if vision is not None and record(vision.encoder) is not None else None
        if state is not None:
            glue.handles, glue.head = install_vision_glue(vision, state)
        text = found.get("text")
        if text is not None and record(text.encoder) is not None:
            glue.handles += restore_hidden_states(text, text.encoder)
        mark(model, glue=glue)

    def uninstall_glue(self, model: nn.Module) -> None:
        rec = record(model)
        glue = rec.glue if rec is not None else None
        if glue is None:
            return
        uninstall_vision_glue(glue.handles, glue.head)  # the text tower's handles are hooks too
        unmark(model, ("glue",))

    def joint_projection(self, model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Into SigLIP's image-text space, weights detached (docs/method.md §3): image tokens
        through ``post_layernorm`` and the pooling head (:class:`DetachedHead`), text tokens
        through ``final_layer_norm`` and the text ``head``."""
        found = find_towers(model).get(kind)
        if found is None:
            return None
        if kind == "vision":
            head = getattr(found, "head", None) if getattr(found, "use_head", False) else None
            return None if head is None else DetachedHead(found.post_layernorm, head)
        return DetachedProjection(found.final_layer_norm, found.head)


FAMILY = SiglipFamily()
