"""Installing and removing the patch on one encoder tower, for every model family.

A family module describes its towers as :class:`Tower` records (where the encoder and
its layers are, which subclasses replace the layer and attention classes, how the
tower's inputs give CLS/EOT and padding). This module does the rest the same way for
all of them: class swaps, hooks, cross-token parameters, the shared
:class:`~crossget.state.TowerState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from crossget.state import TowerSettings, TowerState

STATE_ATTR = "_crossget"  # on the tower, its encoder, every layer and attention
CROSS_PARAM = "crossget_cross_tokens"  # on the encoder: theta, [layers, C]


@dataclass
class Tower:
    """Where one encoder lives in a model and how to patch it.

    Attributes:
        kind: ``"vision"`` or ``"text"``.
        module: the tower (its pre-hook reads the inputs).
        encoder: the module that runs the layers (its hooks start/finish the state).
        layers: the encoder layers, in order.
        layer_class / attention_class: patched subclasses to swap in.
        attention_attr: path of the attention module inside a layer (``self_attn``;
            dotted for nested modules, e.g. BLIP text's ``attention.self``).
        causal: text with causal attention (positions must stay ordered).
        restore_length: give the encoder output its input length back (text pooling).
        read_inputs: ``(tower args, kwargs) -> (anchor [B] or None, valid [B, N0] or None)``.
        hidden: width ``C``.
    """

    kind: str
    module: nn.Module
    encoder: nn.Module
    layers: list[nn.Module]
    layer_class: type
    attention_class: type
    attention_attr: str
    causal: bool
    restore_length: bool
    read_inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, torch.Tensor | None]]
    hidden: int
    heads: int

    @property
    def state(self) -> TowerState | None:
        return getattr(self.encoder, STATE_ATTR, None)


def install(tower: Tower, settings: TowerSettings, theta: nn.Parameter | None = None) -> TowerState:
    """Patch ``tower`` in place (it must not be patched).

    ``theta``: cross tokens to reuse (e.g. trained ones kept across a reconfiguration);
    zeros are created when the method needs them and none are given.
    """
    state = TowerState(settings=settings, heads=tower.heads, causal=tower.causal, restore_length=tower.restore_length)
    _attach(tower, state)
    if settings.uses_cross_token:
        if theta is None or theta.shape != (len(tower.layers), tower.hidden):
            ref = next(tower.encoder.parameters())
            theta = nn.Parameter(torch.zeros(len(tower.layers), tower.hidden, dtype=ref.dtype, device=ref.device))
        setattr(tower.encoder, CROSS_PARAM, theta)
        state.cross_tokens = theta
    elif theta is not None:
        setattr(tower.encoder, CROSS_PARAM, theta)  # unused now, kept for a later re-patch
    return state


def _attach(tower: Tower, state: TowerState) -> None:
    def tower_pre_hook(_module, args, kwargs):
        state.anchor, state.input_valid = tower.read_inputs(args, kwargs)

    def encoder_pre_hook(_module, args, kwargs):
        x = kwargs.get("inputs_embeds", args[0] if args else None)
        state.start(x)

    def encoder_hook(_module, _args, _kwargs, output):
        output.last_hidden_state = state.finish(output.last_hidden_state)
        return output

    handles = [
        tower.module.register_forward_pre_hook(tower_pre_hook, with_kwargs=True),
        tower.encoder.register_forward_pre_hook(encoder_pre_hook, with_kwargs=True),
        tower.encoder.register_forward_hook(encoder_hook, with_kwargs=True),
    ]
    for i, layer in enumerate(tower.layers):
        attn = layer.get_submodule(tower.attention_attr)
        layer._crossget_original_class = layer.__class__
        attn._crossget_original_class = attn.__class__
        layer.__class__ = tower.layer_class
        attn.__class__ = tower.attention_class
        for m in (layer, attn):
            setattr(m, STATE_ATTR, state)
            m._crossget_layer = i
    setattr(tower.encoder, STATE_ATTR, state)
    tower.encoder._crossget_handles = handles


def uninstall(tower: Tower) -> nn.Parameter | None:
    """Undo :func:`install`: original classes, no hooks, no cross-token parameters.

    Returns the removed cross tokens (or None)."""
    if tower.state is None:
        return None
    for h in tower.encoder._crossget_handles:
        h.remove()
    for layer in tower.layers:
        attn = layer.get_submodule(tower.attention_attr)
        for m in (layer, attn):
            m.__class__ = m._crossget_original_class
            for name in ("_crossget_original_class", STATE_ATTR, "_crossget_layer"):
                m.__dict__.pop(name, None)
    for name in (STATE_ATTR, "_crossget_handles"):
        tower.encoder.__dict__.pop(name, None)
    theta = getattr(tower.encoder, CROSS_PARAM, None)
    if theta is not None:
        delattr(tower.encoder, CROSS_PARAM)
    return theta
