"""Small BLIP captioning / VQA models for the generated shapes data, on the shipped CLIP's vision tower.

- :class:`BlipSmallConfig`: ``BlipForConditionalGeneration`` (``task="caption"``) or
  ``BlipForQuestionAnswering`` (``task="vqa"``) whose vision config is the shipped CLIP's vision tower
  (96 px, patch 8, width 192, 6 layers, 3 heads, quick-GELU) with a small BERT-style text side. The text
  width equals the vision width because BLIP's answer decoder cross-attends to the question encoder's
  output through the same ``encoder_hidden_size`` as the image.
- :func:`clip_vision_to_blip`: the CLIP vision weights in BLIP's layout. The layers are the same
  pre-LN blocks (q/k/v concatenated into BLIP's fused ``qkv``), so they carry over exactly. CLIP
  normalises the embeddings (``pre_layrnorm``) before the first layer and BLIP does not; that layer norm
  is folded into the embeddings: the CLS token is a constant, so its normalised value is exact; for patch
  tokens the centring and the affine part are linear and fold into the patch convolution and the
  position embeddings, and only the division by each token's standard deviation is replaced by its mean
  over sample images. CLIP's ``post_layernorm`` (only on the pooled CLS there) becomes BLIP's, which
  normalises every token. The whole tower is then fine-tuned (at ``vision_lr_scale`` of the text
  side's learning rate), which absorbs the small error of the fold.
- :func:`blip_tokenizer`: the word-level tokenizer of :mod:`crossget.tools.data.tokenizer` over the shipped
  vocabulary plus the training texts. BLIP's special ids map onto it: ``<bos>`` is the decoder's start
  token (BLIP's ``[DEC]``, what ``generate`` writes over the first prompt token) and the question
  encoder's first token (BLIP's ``[ENC]``; encoder and decoder have separate embeddings), ``<eos>`` is
  ``sep_token_id`` (where ``generate`` stops), ``<pad>`` is padding.
- :func:`train_blip`: teacher-forced cross-entropy through :class:`~crossget.tools.train.loop.TrainLoop`
  (``accelerate``), AdamW with warm-up and cosine decay; captions follow BLIP's recipe (the prompt "a picture of " before
  each caption, left out of the loss); VQA answers are ``<bos> answer <eos>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.tools.train.clip import BaseModelConfig
from crossget.tools.train.loop import TrainLoop, save_trained

TASKS = ("caption", "vqa")
PROMPT = "a picture of "  # BLIP's captioning prompt; crossget eval caption's default


@dataclass
class BlipSmallConfig:
    """Sizes of the small BLIP models. The vision part must match the CLIP it starts from (default:
    the shipped one, :class:`~crossget.tools.train.clip.BaseModelConfig`)."""

    image_size: int = BaseModelConfig.image_size
    patch_size: int = BaseModelConfig.patch_size
    vision_width: int = BaseModelConfig.vision_width
    vision_layers: int = BaseModelConfig.vision_layers
    vision_heads: int = BaseModelConfig.vision_heads
    vision_mlp: int = 4 * BaseModelConfig.vision_width  # CLIP's MLP width (BaseModelConfig.clip_config)
    vision_act: str = "quick_gelu"  # CLIP's activation, so the converted MLPs compute the same
    text_layers: int = 3
    text_heads: int = 3
    max_text_len: int = 64

    def blip_config(self, vocab_size: int, bos: int, sep: int, pad: int):
        """A ``BlipConfig``; the text width is the vision width (see the module doc)."""
        from transformers import BlipConfig

        w = self.vision_width
        vision = dict(hidden_size=w, intermediate_size=self.vision_mlp, num_hidden_layers=self.vision_layers,
                      num_attention_heads=self.vision_heads, image_size=self.image_size, patch_size=self.patch_size,
                      hidden_act=self.vision_act, layer_norm_eps=1e-5, initializer_range=0.02)
        text = dict(vocab_size=vocab_size, hidden_size=w, encoder_hidden_size=w, intermediate_size=4 * w,
                    num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                    max_position_embeddings=self.max_text_len, bos_token_id=bos, sep_token_id=sep,
                    eos_token_id=sep, pad_token_id=pad)
        return BlipConfig(vision_config=vision, text_config=text, projection_dim=w, image_text_hidden_size=w)

    @classmethod
    def from_clip(cls, clip_config: Any, **text) -> BlipSmallConfig:
        """The sizes of a ``CLIPConfig``'s (or ``CLIPVisionConfig``'s) vision tower; ``text`` sets the text fields."""
        v = getattr(clip_config, "vision_config", clip_config)
        text.setdefault("text_heads", v.num_attention_heads)  # the text width is the vision width
        return cls(image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
                   vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp=v.intermediate_size,
                   vision_act=v.hidden_act,
                   **text)


def build_blip(task: str, config: BlipSmallConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised ``BlipForConditionalGeneration`` (caption) or ``BlipForQuestionAnswering`` (vqa)."""
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cfg = config.blip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return (BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering)(cfg)


