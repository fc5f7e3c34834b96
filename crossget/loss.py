"""The cross-token alignment loss (docs/method.md §3): a pure function of paired cross tokens."""

from __future__ import annotations

import torch


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
