"""ViT-style vision encoders (Hugging Face transformers 5.23: ViT and DeiT run their layers in
the model's own forward, DINOv2 in an encoder module): ViT, DeiT, DINOv2 and DINOv2 with
registers.

Patched: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``,
``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` and
``Dinov2WithRegistersForImageClassification``.

- Each layer is pre-LN; it merges between its attention and its MLP (docs/method.md §1),
  keeping upstream's exact math around it: ViT / DeiT ``x + dropout(Attn(LN(x)))``, merge,
  ``x + dropout(MLP(LN(x)))``; DINOv2 ``x + drop_path(ls1 * Attn(norm1(x)))``, merge,
  ``x + drop_path(ls2 * MLP(norm2(x)))`` (layer scale, drop path an identity in eval).
- Protected tokens (never merged, docs/method.md §4): the ``P`` leading special tokens, CLS
  for ViT and DINOv2, CLS and the distillation token for DeiT, CLS and the register tokens
  for DINOv2 with registers. :class:`~crossget.merge.TokenBookkeeping` protects one anchor
  per row (CLS, token 0, which also anchors the cross token); :class:`StartTower`, a forward
  hook on the tower's embeddings, starts the bookkeeping on the embedding output and
  protects the other ``P - 1`` tokens. Survivors keep their order, so the special tokens stay
  at ``0 .. P-1`` and every stock head reads them where it expects them.
- ViT and DeiT run their layers inside the model's own forward (no encoder module), so for
  all four the tower state starts from the embeddings (:class:`StartTower`) rather than from
  an encoder pre-hook, and the layers' ``ModuleList`` stands in for the encoder (it holds the
  tower state and the cross tokens, ``<layers>.crossget_cross_tokens``).
- As for CLIP: the cross token (anchored on CLS) only observes, so ``r = 0`` gives the stock
  outputs; ``output_attentions`` / ``output_hidden_states`` leave it out (hidden states are
  the merged sequences, special tokens first); gradient checkpointing recomputes each layer
  from the state it saw (:func:`~crossget.families.clip.run_layer`).
- Pooling is upstream's: CLS (ViT / DeiT pooler, DINOv2 ``pooler_output``), the
  classification heads' CLS (+ distillation token). ``Dinov2(WithRegisters)ForImageClassification``
  also feeds the mean of the patch tokens to its classifier; a plain mean over merged tokens
  would weigh a token covering ``k`` patches as one, so inside the head's call the backbone's
  ``last_hidden_state`` is given its input length back through the token map
  (:class:`FullLengthForHead`): every patch position holds the token that covers it, and
  the head's stock ``mean(dim=1)`` is the size-weighted mean of the merged patch tokens
  (exactly the stock mean when a merged token stands for identical patches). A backbone
  called on its own returns the reduced sequence, as every vision tower.
- A patched model refuses an ``attention_mask`` that masks tokens (merged tokens have no
  per-input mask; proportional attention rebuilds the mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deit import modeling_deit as hf_deit
from transformers.models.dinov2 import modeling_dinov2 as hf_dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as hf_dinov2_reg
from transformers.models.vit import modeling_vit as hf_vit

from crossget.families.base import Family, Tower
from crossget.families.clip import own_checkpointing, run_layer, without_cross
from crossget.merge import gather_tokens
from crossget.record import mark, record
from crossget.schedule import EncoderCost
from crossget.state import TowerState


# --------------------------------------------------------------------------- attention
def attention_forward(
    attn: nn.Module, eager: Callable, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upstream's ViT / DeiT / DINOv2 self-attention (separate ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``; ``eager`` the model's own eager function), showing its queries
    and keys ``[B, N (+1), C]`` (heads concatenated) to the tower state. Returns
    ``(out [B, N (+1), C], weights)``; the weights (``output_attentions=True``, eager) leave
    the cross token out: ``[B, H, N, N]`` over the layer's tokens before its merge."""
    b, n, _ = hidden_states.shape
    shape = (b, n, -1, attn.head_dim)
    q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    q_heads, k_heads, v_heads = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, weights = attend(
        attn, q_heads, k_heads, v_heads, attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **kwargs,
    )
    state = attn._crossget.state
    state.observe(q, k)
    return attn.o_proj(out.reshape(b, n, -1).contiguous()), without_cross(weights, state)


