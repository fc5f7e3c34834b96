"""Greedy answers of an HF multimodal LLM to a list of questions, with cost and speed.

Any family the harnesses load (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL;
:mod:`.models`), patched or not: a patched model's processor must already emit its reduced
number of image placeholders (``crossget.adapt_processor``). Prompts are the family's
(:mod:`.prompts`: the processor's chat template, else the family's template), images go through
the family's own processor, and every processor output (``image_sizes``, ``image_grid_thw``,
``mm_token_type_ids``, ...) goes to ``generate``. Batches are left-padded so every row's answer
starts at the same position.
"""

from __future__ import annotations

import json
import statistics
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from crossget.api import config, is_patched
from crossget.families.visual_site import LM_METHODS
from crossget.flops import count_flops
from crossget.methods import fastv
from crossget.tools.common import ModelClock
from crossget.tools.eval.llava.data import Sample, load_image
from crossget.tools.eval.llava.metrics import LETTERS
from crossget.tools.eval.llava.prompts import build_prompt, prepare_images

__all__ = ["GenerationResult", "build_prompt", "generate_answers", "image_token_id", "lm_visual_tokens",
           "write_answers"]


@dataclass
class GenerationResult:
    """Answers in question order plus what they cost.

    ``gflops`` / ``gflops_prefill``: per question, measured with ``crossget.flops`` on the first
    ``flops_batches`` batches (the whole greedy generation / one forward over the prompt, vision
    tower included; ``flops_questions`` questions). ``visual_tokens``: per image, the visual
    tokens the language model computes on (FastV / DART: from layer ``pruned_after_layer`` on;
    the prompt holds ``visual_tokens_prompt`` placeholders), averaged over every question.
    ``samples_per_s``: over the timed batches (those not counted; when every batch was
    counted, the first is rerun for timing); ``seconds_per_batch_median`` over the same batches.
    """

    texts: list[str]
    prompts: list[str]
    gflops: float
    gflops_prefill: float
    visual_tokens: float
    prompt_tokens: float
    new_tokens: float
    seconds: float
    samples_per_s: float
    new_tokens_per_s: float
    batch_size: int
    visual_tokens_prompt: float | None = None
    pruned_after_layer: int | None = None
    flops_questions: int | None = None
    seconds_per_batch_median: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("texts", "prompts")}


