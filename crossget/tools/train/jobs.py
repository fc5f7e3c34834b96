"""The training commands as functions of plain arguments (paths, settings): load the data and
the model, patch, train, as ``crossget train-base``, ``train``, ``train-blip`` and
``train-llava`` do."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn
from transformers import AutoConfig, CLIPConfig, CLIPProcessor

from crossget.api import patch
from crossget.families.llava import CROSS_LOSS_WEIGHT
from crossget.tools.data.karpathy import load_karpathy
from crossget.tools.default import ASSETS, load_retrieval
from crossget.tools.eval.llava import load_llava, patch_llava
from crossget.tools.train.blip import BlipSmallConfig, caption_data, train_blip, vqa_data
from crossget.tools.train.clip import BaseModelConfig, PairData, base_processor, pair_data, train_base, train_cross_tokens
from crossget.tools.train.llava import LlavaConversations, train_llava


def train_base_on(
    data: str | os.PathLike, out_dir: str | os.PathLike, *, init_from: str | None = None, **settings: Any,
) -> tuple[nn.Module, dict]:
    """Train the default CLIP architecture (:class:`BaseModelConfig`) on the train split of a
    Karpathy file, from scratch (a word tokenizer over its captions) or going on from
    ``init_from`` (its processor); ``settings`` go to :func:`train_base`. The log also holds
    the previous stage's log when ``init_from`` has one."""
    cfg = BaseModelConfig()
    split = load_karpathy(data, split="train")
    processor = CLIPProcessor.from_pretrained(init_from) if init_from else base_processor(split.captions, cfg.image_size)
    pairs = pair_data(split, processor, cfg.max_text_len)
    model, log = train_base(pairs, processor.tokenizer, processor.image_processor, out_dir, cfg,
                            init_from=init_from, **settings)
    previous = os.path.join(init_from, "training.json") if init_from else None
    if previous and os.path.isfile(previous):
        with open(previous) as f:
            log["previous_stage"] = json.load(f)
    return model, log


def train_cross_tokens_on(
    model: str, data: str, out_dir: str | os.PathLike, *, split: str = "train", limit: int | None = None,
    method: str = "crossget", r: int | None = None, flops: float | None = None, **settings: Any,
) -> tuple[nn.Module, dict]:
    """Patch a CLIP model (``"default"`` or a folder) with ``method`` at ``r`` / ``flops`` in
    its vision tower and train its cross tokens on a Karpathy split (:func:`train_cross_tokens`,
    which takes ``settings``)."""
    job = load_retrieval(model, data, split, limit)
    patch(job.model, r=r, flops=flops, method=method, towers=("vision",))
    t = job.inputs
    pairs = PairData(t["pixel_values"], t["input_ids"], t["attention_mask"], job.split.txt2img, job.split.families)
    return train_cross_tokens(job.model, pairs, out_dir, model_parts=(job.processor,), **settings)


def train_blip_on(
    task: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, images: str | None = None,
    image_pattern: str | None = None, clip: str | None = None, text_layers: int = 3, **settings: Any,
) -> tuple[nn.Module, dict]:
    """Train a small BLIP captioner (``task="caption"``, a shapes Karpathy file) or VQA model
    (``"vqa"``, VQAv2 questions with annotations beside them), its vision tower from ``clip``
    (default: the shipped CLIP); ``settings`` go to :func:`crossget.tools.train.blip.train_blip`."""
    samples = caption_data(data) if task == "caption" else vqa_data(data, image_root=images, image_pattern=image_pattern)
    config = BlipSmallConfig.from_clip(CLIPConfig.from_pretrained(clip or ASSETS), text_layers=text_layers)
    return train_blip(task, samples, out_dir, clip=clip, config=config, **settings)


def train_llava_on(
    model_dir: str | os.PathLike, data: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike, *,
    method: str = "crossget", keep: int | None = None, r: int | None = None, flops: float | None = None,
    dtype: str = "float32", cross_weight: float | None = None, **settings: Any,
) -> tuple[nn.Module, dict]:
    """Train a local LLaVA on LLaVA's conversation JSON with its visual tokens reduced by
    ``method`` at one budget; ``settings`` go to :func:`crossget.tools.train.llava.train_llava`.
    The data is read first, so that its errors come before loading a large model."""
    conversations = LlavaConversations(data, images)
    kind = AutoConfig.from_pretrained(model_dir).model_type if os.path.isfile(os.path.join(model_dir, "config.json")) \
        else None  # no folder: load_llava says so
    if kind not in (None, "llava"):  # the harness loads every multimodal family; training is LLaVA-1.5's
        raise TypeError(f"{model_dir} holds a {kind!r} model; train-llava trains LLaVA-1.5 (model_type 'llava') only")
    model, processor = load_llava(model_dir, dtype=dtype)
    patch_llava(model, processor, method, keep=keep, r=r, flops=flops)
    weight = CROSS_LOSS_WEIGHT if cross_weight is None else cross_weight
    return train_llava(model, processor, conversations, out_dir, cross_weight=weight, **settings)
