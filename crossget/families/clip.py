"""CLIP (Hugging Face transformers >= 5.6): where to merge, and how the towers pool.

Patched: ``CLIPModel``, ``CLIPVisionModel(WithProjection)``, ``CLIPTextModel(WithProjection)``
and any model that holds a ``CLIPVisionModel`` tower (e.g. LLaVA's vision tower).
Each encoder layer runs ``x + Attn(LN1(x))``, merges, then ``x + MLP(LN2(x))``
(docs/method.md §1); the token bookkeeping and the cross token live in
:class:`crossget.state.TowerState`.

Also here, shared with BLIP and BLIP-2: gradient checkpointing of a patched layer
(:func:`run_layer`), the cross token taken out of returned attention maps
(:func:`without_cross`), and text towers' ``hidden_states`` given their input length back
(:class:`FullLengthHiddenStates`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as hf

from crossget.families.base import Family, Tower
from crossget.merge import TokenBookkeeping, gather_tokens
from crossget.record import mark, record
from crossget.schedule import EncoderCost
from crossget.state import TowerState


# --------------------------------------------------------------------------- shared by the families
def without_cross(weights: torch.Tensor | None, state: TowerState) -> torch.Tensor | None:
    """Attention probabilities ``[B, H, N (+1), N (+1)]`` as a user receives them
    (``output_attentions=True``): without the cross token's row and column, ``[B, H, N, N]``.

    No token attends to the cross token (its column is exactly 0 in every other row), so
    with ``r = 0`` what remains equals the stock model's maps."""
    if weights is None or not state.with_cross:
        return weights
    return weights[..., :-1, :-1]


def own_checkpointing(cls: type) -> type:
    """Class decorator for a patched ``GradientCheckpointingLayer``: transformers wraps every
    subclass's ``forward`` in a wrapper that checkpoints the whole call; a patched layer
    checkpoints itself (:func:`run_layer`), so the wrapper is taken off again."""
    forward = cls.__dict__["forward"]
    cls.forward = getattr(forward, "__wrapped__", forward)
    return cls


def _copied(fields: dict) -> dict:
    """A copy of a :class:`TowerState`'s fields that running a layer cannot change: lists and
    the bookkeeping are copied (a layer appends to the lists and reassigns the bookkeeping's
    tensors; it changes no tensor in place)."""
    return {
        k: list(v) if isinstance(v, list) else copy.copy(v) if isinstance(v, TokenBookkeeping) else v
        for k, v in fields.items()
    }


@dataclass(eq=False)
class LayerReplay:
    """One checkpointed call of a patched layer: ``body(layer, *args, **kwargs)``, run once in
    the forward and again whenever autograd recomputes it.

    The first run (the forward) updates the tower state as usual. A recomputation runs from
    the state the layer saw on entry (bookkeeping, cross token, lists), so it recomputes the
    same merge, and then puts the state back as the forward left it; it checks that the
    recomputed bookkeeping (sizes, token map, flags) is the forward's, bit for bit.
    The cross token's output, which the cross-token loss reads, is returned next to the
    layer output so that reentrant checkpointing carries its gradient too.
    """

    layer: nn.Module
    body: Callable[..., torch.Tensor]
    kwargs: dict
    entry: dict | None = None  # the state's fields when the forward entered the layer
    after: TokenBookkeeping | None = None  # the bookkeeping the forward left
    cross_index: int = 0

    def __call__(self, *args):
        state: TowerState = self.layer._crossget.state
        names = [f.name for f in dataclasses.fields(state)]
        if self.entry is None:  # the forward
            self.entry = _copied({k: getattr(state, k) for k in names})
            self.cross_index = len(state.cross_outputs)
            out = self.body(self.layer, *args, **self.kwargs)
            self.after = copy.copy(state.book)
            return self._with_cross(out, state)
        left = {k: getattr(state, k) for k in names}  # the state as the forward left it
        for k, v in _copied(self.entry).items():
            setattr(state, k, v)
        try:
            out = self.body(self.layer, *args, **self.kwargs)
            self._check(state.book)
            return self._with_cross(out, state)
        finally:
            for k, v in left.items():
                setattr(state, k, v)

    def _with_cross(self, out: torch.Tensor, state: TowerState):
        if len(state.cross_outputs) > self.cross_index:
            return out, state.cross_outputs[self.cross_index]
        return out

    def _check(self, book: TokenBookkeeping) -> None:
        for k, ref in vars(self.after).items():
            now = getattr(book, k)
            same = torch.equal(now, ref) if isinstance(ref, torch.Tensor) and isinstance(now, torch.Tensor) else now == ref
            if not same:
                raise RuntimeError(
                    f"gradient checkpointing: recomputing {type(self.layer).__name__} {self.layer._crossget.layer} "
                    f"merged tokens differently from its forward ({k} differs; non-deterministic kernels?); "
                    "call gradient_checkpointing_disable() on this model"
                )