class CrossGETViTAttention(hf_vit.ViTAttention):
    """ViT attention that shows its queries and keys to the tower state (:func:`attention_forward`)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return attention_forward(self, hf_vit.eager_attention_forward, hidden_states, attention_mask, **kwargs)


class CrossGETDeiTAttention(hf_deit.DeiTAttention):
    """DeiT attention that shows its queries and keys to the tower state (:func:`attention_forward`)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return attention_forward(self, hf_deit.eager_attention_forward, hidden_states, attention_mask, **kwargs)


class CrossGETDinov2Attention(hf_dinov2.Dinov2Attention):
    """DINOv2 attention that shows its queries and keys to the tower state (:func:`attention_forward`)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return attention_forward(self, hf_dinov2.eager_attention_forward, hidden_states, attention_mask, **kwargs)


class CrossGETDinov2WithRegistersAttention(hf_dinov2_reg.Dinov2WithRegistersAttention):
    """DINOv2-with-registers attention that shows its queries and keys to the tower state."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return attention_forward(self, hf_dinov2_reg.eager_attention_forward, hidden_states, attention_mask, **kwargs)


# --------------------------------------------------------------------------- layers
def vit_layer(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor:
    """One ViT / DeiT layer: ``x + dropout(Attn(LN(x)))``, merge, ``x + dropout(MLP(LN(x)))``."""
    state, layer = module._crossget.state, module._crossget.layer
    x, mask, _ = state.begin_layer(hidden_states, attention_mask, layer)
    h = module.attention(module.layernorm_before(x), mask, **kwargs)[0]
    x = module.dropout(h) + x
    x = state.reduce(x, layer)
    h = module.mlp(module.layernorm_after(x))
    x = module.dropout(h) + x
    return state.end_layer(x)


def dinov2_layer(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
    """One DINOv2 layer: ``x + drop_path(ls1(Attn(norm1(x))))``, merge,
    ``x + drop_path(ls2(MLP(norm2(x))))``."""
    state, layer = module._crossget.state, module._crossget.layer
    x, mask, _ = state.begin_layer(hidden_states, attention_mask, layer)
    h = module.attention(module.norm1(x), attention_mask=mask, **kwargs)[0]
    x = module.drop_path(module.layer_scale1(h)) + x
    x = state.reduce(x, layer)
    h = module.mlp(module.norm2(x))
    x = module.drop_path(module.layer_scale2(h)) + x
    return state.end_layer(x)


_LAYER_DOC = """Pre-LN layer with token reduction between attention and MLP (docs/method.md §1).

    What ``output_hidden_states=True`` collects is each layer's output, the merged sequence
    ``[B, N - r, C]`` (special tokens first); attention maps (eager) leave the cross token out.
    Gradient checkpointing recomputes the layer from the state it saw in the forward
    (:func:`~crossget.families.clip.run_layer`): same merges, same gradients."""


@own_checkpointing
class CrossGETViTLayer(hf_vit.ViTLayer):
    __doc__ = _LAYER_DOC

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, vit_layer, hidden_states, attention_mask=attention_mask, **kwargs)


@own_checkpointing
class CrossGETDeiTLayer(hf_deit.DeiTLayer):
    __doc__ = _LAYER_DOC

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, vit_layer, hidden_states, attention_mask=attention_mask, **kwargs)


@own_checkpointing
class CrossGETDinov2Layer(hf_dinov2.Dinov2Layer):
    __doc__ = _LAYER_DOC

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, dinov2_layer, hidden_states, attention_mask=attention_mask, **kwargs)


@own_checkpointing
class CrossGETDinov2WithRegistersLayer(hf_dinov2_reg.Dinov2WithRegistersLayer):
    __doc__ = _LAYER_DOC

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return run_layer(self, dinov2_layer, hidden_states, attention_mask=attention_mask, **kwargs)