@contextmanager
def _left_padding(tokenizer):
    """Pad on the left (answers start where the prompts end); a tokenizer without a pad token pads with EOS."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _answer_lengths(new: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """Tokens each row generated, up to and including its first EOS. ``new``: ``[B, T]``."""
    if not eos:
        return torch.full((new.shape[0],), new.shape[1])
    is_eos = torch.isin(new, torch.tensor(list(eos), device=new.device))
    done = is_eos.cumsum(1) > 0
    # tokens before the first EOS, plus the EOS itself where there is one
    return (~done).sum(1).cpu() + is_eos.any(1).cpu().long()


def _eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def image_token_id(model: nn.Module) -> int:
    """The id of the image placeholder token in ``model``'s prompts (``config.image_token_id``,
    or the older ``image_token_index``)."""
    cfg = model.config
    token = getattr(cfg, "image_token_id", None)
    token = getattr(cfg, "image_token_index", None) if token is None else token
    if token is None:
        raise TypeError(f"{type(model).__name__}'s config names no image token (image_token_id)")
    return int(token)


def lm_visual_tokens(model: nn.Module, placeholders: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """Visual tokens per image the language model computes on, from the placeholders per prompt
    (one image each): the placeholders themselves, except for FastV / DART (the prompt keeps the
    stock placeholders; ``keep`` per image stay from layer K on), which also return K."""
    if is_patched(model):
        cfg = config(model)
        if cfg.method in LM_METHODS and cfg.keep is not None:
            layer = cfg.fastv_layer if cfg.fastv_layer is not None else fastv.DEFAULT_LAYER
            return placeholders.clamp(max=cfg.keep), layer
    return placeholders, None


def _as_number(x: float) -> float | int:
    """An int where the value is one (a count every image shares reads as a count)."""
    return int(x) if float(x).is_integer() else float(x)


def _to_model(inputs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every processor output on the model's device; floating tensors (pixels) in its dtype."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def generate_answers(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    images: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    pad_square: bool | None = None,
    progress: bool = True,
    flops_batches: int = 1,
) -> GenerationResult:
    """Greedy answers of ``model`` to ``samples`` (one image each), in order.

    Args:
        model: an HF multimodal LLM with its LM head (``LlavaForConditionalGeneration``,
            ``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``; eval mode;
            any device / dtype).
        processor: its processor (for a token-reducing patch: the adapted one).
        images: folder the samples' ``image`` names are relative to.
        pad_square: pad images to squares in the mean colour first, as LLaVA-1.5 does
            (``image_aspect_ratio="pad"``); ``None`` keeps the processor's setting.
        flops_batches: the first this many batches are counted by ``FlopCounterMode`` (and not
            timed); the counted GFLOPs are averaged over their questions.

    Raises:
        ValueError: ``batch_size`` / ``max_new_tokens`` / ``flops_batches`` below 1, or no samples.
        FileNotFoundError: a missing image (names it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if flops_batches < 1:
        raise ValueError(f"flops_batches must be >= 1, got {flops_batches}")
    if not samples:
        raise ValueError("no questions to answer")
    device, dtype = _device_and_dtype(model)
    eos = _eos_ids(model)
    pad_id = processor.tokenizer.pad_token_id
    image_id = image_token_id(model)

    def prepare(batch: Sequence[Sample]) -> tuple[list[str], dict[str, Any]]:
        shown = [build_prompt(processor, s.question) for s in batch]
        pictures, image_kwargs = prepare_images(processor, [load_image(s, images) for s in batch], pad_square)
        with _left_padding(processor.tokenizer):
            inputs = processor(images=pictures, text=shown, padding=True, return_tensors="pt", **image_kwargs)
        return shown, _to_model(inputs, device, dtype)

    def generate(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The new tokens ``[B, T]`` of a greedy generation."""
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id if pad_id is not None else (eos[0] if eos else None))
        return out[:, inputs["input_ids"].shape[1]:]

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    counted = min(flops_batches, len(batches))
    texts, prompts = [], []
    flops = {"gflops": 0.0, "gflops_prefill": 0.0}
    placeholders, in_lm, prompt_tokens, layer = [], [], [], None
    clock, batch_seconds, timed_samples, timed_tokens, all_tokens = ModelClock(device), [], 0, 0, 0
    with torch.inference_mode():
        for b, batch in enumerate(tqdm(batches, desc="answering", unit="batch", disable=not progress)):
            shown, inputs = prepare(batch)
            n_image = (inputs["input_ids"] == image_id).sum(1).cpu()
            seen, layer = lm_visual_tokens(model, n_image)
            placeholders.append(n_image)
            in_lm.append(seen)
            prompt_tokens.append((inputs["attention_mask"].sum(1).cpu() - n_image).double())
            if b < counted:
                cost = _batch_cost(model, inputs, generate)
                new = cost.pop("new")
                for k in flops:
                    flops[k] += cost[k]
            if b >= counted or (b == 0 and counted == len(batches)):  # a counted batch ran slowed by the counter
                before = clock.seconds
                with clock:
                    new = generate(inputs)
                batch_seconds.append(clock.seconds - before)
                timed_samples += len(batch)
                timed_tokens += int(_answer_lengths(new, eos).sum())
            all_tokens += int(_answer_lengths(new, eos).sum())
            texts.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
            prompts.extend(shown)
    seconds = clock.seconds
    flops_questions = sum(len(batch) for batch in batches[:counted])
    return GenerationResult(
        texts=texts, prompts=prompts,
        gflops=flops["gflops"] / 1e9 / flops_questions, gflops_prefill=flops["gflops_prefill"] / 1e9 / flops_questions,
        visual_tokens=_as_number(torch.cat(in_lm).double().mean().item()),
        prompt_tokens=float(torch.cat(prompt_tokens).mean()), new_tokens=all_tokens / len(samples), seconds=seconds,
        samples_per_s=timed_samples / seconds, new_tokens_per_s=timed_tokens / seconds, batch_size=batch_size,
        visual_tokens_prompt=_as_number(torch.cat(placeholders).double().mean().item()), pruned_after_layer=layer,
        flops_questions=flops_questions, seconds_per_batch_median=statistics.median(batch_seconds),
    )


def _batch_cost(model: nn.Module, inputs: Mapping[str, torch.Tensor], generate) -> dict[str, Any]:
    """FLOPs of one batch (its prompt forward, its whole generation) and the generated tokens
    (``"new"``), so the counted generation is not wasted."""
    from torch.utils.flop_counter import FlopCounterMode

    prefill = count_flops(model, **inputs, logits_to_keep=1)  # what generate's first step computes
    counter = FlopCounterMode(display=False)
    with counter:
        new = generate(inputs)
    return {"new": new, "gflops": counter.get_total_flops(), "gflops_prefill": prefill}


def write_answers(path: str | Path, samples: Sequence[Sample], texts: Sequence[str], model_id: str) -> Path:
    """LLaVA's answers JSONL: ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``
    per question (MMBench adds ``round_id``, ``options``, ``option_char``), in question order."""
    if len(samples) != len(texts):
        raise ValueError(f"{len(texts)} answers for {len(samples)} questions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s, text in zip(samples, texts):
            row: dict[str, Any] = {"question_id": s.question_id}
            if s.round_id is not None:
                row["round_id"] = s.round_id
            row |= {"prompt": s.prompt, "text": text}
            if s.round_id is not None:
                # as LLaVA: the original letter of each shown option (letters stay A, B, ...; options rotate)
                chars = list(LETTERS[: len(s.options or [])])
                row |= {"options": s.options, "option_char": chars[s.round_id :] + chars[: s.round_id]}
            row |= {"answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}
            f.write(json.dumps(row) + "\n")
    return path
