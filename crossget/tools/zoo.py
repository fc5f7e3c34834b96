"""The model zoo: named architectures with random weights (nothing is downloaded), for
benchmarks, smoke runs and FLOPs counts: real-size CLIP ViT-B/16, BLIP ViT-B/16, BLIP-2
ViT-g, SigLIP-B/16, DINOv2-S/14, LLaVA-1.5-7B/13B, LLaVA-NeXT-7B, LLaVA-OneVision-7B,
Qwen2.5-VL-7B, Qwen3-VL-8B (:data:`MLLM_CONFIGS`), and tiny versions of the encoders and of the four
multimodal LLMs for tests."""

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


# --------------------------------------------------------------------------- multimodal LLMs after LLaVA-1.5
# Sources of the numbers below (transformers 5.23's configuration files and the public model cards):
# - LLaVA-NeXT-7B = llava-hf/llava-v1.6-vicuna-7b-hf: LlavaNextConfig's defaults
#   (transformers/models/llava_next/configuration_llava_next.py: the CLIP ViT-L/14-336 vision defaults
#   1024 / 4096 / 24 layers / 16 heads / 336 px / patch 14 / projection 768, image_token_index 32000,
#   vision_feature_layer -2, "default" strategy, gelu projector, the grid pinpoints
#   [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]); the language model is
#   Vicuna-7B v1.5, a Llama-2-7B (4096 / 11008 / 32 layers / 32 heads, no GQA, rms eps 1e-5, 4096
#   positions) with LLaVA's 32064-word vocabulary (as llava-1.5-7b-hf, llava15_config).
# - LLaVA-OneVision-7B = llava-hf/llava-onevision-qwen2-7b-ov-hf: LlavaOnevisionConfig's defaults
#   (configuration_llava_onevision.py, whose docstring names that checkpoint: SigLIP so400m-patch14-384
#   vision 1152 / 4304 / 26 layers (the checkpoint's 27th is dropped) / 16 heads / 384 px / patch 14,
#   no head; image 151646, video 151647, vision_feature_layer -1, "full" strategy, anyres_max_9 and
#   the 36 pinpoints [384 a, 384 b] for a, b in 1..6); the language model is Qwen2-7B (model card:
#   3584 / 18944 / 28 layers / 28 heads / 4 KV heads, rope theta 1e6, rms eps 1e-6) with the
#   checkpoint's 152128-word vocabulary.
# - Qwen2.5-VL-7B = Qwen/Qwen2.5-VL-7B-Instruct: the vision config of the checkpoint (the module dump
#   of Qwen2_5_VLForConditionalGeneration: 32 blocks of width 1280, MLP 3420 (gated), 16 heads, patch 14,
#   temporal patch 2, merge 2 (merger 5120 -> 3584), window 112, full attention in blocks
#   [7, 15, 23, 31]; Qwen2_5_VLVisionConfig's depth / window / out_hidden_size defaults); the language
#   model Qwen2.5-7B (3584 / 18944 / 28 layers / 28 heads / 4 KV heads: k/v projections 3584 -> 512,
#   vocabulary 152064, rope theta 1e6 with mrope_section [16, 24, 24], rms eps 1e-6, 128000 positions);
#   image 151655, video 151656, vision start / end 151652 / 151653 (Qwen2_5_VLConfig's defaults; its
#   text defaults are the 72B's, so every LM number is given here).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]


def llava_next_7b_config() -> tf.LlavaNextConfig:
    """``LlavaNextConfig`` of LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336, anyres grid
    pinpoints :data:`LLAVA_NEXT_PINPOINTS`, MLP projector, Vicuna-7B (sources above)."""
    vision = tf.CLIPVisionConfig(**vit(1024, 4096, 24, 16, 336, 14), projection_dim=768, hidden_act="quick_gelu")
    lm = LLAVA15_SIZES["7b"]
    text = tf.LlamaConfig(**lm, num_key_value_heads=lm["num_attention_heads"], vocab_size=32064,
                          max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
    return tf.LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_onevision_7b_config() -> tf.LlavaOnevisionConfig:
    """``LlavaOnevisionConfig`` of LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov): SigLIP
    so400m-patch14-384 (26 layers), anyres_max_9 with :data:`ONEVISION_PINPOINTS`, Qwen2-7B (sources above)."""
    vision = tf.SiglipVisionConfig(**vit(1152, 4304, 26, 16, 384, 14), vision_use_head=False, layer_norm_eps=1e-6,
                                   hidden_act="gelu_pytorch_tanh")
    text = tf.Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152128, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )
    return tf.LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=151646, video_token_index=151647,
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu",
    )