# --------------------------------------------------------------------------- towers
@dataclass(frozen=True)
class Anatomy:
    """What differs between the four backbones."""

    name: str  # shown in errors
    layer_class: type
    attention_class: type
    layers: Callable[[nn.Module], nn.ModuleList]  # backbone -> its layers
    mask_arg: int  # position of attention_mask in the backbone's forward
    registers: bool = False  # CLS, then config.num_register_tokens registers
    distillation: bool = False  # CLS, then the distillation token
    swiglu: bool = False  # DINOv2 may use a SwiGLU MLP (config.use_swiglu_ffn)

    def protected(self, cfg) -> int:
        """``P``: the leading special tokens, never merged."""
        if self.registers:
            return 1 + cfg.num_register_tokens
        return 2 if self.distillation else 1


ANATOMY = {
    hf_vit.ViTModel: Anatomy("ViTModel", CrossGETViTLayer, CrossGETViTAttention, lambda m: m.layers, 3),
    hf_deit.DeiTModel: Anatomy("DeiTModel", CrossGETDeiTLayer, CrossGETDeiTAttention, lambda m: m.layers, 3,
                               distillation=True),
    hf_dinov2.Dinov2Model: Anatomy("Dinov2Model", CrossGETDinov2Layer, CrossGETDinov2Attention,
                                   lambda m: m.encoder.layer, 2, swiglu=True),
    hf_dinov2_reg.Dinov2WithRegistersModel: Anatomy(
        "Dinov2WithRegistersModel", CrossGETDinov2WithRegistersLayer, CrossGETDinov2WithRegistersAttention,
        lambda m: m.encoder.layer, 2, registers=True, swiglu=True),
}
# heads: attribute of their backbone; True where the head averages the patch tokens
HEADS = {
    hf_vit.ViTForImageClassification: ("vit", False),
    hf_deit.DeiTForImageClassification: ("deit", False),
    hf_deit.DeiTForImageClassificationWithTeacher: ("deit", False),
    hf_dinov2.Dinov2ForImageClassification: ("dinov2", True),
    hf_dinov2_reg.Dinov2WithRegistersForImageClassification: ("dinov2_with_registers", True),
}


@dataclass(frozen=True)
class ImageInputs:
    """A backbone's pre-hook: the anchor is CLS (token 0), there is no padding; an
    ``attention_mask`` that masks tokens is refused."""

    name: str
    mask_arg: int

    def __call__(self, args: tuple, kwargs: dict) -> tuple[None, None]:
        mask = kwargs.get("attention_mask", args[self.mask_arg] if len(args) > self.mask_arg else None)
        if mask is not None and not (mask.dim() == 2 and bool(mask.bool().all())):
            raise ValueError(
                f"a patched {self.name} does not take an attention_mask that masks tokens "
                "(merged tokens have no per-input mask); call it without attention_mask"
            )
        return None, None


@dataclass(eq=False)
class StartTower:
    """Forward hook on a backbone's embeddings: starts the tower state on the embedding output
    ``[B, N0, C]`` (what an encoder pre-hook does for CLIP; the state protects the leading
    special tokens, ``Tower.protect_leading``); CLS (token 0) is the anchor (docs/method.md §3, §4). ``track``
    keeps the token map (a head that averages the patch tokens reads it)."""

    state: TowerState
    track: bool = False

    def __call__(self, _module: nn.Module, _args, output: torch.Tensor) -> None:
        state = self.state
        state.start(output)  # protects the leading special tokens (Tower.protect_leading)
        book = state.book
        if self.track and book.token_map is None:
            b, n = book.protected.shape
            book.token_map = torch.arange(n, device=output.device).expand(b, n)


@dataclass(eq=False)
class FullLengthForHead:
    """Hooks of a head that averages the patch tokens (``Dinov2(WithRegisters)ForImageClassification``):
    during the head's forward, the backbone's ``last_hidden_state`` ``[B, N, C]`` is given its
    input length back, ``[B, N0, C]``, every position holding the token that covers it (its
    token map), so the head's plain mean over patch positions is the size-weighted mean of the
    merged patch tokens. Outside the head's call the backbone returns the reduced sequence."""

    encoder: nn.Module  # holds the tower state in its record
    active: int = 0

    def head_pre(self, _module, _args) -> None:
        self.active += 1

    def head_post(self, _module, _args, _output) -> None:
        self.active -= 1

    def backbone_post(self, _module, _args, output):
        rec = record(self.encoder)
        state = rec.state if rec is not None else None
        if not self.active or state is None or not state.merged or state.token_map is None:
            return None
        if isinstance(output, tuple):
            return (gather_tokens(output[0], state.token_map), *output[1:])
        output.last_hidden_state = gather_tokens(output.last_hidden_state, state.token_map)
        return output