def run_layer(layer: nn.Module, body: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """``body(layer, *args, **kwargs)``, checkpointed when transformers' gradient checkpointing
    is on (``model.gradient_checkpointing_enable()``), the layer trains and autograd records.

    Tensors that need gradients go in ``args`` (as transformers' own layers take them, for
    reentrant checkpointing). The merge a layer makes depends on the tower state, which the
    forward moves on layer by layer; :class:`LayerReplay` recomputes each layer from the
    state it saw, so gradients are those of the run without checkpointing. In inference
    (``eval()`` or no grad) the flag changes nothing.
    """
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
        return body(layer, *args, **kwargs)
    replay = LayerReplay(layer, body, kwargs)
    func = getattr(layer, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
    with set_checkpoint_early_stop(False):  # a recomputation runs to the end, so _check runs
        result = func(replay, *args)
    if isinstance(result, tuple):
        result, cross = result
        layer._crossget.state.cross_outputs[replay.cross_index] = cross
    return result


@dataclass(eq=False)
class FullLengthHiddenStates:
    """Forward hook on a text tower that restores its length at the encoder output: its
    ``hidden_states`` (``output_hidden_states=True``) get the input length back as
    ``last_hidden_state`` does, each position holding the state of the token that covers it
    after that layer (the layer's token map). Vision towers keep merged hidden states."""

    encoder: nn.Module

    def __call__(self, _module: nn.Module, _args, output):
        rec = record(self.encoder)
        state = rec.state if rec is not None else None
        if state is None or not any(m is not None for m in state.token_maps):
            return None
        maps = (None, *state.token_maps)
        if isinstance(output, tuple):  # return_dict=False: the one tuple of L + 1 hidden states [B, N, C]
            at = [i for i, e in enumerate(output) if self._hidden_states(e, len(maps))]
            if len(at) != 1:
                return None
            return (*output[: at[0]], self._restored(output[at[0]], maps, output[0]), *output[at[0] + 1 :])
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None and self._hidden_states(hidden, len(maps)):
            output.hidden_states = self._restored(hidden, maps, output.last_hidden_state)
        return output

    @staticmethod
    def _hidden_states(e, n: int) -> bool:
        return isinstance(e, tuple) and len(e) == n and all(h is None or (torch.is_tensor(h) and h.dim() == 3) for h in e)

    @staticmethod
    def _restored(hidden: tuple, maps: tuple, last: torch.Tensor) -> tuple:
        # BLIP ties its last hidden state to last_hidden_state, which is restored already
        return tuple(
            h if h is None or m is None or h is last else gather_tokens(h, m) for h, m in zip(hidden, maps, strict=True)
        )


def restore_hidden_states(text: nn.Module, encoder: nn.Module) -> list:
    """Install :class:`FullLengthHiddenStates` on a text tower; returns the hook handle(s)."""
    return [text.register_forward_hook(FullLengthHiddenStates(encoder))]


class CrossGETCLIPAttention(hf.CLIPAttention):
    """CLIP attention that shows its queries and keys to the tower state (metric, importance).

    The attention weights it returns (what ``output_attentions=True`` collects) leave the
    cross token out: ``[B, H, N, N]`` over the layer's tokens before its merge, equal to the
    stock model's while nothing has merged. With ``sdpa`` they are None, as upstream.
    """

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        state = self._crossget.state
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q_heads, k_heads, v_heads = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        out, weights = attend(
            self, q_heads, k_heads, v_heads, attention_mask,
            scaling=self.scale, dropout=self.dropout if self.training else 0.0, **kwargs,
        )
        state.observe(q, k)
        return self.out_proj(out.reshape(b, n, -1)), without_cross(weights, state)


def pre_ln_layer(
    module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """One pre-LN layer (CLIP, BLIP and BLIP-2 vision): attention, merge, MLP (docs/method.md §1)."""
    state, layer = module._crossget.state, module._crossget.layer
    x, mask, upstream = state.begin_layer(hidden_states, attention_mask, layer)
    if not upstream:
        kwargs["is_causal"] = False  # causality now lives in the rebuilt mask
    x = x + module.self_attn(module.layer_norm1(x), attention_mask=mask, **kwargs)[0]
    x = state.reduce(x, layer)
    x = x + module.mlp(module.layer_norm2(x))
    return state.end_layer(x)


@own_checkpointing
class CrossGETCLIPEncoderLayer(hf.CLIPEncoderLayer):
    """Pre-LN layer with token reduction between attention and MLP (docs/method.md §1).

    What ``output_hidden_states=True`` collects is each layer's output: the merged sequence
    ``[B, N - r, C]`` for a vision tower; a text tower's are given their input length back
    at the tower output (:class:`FullLengthHiddenStates`), as its ``last_hidden_state``.
    Gradient checkpointing (``gradient_checkpointing_enable()``) recomputes the layer from
    the state it saw in the forward (:func:`run_layer`): same merges, same gradients.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return run_layer(self, pre_ln_layer, hidden_states, attention_mask=attention_mask, **kwargs)


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
    return Tower.of(kind, module, CrossGETCLIPEncoderLayer, CrossGETCLIPAttention, causal=text, restore_length=text,
                    read_inputs=TextInputs(module.config.eos_token_id) if text else None)


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


def encoder_cost(
    module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
) -> EncoderCost:
    """Analytic cost of one CLIP tower (also LLaVA's vision tower)."""
    cfg = module.config
    if kind == "vision":
        patches = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
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

    find_towers = staticmethod(find_towers)
    tower_record = staticmethod(tower)
    cost = staticmethod(encoder_cost)

    def install_glue(self, model: nn.Module) -> None:
        """A patched text tower's ``hidden_states`` at full length (:class:`FullLengthHiddenStates`)."""
        text = find_towers(model).get("text")
        if text is not None and record(text.encoder) is not None:
            mark(model, glue=restore_hidden_states(text, text.encoder))

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