def qwen25_vl_7b_config() -> tf.Qwen2_5_VLConfig:
    """``Qwen2_5_VLConfig`` of Qwen2.5-VL-7B(-Instruct): the windowed ViT (depth 32, width 1280, patch 14,
    merge 2, window 112, full attention in blocks 7, 15, 23, 31, out width 3584) and Qwen2.5-7B (sources above)."""
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=3584, hidden_act="silu", tokens_per_second=2)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                bos_token_id=151643, eos_token_id=151645,
                rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]))
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                               vision_start_token_id=151652, vision_end_token_id=151653)


def qwen3_vl_8b_config() -> tf.Qwen3VLConfig:
    """``Qwen3VLConfig`` of Qwen3-VL-8B(-Instruct): the ViT (depth 27, width 1152, MLP 4304, 16 heads,
    patch 16, merge 2, 2304 learned positions interpolated, deep-stack levels from blocks 8, 16, 24,
    out width 4096) and Qwen3-8B (4096 / 12288 / 36 layers / 32 heads / 8 KV heads of 128, q/k norms,
    vocabulary 151936, rope theta 5e6, interleaved M-RoPE sections [24, 20, 20]); token ids as
    Qwen2.5-VL's. The hub cannot be reached here: these are the released model's published sizes
    (its config.json), not read from the file at build time."""
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    text = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                     mrope_interleaved=True))
    return tf.Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def llava_next_tiny() -> tf.LlavaNextConfig:
    """A tiny LLaVA-NeXT (56 px tiles of 4 x 4 patches of 14 px, pinpoints of 1-2 tiles), for tests."""
    vision = tf.CLIPVisionConfig(**vit(32, 64, 2, 2, 56, 14))
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=0)
    return tf.LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=99,
                              image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2)


def llava_onevision_tiny() -> tf.LlavaOnevisionConfig:
    """A tiny LLaVA-OneVision (SigLIP, 56 px tiles, anyres_max_1 so that packing downsamples), for tests."""
    vision = tf.SiglipVisionConfig(**vit(32, 64, 2, 2, 56, 14), vision_use_head=False)
    text = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, max_position_embeddings=512)
    return tf.LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=98, video_token_index=99,
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]], vision_aspect_ratio="anyres_max_1",
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


def qwen25_vl_tiny() -> tf.Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL (patch 4, merge 2, windows of 2 x 2 merged tokens, full attention in block 1), for tests."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[1])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=120, video_token_id=121,
                               vision_start_token_id=122, vision_end_token_id=123)


def qwen3_vl_tiny() -> tf.Qwen3VLConfig:
    """A tiny Qwen3-VL (patch 16 as released, since its processor resizes to at least 256 x 256 pixels;
    merge 2, deep-stack levels from blocks 0 and 1), for tests."""
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                     mrope_interleaved=True))
    return tf.Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=120, video_token_id=121,
                            vision_start_token_id=122, vision_end_token_id=123)


# name -> config factory of the multimodal LLMs crossget.tools.bench_mllm benchmarks
MLLM_CONFIGS: dict[str, Callable[[], Any]] = {
    "llava-next-7b": llava_next_7b_config,
    "llava-onevision-7b": llava_onevision_7b_config,
    "qwen2.5-vl-7b": qwen25_vl_7b_config,
    "qwen3-vl-8b": qwen3_vl_8b_config,
    "llava-next-tiny": llava_next_tiny,  # for tests
    "llava-onevision-tiny": llava_onevision_tiny,
    "qwen2.5-vl-tiny": qwen25_vl_tiny,
    "qwen3-vl-tiny": qwen3_vl_tiny,
}


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
