"""The model zoo: named architectures with random weights (nothing is downloaded), for
benchmarks, smoke runs and FLOPs counts: real-size CLIP ViT-B/16, BLIP ViT-B/16, BLIP-2
ViT-g, SigLIP-B/16, DINOv2-S/14, LLaVA-1.5-7B/13B, and tiny versions of the encoders for tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from torch import nn

TOWERS = ("vision", "text", "both", "caption")


def vit(hidden: int, intermediate: int, layers: int, heads: int, image: int, patch: int, **extra: Any) -> dict:
    """A ViT tower's config fields."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image, patch_size=patch, **extra)


def text_encoder(hidden: int, intermediate: int, layers: int, heads: int, **extra: Any) -> dict:
    """A BERT/CLIP-style text encoder's config fields."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, **extra)


def opt(vocab: int, hidden: int, layers: int, ffn: int, heads: int, **extra: Any) -> dict:
    """An OPT language model's config fields (BLIP-2's)."""
    return dict(model_type="opt", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                num_attention_heads=heads, word_embed_proj_dim=hidden, **extra)


def clip_vit_b16() -> tf.CLIPConfig:
    return tf.CLIPConfig(vision_config=vit(768, 3072, 12, 12, 224, 16),
                         text_config=text_encoder(512, 2048, 12, 8, max_position_embeddings=77), projection_dim=512)


def clip_tiny() -> tf.CLIPConfig:
    return tf.CLIPConfig(
        vision_config=vit(32, 64, 2, 2, 32, 8),
        text_config=text_encoder(32, 64, 2, 2, max_position_embeddings=16, vocab_size=100, bos_token_id=97,
                                 eos_token_id=98, pad_token_id=98),
        projection_dim=16,
    )


def blip_vit_b16() -> tf.BlipConfig:
    """BLIP captioning base: ViT-B/16 at 384 px (577 tokens), BERT-base decoder."""
    # BLIP's vision default initializer_range is 1e-10 (all keys ~0); use ViT's 0.02
    return tf.BlipConfig(vision_config=vit(768, 3072, 12, 12, 384, 16, initializer_range=0.02),
                         text_config=text_encoder(768, 3072, 12, 12, vocab_size=30524, encoder_hidden_size=768))


def blip_tiny() -> tf.BlipConfig:
    return tf.BlipConfig(
        vision_config=vit(32, 64, 2, 2, 32, 8, initializer_range=0.02),
        text_config=text_encoder(32, 64, 2, 2, vocab_size=100, encoder_hidden_size=32, max_position_embeddings=32,
                                 bos_token_id=97, sep_token_id=98, pad_token_id=0, eos_token_id=98),
    )


def blip2_vit_g() -> tf.Blip2Config:
    """BLIP-2's ViT-g/14 (1408 wide, 39 layers, 224 px: 257 tokens) and BERT-base Q-Former
    (32 queries), with an OPT-125m-sized language model instead of OPT-2.7b/6.7b (CPU)."""
    return tf.Blip2Config(
        vision_config=vit(1408, 6144, 39, 16, 224, 14, qkv_bias=True),
        qformer_config=text_encoder(768, 3072, 12, 12, cross_attention_frequency=2, encoder_hidden_size=1408),
        text_config=opt(50272, 768, 12, 3072, 12, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2,
                        pad_token_id=1),
        num_query_tokens=32,
        image_token_index=50265,
    )


def blip2_tiny() -> tf.Blip2Config:
    return tf.Blip2Config(
        vision_config=vit(32, 64, 2, 2, 32, 8),
        qformer_config=text_encoder(32, 64, 2, 2, vocab_size=100, encoder_hidden_size=32, max_position_embeddings=32),
        text_config=opt(100, 32, 2, 64, 2, max_position_embeddings=64),
        num_query_tokens=4,
        image_token_index=99,
    )


def siglip_b16() -> tf.SiglipConfig:
    """SigLIP-B/16 at 224 px (196 tokens, no CLS, attention-pooling head) and its 64-token text tower."""
    return tf.SiglipConfig(vision_config=vit(768, 3072, 12, 12, 224, 16),
                           text_config=text_encoder(768, 3072, 12, 12, max_position_embeddings=64, vocab_size=32000))


def dinov2_s14() -> tf.Dinov2Config:
    """DINOv2-S/14 at 224 px (257 tokens; its checkpoints' configs say 518 px)."""
    return tf.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=224,
                           layer_norm_eps=1e-6)