# --------------------------------------------------------------------------- CLIP -> BLIP vision weights
@torch.no_grad()
def clip_vision_to_blip(clip_vision: nn.Module, blip_vision: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """Copy a ``CLIPVisionTransformer``'s (``CLIPModel.vision_model``) weights into a ``BlipVisionModel``.

    ``pixel_values`` ``[B, 3, H, W]`` (a few sample images) give the patch tokens' mean standard
    deviation before CLIP's ``pre_layrnorm``, which the fold divides by (see the module doc).
    Returns ``{"patch_std": ..., "patch_std_spread": ...}`` (mean and relative spread of that deviation).

    Raises:
        ValueError: the towers differ in size.
    """
    ce, be = clip_vision.embeddings, blip_vision.embeddings
    if ce.patch_embedding.weight.shape != be.patch_embedding.weight.shape or len(clip_vision.encoder.layers) != len(
            blip_vision.encoder.layers) or ce.position_embedding.weight.shape[0] != be.position_embedding.shape[1]:
        raise ValueError("the CLIP and BLIP vision towers differ in size")
    ln = clip_vision.pre_layrnorm
    x = ce(pixel_values)[:, 1:]  # patch tokens [B, N, C] before the layer norm
    std = (x.var(-1, unbiased=False) + ln.eps).sqrt()
    s = std.mean()
    c = ce.patch_embedding.weight.shape[0]
    centre = torch.eye(c) - 1.0 / c  # x - mean(x) as a matrix
    # patch token: LN(W p + pos) ~ g * C (W p + pos) / s + b: W' = g C W / s, bias b, pos' = g C pos / s
    w = ce.patch_embedding.weight.reshape(c, -1)
    be.patch_embedding.weight.copy_((ln.weight[:, None] * (centre @ w) / s).reshape_as(be.patch_embedding.weight))
    be.patch_embedding.bias.copy_(ln.bias)
    pos = ce.position_embedding.weight
    be.position_embedding.copy_((ln.weight * (pos @ centre) / s)[None])
    # CLS = class + pos[0], the same for every image: its normalised value is exact
    be.position_embedding[0, 0] = 0
    be.class_embedding.copy_(ln(ce.class_embedding + pos[0]).reshape_as(be.class_embedding))
    for cl, bl in zip(clip_vision.encoder.layers, blip_vision.encoder.layers):
        a = cl.self_attn
        bl.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        bl.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        bl.self_attn.projection.load_state_dict(a.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2", "mlp"):
            getattr(bl, name).load_state_dict(getattr(cl, name).state_dict())
    blip_vision.post_layernorm.load_state_dict(clip_vision.post_layernorm.state_dict())
    return {"patch_std": float(s), "patch_std_spread": float(std.std() / s)}


# --------------------------------------------------------------------------- tokenizer, processor
def blip_tokenizer(texts: Sequence[str], base: str | os.PathLike | None = None, max_length: int = 64):
    """Word-level tokenizer over the vocabulary of ``base`` (default: the shipped model's) and ``texts``."""
    from crossget.tools.data.tokenizer import build_word_tokenizer, shipped_words
    from crossget.tools.default import ASSETS

    return build_word_tokenizer([shipped_words(base or ASSETS), PROMPT, *texts], max_length=max_length)


def blip_processor(tokenizer: Any, image_size: int):
    """``BlipProcessor``: images resized to ``image_size`` and normalised with CLIP's mean and std (the
    shipped CLIP's preprocessing; BLIP's defaults), the word tokenizer."""
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # no torchvision needed

    return BlipProcessor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer)


# --------------------------------------------------------------------------- data
@dataclass
class TextImageData:
    """Training pairs: ``texts[t]`` about image ``image_paths[txt2img[t]]``; ``answers`` for VQA."""

    image_paths: list[Path]
    texts: list[str]
    txt2img: list[int]
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def caption_data(annotation: str | os.PathLike, split: str = "train") -> TextImageData:
    """Every caption of a Karpathy split (``crossget.tools.data.karpathy.load_karpathy``)."""
    from crossget.tools.data.karpathy import load_karpathy

    s = load_karpathy(annotation, split=split, captions_per_image=None)
    return TextImageData(list(s.image_paths), list(s.captions), s.txt2img.tolist())


def vqa_data(questions: str | os.PathLike, annotations: str | os.PathLike | None = None,
             image_root: str | os.PathLike | None = None, image_pattern: str | None = None) -> TextImageData:
    """VQAv2 files (``crossget.tools.eval.vqa.load_vqa``); the target is each question's ``multiple_choice_answer``
    (for the shapes files, also every human answer). ``annotations`` default: ``annotations.json`` beside."""
    from crossget.tools.data.shapes_qa import IMAGE_PATTERN
    from crossget.tools.eval.vqa import load_vqa

    questions = Path(questions)
    annotations = Path(annotations) if annotations else questions.with_name("annotations.json")
    v = load_vqa(questions, annotations, image_root, image_pattern or IMAGE_PATTERN)
    paths = sorted(set(v.image_paths))
    index = {p: i for i, p in enumerate(paths)}
    return TextImageData(paths, list(v.questions), [index[p] for p in v.image_paths],
                         [v.multiple_choice[q] for q in v.question_ids])


def batches(data: TextImageData, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of text indices (a fresh permutation per epoch, last partial batch dropped)."""
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield order[s : s + batch_size]


def make_batch(task: str, data: TextImageData, idx: Sequence[int], processor: Any, max_len: int) -> dict[str, torch.Tensor]:
    """Model inputs with ``labels`` for the texts ``idx``.

    caption: ``input_ids`` = ``<bos> a picture of caption <eos>``, labels the same with the prompt and
    padding set to -100 (BLIP's recipe). vqa: question ``input_ids``/``attention_mask`` and ``labels``
    = ``<bos> answer <eos>`` (BLIP's forward feeds the labels to its decoder as inputs, so padding stays
    ``<pad>``; the loss ignores nothing there, as upstream).
    """
    from crossget.tools.eval.blip_common import open_rgb

    tok = processor.tokenizer
    images = [open_rgb(data.image_paths[data.txt2img[i]]) for i in idx]
    px = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if task == "caption":
        enc = tok([PROMPT + data.texts[i] for i in idx], padding="longest", truncation=True, max_length=max_len,
                  return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, : len(tok(PROMPT.strip())["input_ids"]) - 1] = -100  # <bos> and the prompt words
        return {"pixel_values": px, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}
    assert data.answers is not None
    q = tok([data.texts[i] for i in idx], padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    a = tok([data.answers[i] for i in idx], padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"pixel_values": px, "input_ids": q["input_ids"], "attention_mask": q["attention_mask"],
            "labels": a["input_ids"]}


# --------------------------------------------------------------------------- training
def train_blip(
    task: str,
    data: TextImageData,
    out_dir: str | os.PathLike,
    *,
    clip: str | os.PathLike | None = None,
    config: BlipSmallConfig | None = None,
    steps: int = 550,
    batch_size: int = 32,
    lr: float = 1e-3,
    vision_lr_scale: float = 0.2,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a small BLIP for ``task`` on ``data``, its vision tower from the CLIP at ``clip`` (default:
    the shipped model); save model (safetensors), processor and ``training.json`` to ``out_dir``.

    ``max_minutes`` stops early (the log says where). Returns ``(model, log)``; the log has the settings,
    the fold's statistics, the mean loss per ``log_every`` steps and the wall time.
    """
    from transformers import CLIPModel

    from crossget.tools.default import ASSETS

    clip = Path(clip) if clip is not None else ASSETS
    clip_model = CLIPModel.from_pretrained(clip).eval()
    config = config or BlipSmallConfig.from_clip(clip_model.config)
    texts = data.texts + (data.answers or [])
    tokenizer = blip_tokenizer(texts, clip, config.max_text_len)
    processor = blip_processor(tokenizer, config.image_size)
    torch.manual_seed(seed)
    model = build_blip(task, config, tokenizer)
    g = torch.Generator().manual_seed(seed)
    sample = make_batch(task, data, torch.randperm(len(data), generator=g)[:64].tolist(), processor,
                        config.max_text_len)["pixel_values"]
    fold = clip_vision_to_blip(clip_model.vision_model, model.vision_model, sample)
    del clip_model

    vision = [p for n, p in model.named_parameters() if n.startswith("vision_model.")]
    text = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")]
    opt = torch.optim.AdamW([{"params": vision, "lr": lr * vision_lr_scale}, {"params": text, "lr": lr}],
                            weight_decay=weight_decay)
    loop = TrainLoop(model, opt, steps, warmup=max(1, steps // 20), max_minutes=max_minutes, log_every=log_every,
                     progress=progress, desc=f"train-blip {task}")
    log: dict[str, Any] = {"task": task, "config": asdict(config), "clip": str(clip), "steps": steps,
                           "batch_size": batch_size, "lr": lr, "vision_lr_scale": vision_lr_scale,
                           "weight_decay": weight_decay, "seed": seed, "examples": len(data), "fold": fold,
                           "log_every": log_every, "loss": []}

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        loss = model(**batch).loss
        return loss, {"loss": loss}

    order = batches(data, batch_size, g)
    seconds = loop.fit(lambda _: (make_batch(task, data, idx, processor, config.max_text_len) for idx in order), loss_fn)
    log["loss"] = [entry["loss"] for entry in loop.history]
    if loop.stopped:
        log["stopped_early_after_step"] = loop.step
    log["train_seconds"] = seconds
    log["seconds_per_step"] = seconds / loop.step
    return save_trained(loop.acc, loop.model, out_dir, log, processor), log


__all__ = ["BlipSmallConfig", "TextImageData", "blip_processor", "blip_tokenizer", "build_blip", "caption_data",
           "clip_vision_to_blip", "make_batch", "train_blip", "vqa_data"]