def _backbone(model: nn.Module) -> nn.Module:
    if isinstance(model, tuple(ANATOMY)):
        return model
    return getattr(model, HEADS[_head_class(model)][0])


def _head_class(model: nn.Module) -> type:
    return next(cls for cls in HEADS if isinstance(model, cls))


def _anatomy(backbone: nn.Module) -> Anatomy:
    return next(a for cls, a in ANATOMY.items() if isinstance(backbone, cls))


def find_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The one tower of a ViT-style model, its backbone."""
    return {"vision": _backbone(model)}


def tower(kind: str, module: nn.Module) -> Tower:
    """The :class:`Tower` record of a backbone: its layers' ``ModuleList`` stands in for the
    encoder (it holds the tower state and the cross tokens; the state starts from the
    embeddings, :class:`StartTower`)."""
    a = _anatomy(module)
    layers = a.layers(module)
    cfg = module.config
    return Tower(
        kind=kind, module=module, encoder=layers, layers=list(layers), layer_class=a.layer_class,
        attention_class=a.attention_class, attention_attr="attention", causal=False, restore_length=False,
        read_inputs=ImageInputs(a.name, a.mask_arg), hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        protect_leading=a.protected(cfg),  # CLS (the anchor) and the distillation / register tokens
    )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def encoder_cost(
    module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
) -> EncoderCost:
    """Analytic cost of a backbone (docs/method.md §7): the patches plus ``P`` special tokens,
    ``P`` protected; the patch embedding as the fixed part. A SwiGLU MLP (three matrices of
    width ``I'``) counts as an MLP of width ``1.5 I'``."""
    cfg = module.config
    a = _anatomy(module)
    (h, w), (ph, pw) = _pair(image_size or cfg.image_size), _pair(cfg.patch_size)
    patches = (h // ph) * (w // pw)
    p = a.protected(cfg)
    if not a.swiglu:
        inter = cfg.intermediate_size
    elif cfg.use_swiglu_ffn:
        width = (int(int(cfg.hidden_size * cfg.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        inter = 3 * width // 2
    else:
        inter = int(cfg.hidden_size * cfg.mlp_ratio)
    fixed = 2 * patches * cfg.hidden_size * cfg.num_channels * ph * pw
    return EncoderCost(cfg.hidden_size, inter, cfg.num_hidden_layers, patches + p, p, fixed)


class ViTFamily(Family):
    name = "ViT"
    classes = (*ANATOMY, *HEADS)

    find_towers = staticmethod(find_towers)
    tower_record = staticmethod(tower)
    cost = staticmethod(encoder_cost)

    # joint_projection: None, a lone vision encoder has no joint space (no cross-token loss)

    def install_glue(self, model: nn.Module) -> None:
        """Start the tower state from the embeddings and protect the special tokens
        (:class:`StartTower`, removed with the tower); for heads that average the patch tokens,
        the backbone's output at full length inside the head's call (:class:`FullLengthForHead`)."""
        backbone = _backbone(model)
        t = tower("vision", backbone)
        state = t.state
        if state is None:
            return
        mean_head = backbone is not model and HEADS[_head_class(model)][1]
        start = StartTower(state, track=mean_head)
        record(backbone).handles.append(backbone.embeddings.register_forward_hook(start))
        if mean_head:
            hooks = FullLengthForHead(t.encoder)
            mark(model, glue=[
                model.register_forward_pre_hook(hooks.head_pre),
                model.register_forward_hook(hooks.head_post, always_call=True),
                backbone.register_forward_hook(hooks.backbone_post),
            ])



FAMILY = ViTFamily()
