"""Measured FLOPs, via ``torch.utils.flop_counter.FlopCounterMode``.

On CPU, SDPA runs as ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
``_backward``), which torch's counter does not know (it would count 0 for the
attention matmuls); importing this module registers them with torch's own SDPA
formulas, so eager and SDPA models count (nearly) the same. Counts are FLOPs
(2 x multiply-adds), as FlopCounterMode reports them, and include whatever the
patched forward does (matching, merging).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = ["count_flops", "model_gflops"]

_aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_registry:

        @register_flop_formula(fwd)
        def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

    if bwd is not None and bwd not in flop_registry:

        @register_flop_formula(bwd)
        def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_sdpa()


def count_flops(fn_or_module: Callable[..., Any], *args, **kwargs) -> int:
    """FLOPs of one call ``fn_or_module(*args, **kwargs)``; it really runs, in the caller's
    grad mode (a function that calls ``backward`` has its backward counted too)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn_or_module(*args, **kwargs)
    return counter.get_total_flops()


def model_gflops(model: torch.nn.Module, inputs: Mapping[str, Any], per_sample: bool = False) -> float:
    """GFLOPs of ``model(**inputs)`` without gradients; ``per_sample`` divides by the batch size
    (the first dimension of the first tensor input)."""
    with torch.inference_mode():
        flops = count_flops(model, **inputs)
    if per_sample:
        batch = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
        flops /= batch
    return flops / 1e9