# Llama-2 shapes of LLaVA-1.5's language models (vocabulary: Llama's 32000 + <image> + <pad>, padded to 32064)
LLAVA15_SIZES: dict[str, dict[str, int]] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}


def llava15_config(size: str = "7b") -> tf.LlavaConfig:
    """``LlavaConfig`` of LLaVA-1.5-7B or -13B (CLIP ViT-L/14-336, MLP projector, Llama-2), as in
    llava-hf's ``llava-1.5-{7b,13b}-hf`` configs.

    Raises:
        ValueError: unknown size.
    """
    if size not in LLAVA15_SIZES:
        raise ValueError(f"size must be one of {tuple(LLAVA15_SIZES)}, got {size!r}")
    vision = tf.CLIPVisionConfig(**vit(1024, 4096, 24, 16, 336, 14), projection_dim=768, hidden_act="quick_gelu")
    lm = LLAVA15_SIZES[size]
    text = tf.LlamaConfig(
        **lm, num_key_value_heads=lm["num_attention_heads"], vocab_size=32064, max_position_embeddings=4096,
        rms_norm_eps=1e-5, pad_token_id=32001,
    )
    return tf.LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


# name -> config factory (CLIPConfig, BlipConfig or Blip2Config) of the encoders load_model builds
ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "clip-vit-b16": clip_vit_b16,
    "blip-vit-b16": blip_vit_b16,
    "blip2-vit-g": blip2_vit_g,
    "siglip-b16": siglip_b16,
    "dinov2-s14": dinov2_s14,
    "clip-tiny": clip_tiny,  # for tests and smoke runs
    "blip-tiny": blip_tiny,
    "blip2-tiny": blip2_tiny,
}


def load_model(spec: str, tower: str = "vision", seed: int = 0) -> nn.Module:
    """A model in eval mode: a named architecture with random weights, or a local directory.

    Named architectures give the smallest model that runs ``tower``: ``CLIPVisionModel``
    (vision), ``CLIPTextModel`` (text) or ``CLIPModel`` (both); for BLIP / BLIP-2 names,
    ``Blip(2)VisionModel`` (vision) or ``Blip(2)ForConditionalGeneration`` (caption). A
    directory is loaded with ``transformers.AutoModel.from_pretrained``
    (``AutoModelForImageTextToText`` for caption).

    Raises:
        ValueError: unknown tower, or ``spec`` is neither a known name nor a directory.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if spec in ARCHITECTURES:
        cfg = ARCHITECTURES[spec]()
        torch.manual_seed(seed)
        model = _build(spec, cfg, tower)
    elif os.path.isdir(spec):
        model = (tf.AutoModelForImageTextToText if tower == "caption" else tf.AutoModel).from_pretrained(spec)
    else:
        names = ", ".join(ARCHITECTURES)
        raise ValueError(f"model {spec!r} is neither a named architecture ({names}) nor a local directory")
    return model.eval()


def _build(spec: str, cfg: Any, tower: str) -> nn.Module:
    if isinstance(cfg, tf.Dinov2Config):
        if tower != "vision":
            raise ValueError(f"{spec} is a vision encoder: benchmark tower 'vision', got {tower!r}")
        return tf.Dinov2Model(cfg)
    if isinstance(cfg, tf.SiglipConfig):
        if tower == "caption":
            raise ValueError(f"tower 'caption' needs a captioning architecture (blip-*, blip2-*), got {spec!r}")
        return {"vision": lambda: tf.SiglipVisionModel(cfg.vision_config), "text": lambda: tf.SiglipTextModel(cfg.text_config),
                "both": lambda: tf.SiglipModel(cfg)}[tower]()
    if isinstance(cfg, (tf.BlipConfig, tf.Blip2Config)):
        blip = isinstance(cfg, tf.BlipConfig)
        if tower == "vision":
            return (tf.BlipVisionModel if blip else tf.Blip2VisionModel)(cfg.vision_config)
        if tower == "caption":
            return (tf.BlipForConditionalGeneration if blip else tf.Blip2ForConditionalGeneration)(cfg)
        raise ValueError(f"{spec} benchmarks tower 'vision' or 'caption', got {tower!r}")
    if tower == "caption":
        raise ValueError(f"tower 'caption' needs a captioning architecture (blip-*, blip2-*), got {spec!r}")
    if tower == "vision":
        return tf.CLIPVisionModel(cfg.vision_config)
    if tower == "text":
        return tf.CLIPTextModel(cfg.text_config)
    return tf.CLIPModel(cfg)
