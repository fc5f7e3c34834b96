"""FLOPs of the real LLaVA-1.5-7B / -13B, counted without weights.

The architectures are :func:`crossget.tools.zoo.llava15_config` (CLIP ViT-L/14 at 336 px, the 2-layer GELU MLP
projector, Llama-2 7B / 13B shapes, as in llava-hf's ``llava-1.5-{7b,13b}-hf`` configs), built
on PyTorch's meta device and run through ``FlopCounterMode``: the count is exactly what the
HF modules execute, without a byte of weights or a real multiply.

    from crossget.tools.eval.llava import llava15_config, llava_flops
    llava_flops(llava15_config("7b"), visual_tokens=278, prompt_tokens=64)["total"]   # GFLOPs

Counts are FLOPs = 2 x multiply-adds, matmuls / convolutions / attention only (norms,
activations and softmax are not counted, as in ``crossget.flops``); attention is counted in
full (eager, causal masks do not halve it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from crossget.tools.zoo import LLAVA15_SIZES, llava15_config

__all__ = ["LLAVA15_SIZES", "llava15_config", "llava_flops"]

def _unreduced_visual_tokens(config) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def _count(fn, *args, **kwargs) -> tuple[int, Any]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def llava_flops(
    config,
    visual_tokens: int | None = None,
    prompt_tokens: int = 64,
    new_tokens: int = 1,
    batch: int = 1,
    vision: bool = True,
) -> dict[str, float]:
    """GFLOPs of one LLaVA answer, by part, for ``batch`` questions.

    Args:
        config: a ``LlavaConfig`` (e.g. :func:`llava15_config`); one image per question.
        visual_tokens: image tokens that reach the language model (default: the unreduced
            count, 576 for LLaVA-1.5). The projector and the language model see this many.
        prompt_tokens: text tokens of the prompt (template and question), without image tokens.
        new_tokens: generated tokens: the prefill makes the first, each further one is a
            decoding step over the KV cache (``generate(max_new_tokens=new_tokens)``).
        vision: count the vision tower. It is counted unreduced, all layers (HF runs the
            last layer although LLaVA reads the second to last); a tower that merges tokens
            costs less (measure it with ``crossget.flops`` on the patched model).

    Returns:
        ``{"vision", "projector", "prefill", "decode", "total"}`` in GFLOPs; ``prefill`` is the
        language model over the prompt with the first token's logits, ``decode`` the further steps.

    Raises:
        ValueError: negative token counts, ``new_tokens`` or ``batch`` below 1.
    """
    from transformers import DynamicCache, LlavaForConditionalGeneration

    visual = _unreduced_visual_tokens(config) if visual_tokens is None else visual_tokens
    if visual < 0 or prompt_tokens < 0 or visual + prompt_tokens < 1:
        raise ValueError(f"token counts must be >= 0 with at least one token: visual={visual}, prompt={prompt_tokens}")
    if new_tokens < 1 or batch < 1:
        raise ValueError(f"new_tokens and batch must be >= 1, got new_tokens={new_tokens}, batch={batch}")
    config = config.__class__.from_dict(config.to_dict())  # a copy: the attention choice below stays local
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")  # every attention matmul explicit and counted
    vc, tc = config.vision_config, config.text_config

    with torch.no_grad():
        flops = {"vision": 0}
        if vision:
            pixels = torch.empty(batch, vc.num_channels, vc.image_size, vc.image_size, device="meta")
            flops["vision"], _ = _count(model.model.vision_tower, pixels, output_hidden_states=True)
        features = torch.empty(batch, visual, vc.hidden_size, device="meta")
        flops["projector"], _ = _count(model.model.multi_modal_projector, features)

        lm, head = model.model.language_model, model.lm_head
        cache = DynamicCache(config=tc)

        def step(n: int) -> None:
            out = lm(inputs_embeds=torch.empty(batch, n, tc.hidden_size, device="meta"), past_key_values=cache,
                     use_cache=True)
            head(out.last_hidden_state[:, -1:])  # generate keeps only the last position's logits

        flops["prefill"], _ = _count(step, visual + prompt_tokens)
        flops["decode"] = sum(_count(step, 1)[0] for _ in range(new_tokens - 1))
    flops["total"] = sum(flops.values())
    return {k: v / 1e9 for k, v in flops.items()}
