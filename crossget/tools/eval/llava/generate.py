"""Greedy answers of an HF LLaVA model to a list of questions, with cost and speed.

Model-agnostic over ``LlavaForConditionalGeneration`` + ``LlavaProcessor``, patched or not: a
patched model's processor must already emit its reduced number of image placeholders
(``crossget.adapt_processor``). Prompts follow LLaVA-1.5's conversation template,
``USER: <image>\\n{question} ASSISTANT:``, through the processor's chat template when it has one.
Batches are left-padded so every row's answer starts at the same position.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from crossget.flops import count_flops
from crossget.tools.common import ModelClock
from crossget.tools.eval.llava.data import Sample, load_image
from crossget.tools.eval.llava.metrics import LETTERS

__all__ = ["GenerationResult", "build_prompt", "generate_answers", "write_answers"]


def build_prompt(processor: Any, question: str) -> str:
    """One user turn with the image, then the assistant's cue (LLaVA-1.5: ``USER: <image>\\n{q} ASSISTANT:``).

    Uses ``processor.apply_chat_template`` when the processor has a chat template (llava-hf
    checkpoints ship LLaVA-1.5's), else writes that string with the processor's image token.
    """
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return f"USER: {getattr(processor, 'image_token', '<image>')}\n{question} ASSISTANT:"


@dataclass
class GenerationResult:
    """Answers in question order plus what they cost.

    ``gflops`` / ``gflops_prefill``: per question, measured with ``crossget.flops`` on the first
    batch (the whole greedy generation / one forward over the prompt, vision tower included).
    ``samples_per_s``: over the timed batches (all but the counted first one; with a single
    batch it is rerun for timing).
    """

    texts: list[str]
    prompts: list[str]
    gflops: float
    gflops_prefill: float
    visual_tokens: int
    prompt_tokens: float
    new_tokens: float
    seconds: float
    samples_per_s: float
    new_tokens_per_s: float
    batch_size: int

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


def generate_answers(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    images: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    pad_square: bool | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Greedy answers of ``model`` to ``samples`` (one image each), in order.

    Args:
        model: an HF ``LlavaForConditionalGeneration`` (eval mode; any device / dtype).
        processor: its ``LlavaProcessor`` (for a token-reducing patch: the adapted one).
        images: folder the samples' ``image`` names are relative to.
        pad_square: pad images to squares in the mean colour first, as LLaVA-1.5 does
            (``image_aspect_ratio="pad"``); ``None`` keeps the processor's setting.

    Raises:
        ValueError: ``batch_size`` / ``max_new_tokens`` below 1, or no samples.
        FileNotFoundError: a missing image (names it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not samples:
        raise ValueError("no questions to answer")
    device, dtype = _device_and_dtype(model)
    eos = _eos_ids(model)
    pad_id = processor.tokenizer.pad_token_id
    image_kwargs = {} if pad_square is None else {"do_pad": pad_square}

    def prepare(batch: Sequence[Sample]) -> tuple[list[str], dict[str, torch.Tensor]]:
        shown = [build_prompt(processor, s.question) for s in batch]
        with _left_padding(processor.tokenizer):
            inputs = processor(images=[load_image(s, images) for s in batch], text=shown, padding=True,
                               return_tensors="pt", **image_kwargs)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return shown, inputs

    def generate(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The new tokens ``[B, T]`` of a greedy generation."""
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id if pad_id is not None else (eos[0] if eos else None))
        return out[:, inputs["input_ids"].shape[1]:]

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    texts, prompts, cost = [], [], {}
    clock, timed_samples, timed_tokens, all_tokens = ModelClock(device), 0, 0, 0
    with torch.inference_mode():
        for b, batch in enumerate(tqdm(batches, desc="answering", unit="batch", disable=not progress)):
            shown, inputs = prepare(batch)
            if b == 0:
                cost = _batch_cost(model, inputs, generate, model.config.image_token_id)
                new = cost.pop("new")
            if b > 0 or len(batches) == 1:  # the counted batch ran slowed by the counter: time a lone batch again
                with clock:
                    new = generate(inputs)
                timed_samples += len(batch)
                timed_tokens += int(_answer_lengths(new, eos).sum())
            all_tokens += int(_answer_lengths(new, eos).sum())
            texts.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
            prompts.extend(shown)
    seconds = clock.seconds
    return GenerationResult(
        texts=texts, prompts=prompts, **cost, new_tokens=all_tokens / len(samples), seconds=seconds,
        samples_per_s=timed_samples / seconds, new_tokens_per_s=timed_tokens / seconds, batch_size=batch_size,
    )


def _batch_cost(model: nn.Module, inputs: Mapping[str, torch.Tensor], generate, image_token_id: int) -> dict[str, Any]:
    """Per-question GFLOPs of one batch (its prompt forward, its whole generation), its token
    counts, and the generated tokens (``"new"``), so the counted generation is not wasted."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = inputs["input_ids"].shape[0]
    prefill = count_flops(model, **inputs, logits_to_keep=1)  # what generate's first step computes
    counter = FlopCounterMode(display=False)
    with counter:
        new = generate(inputs)
    n_image = (inputs["input_ids"] == image_token_id).sum(1)
    return {
        "new": new,
        "gflops": counter.get_total_flops() / 1e9 / batch,
        "gflops_prefill": prefill / 1e9 / batch,
        "visual_tokens": int(n_image[0]),
        "prompt_tokens": float((inputs["attention_mask"].sum(1) - n_image).float().mean()),
    }


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
