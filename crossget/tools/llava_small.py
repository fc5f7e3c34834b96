"""A tiny LLaVA-1.5 for CPU: the shipped CLIP's vision tower, a 2-layer MLP projector and a small
random Llama, with a word-level LLaVA processor, to train on the shapes question-answer files.

    crossget init-llava --out runs/llava-small --qa data/shapes-qa
    crossget train-llava --model runs/llava-small --trainable projector+lm --method none ...

- :func:`llava_tokenizer`: the shipped word-level vocabulary (:mod:`crossget.tools.data.tokenizer`)
  plus what LLaVA-1.5 prompts need (``<s>``, ``</s>``, ``<image>``, ``USER``, ``ASSISTANT``,
  ``:``, the short-answer instruction) and every word of the QA texts; BOS only (Llama's way:
  an EOS after the prompt would end the answer before it starts).
- :func:`build_llava_small`: ``LlavaForConditionalGeneration`` in LLaVA-1.5's layout
  (``vision_feature_layer=-2``, strategy ``"default"``, GELU MLP projector) whose vision tower
  holds the shipped CLIP vision weights exactly, and its ``LlavaProcessor``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from crossget.tools.data.tokenizer import build_word_tokenizer, shipped_words
from crossget.tools.default import ASSETS
from crossget.tools.eval.llava.data import SHORT_ANSWER

__all__ = ["LLAVA_SPECIALS", "build_llava_small", "by_image", "write_by_image", "llava_processor", "llava_tokenizer", "qa_texts",
           "save_llava_small"]

IMAGE = "<image>"
LLAVA_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE)  # ids 0-4
# LLaVA-1.5's prompt and training text (crossget.tools.eval.llava.build_prompt, train_llava.conversation_text)
PROMPT_WORDS = f"USER: ASSISTANT: {SHORT_ANSWER}"


def qa_texts(qa: str | os.PathLike) -> list[str]:
    """Questions and answers of LLaVA conversation JSON files: ``qa`` is one file or a folder
    whose ``*/llava_conversations.json`` are read (``crossget data-qa``'s output).

    Raises:
        FileNotFoundError: no such file, or a folder without conversation files.
    """
    path = Path(qa)
    files = sorted(path.glob("*/llava_conversations.json")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no LLaVA conversation files at {path} (write them with crossget data-qa)")
    return [m["value"].replace(IMAGE, " ") for f in files for r in json.loads(f.read_text())
            for m in r["conversations"]]


def by_image(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """LLaVA conversation records regrouped into one multi-turn conversation per image, as LLaVA-1.5
    trains on VQA data: the image is encoded once for all its questions (several times more answers
    per second of CPU). Turn order is shuffled per image with ``seed``; only the first question
    keeps ``<image>`` (the evaluations' single-turn prompt is the first turn's)."""
    import random

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["image"], []).append(r)
    out = []
    for image, rs in groups.items():
        rs = rs[:]
        random.Random(f"{seed}:{image}").shuffle(rs)
        turns = [dict(m) for r in rs for m in r["conversations"]]
        for m in turns:
            m["value"] = m["value"].replace(f"{IMAGE}\n", "").replace(IMAGE, "").strip()
        turns[0]["value"] = f"{IMAGE}\n{turns[0]['value']}"
        out.append({"id": image, "image": image, "conversations": turns})
    return out


def llava_tokenizer(texts: Iterable[str], max_length: int = 512, base: str | os.PathLike = ASSETS):
    """A fast word-level tokenizer (lower-case, punctuation split, offsets for the training
    collator) over the words of the CLIP at ``base`` (default: shipped), the LLaVA prompt words
    and ``texts``.

    Ids: :data:`LLAVA_SPECIALS` first, then the words sorted. Encodings start with ``<s>`` and
    have no EOS (the answer's ``</s>`` is text); ``<image>`` and ``</s>`` are special tokens,
    matched before the split and dropped from decoded answers.
    """
    return build_word_tokenizer([shipped_words(base), PROMPT_WORDS, *texts], max_length, specials=LLAVA_SPECIALS,
                                template="<s> $A", extra_special_tokens={"image_token": IMAGE})


def llava_processor(tokenizer: Any, assets: str | os.PathLike = ASSETS):
    """``LlavaProcessor``: the shipped CLIP's image preprocessing (96 px, CLIP mean/std), ``tokenizer``,
    placeholders per image as LLaVA-1.5 counts them (patches + CLS - CLS for strategy "default")."""
    from transformers import AutoConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # no torchvision needed

    patch = AutoConfig.from_pretrained(assets).vision_config.patch_size
    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(assets), tokenizer=tokenizer,
                          patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_llava_small(
    texts: Sequence[str],
    lm_width: int = 256,
    lm_layers: int = 4,
    lm_heads: int = 4,
    lm_intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    assets: str | os.PathLike = ASSETS,
) -> tuple[nn.Module, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: the CLIP vision tower of ``assets``
    (weights copied exactly), LLaVA-1.5's projector and feature selection, and a random Llama
    of ``lm_layers`` x ``lm_width`` (MLP ``lm_intermediate``, default 4 x width) whose
    vocabulary is :func:`llava_tokenizer` over ``texts``. Eval mode, float32.

    Raises:
        ValueError: ``lm_width`` not divisible by ``lm_heads``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if lm_width % lm_heads:
        raise ValueError(f"lm_width {lm_width} is not divisible by lm_heads {lm_heads}")
    processor = llava_processor(llava_tokenizer(texts, max_positions, assets), assets)
    tok = processor.tokenizer
    vision = AutoConfig.from_pretrained(assets).vision_config
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = LlamaConfig(hidden_size=lm_width, intermediate_size=lm_intermediate or 4 * lm_width,
                       num_hidden_layers=lm_layers, num_attention_heads=lm_heads, num_key_value_heads=lm_heads,
                       vocab_size=len(tok), max_position_embeddings=max_positions, **ids)
    patches = (vision.image_size // vision.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids(IMAGE), image_seq_length=patches,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    weights = {k.removeprefix("vision_model."): v for k, v in load_file(Path(assets) / "model.safetensors").items()
               if k.startswith("vision_model.")}
    model.model.vision_tower.load_state_dict(weights, strict=True)  # transformers 5: no .vision_model level
    for k, v in ids.items():  # generate() stops at </s>, pads with <pad>
        setattr(model.generation_config, k, v)
    return model.eval(), processor


def save_llava_small(out: str | os.PathLike, qa: str | os.PathLike, command: str | None = None, **settings) -> Path:
    """Build (:func:`build_llava_small` over the words of :func:`qa_texts`) and save the model,
    its processor and ``init_llava.json`` (command, settings, sizes) to ``out``; returns ``out``."""
    model, processor = build_llava_small(qa_texts(qa), **settings)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    lm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.vision_tower."))
    record = {"command": command, "qa": str(qa), "settings": settings, "vocab_size": len(processor.tokenizer),
              "vision_tower": "shipped CLIP (crossget/assets/default)" if "assets" not in settings else str(settings["assets"]),
              "params_projector_lm": lm, "params_total": sum(p.numel() for p in model.parameters())}
    (out / "init_llava.json").write_text(json.dumps(record, indent=2, default=str))
    return out


def write_by_image(conversations: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> tuple[Path, int, int]:
    """``out/train_by_image.json``: the LLaVA conversations file regrouped by :func:`by_image`;
    returns ``(path, images, questions)``."""
    records = by_image(json.loads(Path(conversations).read_text()), seed=seed)
    path = Path(out) / "train_by_image.json"
    path.write_text(json.dumps(records))
    return path, len(records), sum(len(r["conversations"]) // 2 for r in records)
