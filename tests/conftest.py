"""Tiny random-weight CLIP models shared by the tests."""

import warnings

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

BOS, EOS = 48, 49


def tiny_clip_config(layers: int = 3, image_size: int = 32, patch: int = 4) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            max_position_embeddings=16, vocab_size=50, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            image_size=image_size, patch_size=patch,
        ),
        projection_dim=16,
    )


def make_clip(impl: str = "sdpa", seed: int = 0, **kw) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**kw)).eval()
    model.set_attn_implementation(impl)
    return model


def save_shapes_clip(root, train: int, test: int, image_size: int, vision_width: int, vision_layers: int,
                     projection_dim: int):
    """A tiny random CLIPModel with a word tokenizer over generated shapes captions, saved to
    ``root/model`` beside its data set ``root/data``; returns ``(root, annotation file)``."""
    from crossget.tools.data.karpathy import load_karpathy
    from crossget.tools.data.shapes import generate_dataset
    from crossget.tools.train.clip import BaseModelConfig, base_processor

    ann = generate_dataset(root / "data", train, 0, test, image_size=image_size, seed=0)
    processor = base_processor(load_karpathy(ann, split="train").captions, image_size)
    cfg = BaseModelConfig(image_size=image_size, vision_width=vision_width, vision_layers=vision_layers,
                          vision_heads=2, text_width=16, text_layers=1, text_heads=2, max_text_len=48,
                          projection_dim=projection_dim)
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = CLIPModel(cfg.clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, ann


def make_texts(lengths, total: int = 16, seed: int = 0):
    """input_ids / attention_mask with BOS, random words, EOS, then padding (EOS ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), EOS)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1 : n - 1] = torch.randint(0, 40, (n - 2,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def pixels():
    """Three 32 px images (the same as ``images``, under the name the family tests use)."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def quiet_warnings():
    """Silence warnings a test expects (sdpa with output_attentions, gradient_checkpointing_enable's deprecation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
