"""What every training command shares: the accelerator and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


def accelerator(cpu: bool | None = None) -> Accelerator:
    """An ``accelerate`` Accelerator: on the GPU when there is one (multi-GPU through
    ``accelerate launch``), else on the CPU."""
    return Accelerator(cpu=bool(cpu) if cpu is not None else not torch.cuda.is_available())


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
