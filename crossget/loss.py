"""The cross-token alignment loss (SPEC §3)."""

from __future__ import annotations

import torch
from torch import nn

from crossget.api import _family, joint_projection, states


def cross_token_alignment(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon loss between image and text cross tokens in the joint space.

    ``u``, ``v``: ``[L, B, P]`` projected cross tokens of ``L`` paired layers. With
    ``p = softmax(u)``, ``q = softmax(v)``, ``m = (p + q) / 2`` returns the mean over
    layers and batch of ``(KL(m || p) + KL(m || q)) / 2`` (a scalar).
    """
    if u.shape != v.shape:
        raise ValueError(f"image and text cross tokens differ in shape: {tuple(u.shape)} vs {tuple(v.shape)}")
    log_p, log_q = u.float().log_softmax(-1), v.float().log_softmax(-1)
    m = (log_p.exp() + log_q.exp()) / 2
    log_m = m.clamp_min(1e-30).log()
    kl_mp = (m * (log_m - log_p)).sum(-1)
    kl_mq = (m * (log_m - log_q)).sum(-1)
    return ((kl_mp + kl_mq) / 2).mean()


def cross_token_loss(model: nn.Module) -> torch.Tensor:
    """SPEC §3's loss for the last forward of a model patched with ``method="crossget"``.

    Each tower's cross token output of every layer is projected into the joint space
    by that tower's final norm and projection (weights detached); the deepest
    ``min(L_vision, L_text)`` layers are paired. Gradients reach the cross tokens.

    Families with their own pairing (LLaVA: vision tower vs language model) define
    ``cross_token_loss`` in their patch module, which this defers to.

    Raises:
        ValueError: the model has no two towers with cross tokens, or no forward ran.
    """
    family_loss = getattr(_family(model), "cross_token_loss", None)
    if family_loss is not None:
        return family_loss(model)
    st = states(model)
    if not all(k in st and st[k].settings.uses_cross_token for k in ("vision", "text")):
        raise ValueError("cross_token_loss needs both towers patched with method='crossget'")
    outs = {k: st[k].cross_outputs for k in ("vision", "text")}
    if not outs["vision"] or not outs["text"]:
        raise ValueError("run a forward through both towers before cross_token_loss")
    project = {k: joint_projection(model, k) for k in ("vision", "text")}
    if project["vision"] is None or project["text"] is None:
        raise ValueError(
            f"cross_token_loss needs a joint image-text space (projections), which {type(model).__name__} has not"
        )
    depth = min(len(outs["vision"]), len(outs["text"]))
    u = project["vision"](torch.stack(outs["vision"][-depth:]))
    v = project["text"](torch.stack(outs["text"][-depth:]))
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"cross_token_loss pairs images and texts one to one: got {u.shape[1]} images, {v.shape[1]} texts")
    return cross_token_alignment(u, v)
