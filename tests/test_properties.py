"""Property test over random small models of every family (CLIP, BLIP, BLIP-2, LLaVA, ViT / DeiT /
DINOv2; issue 16): layers, widths, heads,
image sizes, text lengths and padding, per-layer schedules, methods, float32 / bfloat16,
eager / sdpa. For each drawn model: outputs finite and of the stock shapes, ``r = 0`` gives
the stock outputs, a sample alone gives what it gives inside a (padded) batch, ``unpatch``
restores the stock forward, ``deepcopy`` and ``state_dict`` round-trip.

The default profile runs a few examples per family (part of ``make test``); the thorough
one many more: ``HYPOTHESIS_PROFILE=thorough make test-properties``.
"""

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    Blip2Config,
    Blip2VisionModel,
    BlipConfig,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

import crossget

settings.register_profile("default", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

IMG, BOS, EOS = 99, 48, 49
VIT_KINDS = [(ViTModel, ViTConfig, {}), (DeiTModel, DeiTConfig, {}), (Dinov2Model, Dinov2Config, {}),
             (Dinov2WithRegistersModel, Dinov2WithRegistersConfig, {"num_register_tokens": 2})]


@st.composite
def towers(draw):
    """Shared sizes: layers, heads x head width, image size (patch 4) and the dtype/attention."""
    return dict(
        layers=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([4, 8])),
        image=draw(st.sampled_from([8, 12, 16, 20])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        impl=draw(st.sampled_from(["eager", "sdpa"])),
        seed=draw(st.integers(0, 1000)),
    )


def vit(t):
    w = t["heads"] * t["head_dim"]
    return dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"], image_size=t["image"], patch_size=4)


def build(family, t):
    torch.manual_seed(t["seed"])
    w = t["heads"] * t["head_dim"]
    if family == "clip":
        text = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=t["layers"],
                    num_attention_heads=t["heads"], max_position_embeddings=16, vocab_size=50, bos_token_id=BOS,
                    eos_token_id=EOS, pad_token_id=EOS)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vit(t), projection_dim=8))
    elif family == "blip":
        text = dict(vocab_size=60, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=t["layers"],
                    num_attention_heads=t["heads"], max_position_embeddings=32, encoder_hidden_size=w,
                    bos_token_id=50, sep_token_id=51, pad_token_id=0, eos_token_id=51, initializer_range=0.2)
        model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vit(t) | {"initializer_range": 0.2},
                                                     image_text_hidden_size=8))
    elif family == "blip2":
        model = Blip2VisionModel(Blip2Config(vision_config=vit(t) | {"initializer_range": 0.2}).vision_config)
    elif family == "vit":  # ViT / DeiT / DINOv2 (with registers): several protected tokens
        model_cls, config_cls, extra = VIT_KINDS[t["seed"] % len(VIT_KINDS)]
        model = model_cls(config_cls(**vit(t), **extra))
    else:
        lm = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, max_position_embeddings=256, pad_token_id=0)
        vision = CLIPVisionConfig(**vit(t) | {"num_hidden_layers": t["layers"] + 1})
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=lm.to_dict(),
                                                          image_token_id=IMG))
    model = model.to(t["dtype"]).eval()
    model.set_attn_implementation(t["impl"])
    return model


def inputs(family, model, t, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pixels = torch.randn(b, 3, t["image"], t["image"], generator=g).to(t["dtype"])
    if family in ("blip2", "vit"):
        return {"pixel_values": pixels}
    if family == "llava":
        n_img = crossget.image_tokens(model)
        rows = [[1] + [IMG] * n_img + torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
        width = max(map(len, rows))
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding, as for generation
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    total = max(lengths)
    first, pad, end = (BOS, EOS, EOS) if family == "clip" else (52, 0, None)
    ids = torch.full((b, total), pad)
    mask = torch.zeros(b, total, dtype=torch.long)
    for i, n in enumerate(lengths):  # right padding
        ids[i, 0] = first
        ids[i, 1:n] = torch.randint(1, 40, (n - 1,), generator=g)
        if end is not None:
            ids[i, n - 1] = end
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def output(family, model, batch):
    with torch.no_grad():
        out = model(**batch)
    if family == "clip":
        return out.logits_per_image
    if family == "blip":
        return out.itm_score
    if family in ("blip2", "vit"):
        return out.last_hidden_state[:, 0]  # CLS
    return out.logits[:, -1]


def row(family, batch, i):
    """Sample ``i`` of ``batch`` alone, its padding cut."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    if "attention_mask" in one:
        keep = one["attention_mask"][0].bool()
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    return one


@st.composite
def patches(draw, family, t):
    methods = {"clip": ["tome", "crossget"], "blip": ["tome", "crossget"], "blip2": ["tome", "crossget"],
               "vit": ["tome", "crossget"],
               "llava": ["tome", "crossget", "fastv", "visionzip"]}[family]
    method = draw(st.sampled_from(methods))
    n_patch = (t["image"] // 4) ** 2
    if method in ("fastv", "visionzip"):
        return {"method": method, "keep": draw(st.integers(2, n_patch))}
    layers = t["layers"] + (family == "llava")
    r = [draw(st.integers(0, 3)) for _ in range(layers)]
    if family == "llava":
        r[-1] = 0  # the feature layer is the second to last: nothing after it is used
    kw = {"method": method, "r": r}
    if family in ("clip", "blip") and draw(st.booleans()):
        kw["towers"] = ("vision", "text")
        kw["r"] = {"vision": r, "text": [draw(st.integers(0, 2)) for _ in range(t["layers"])]}
    return kw


def check_family(family, data):
    t = data.draw(towers(), label="sizes")
    lengths = data.draw(st.lists(st.integers(3, 10), min_size=2, max_size=3), label="text lengths")
    model = build(family, t)
    batch = inputs(family, model, t, lengths, t["seed"])
    stock = output(family, model, batch)
    tol = 1e-4 if t["dtype"] == torch.float32 else 5e-2

    # r = 0 is the stock model (the cross token only observes)
    crossget.patch(model, r=0, method="crossget", towers=("vision", "text") if family in ("clip", "blip") else None)
    assert torch.allclose(output(family, model, batch).float(), stock.float(), atol=tol)

    kw = data.draw(patches(family, t), label="patch")
    crossget.patch(model, **kw)
    batch = inputs(family, model, t, lengths, t["seed"])  # LLaVA: placeholders follow the budget
    out = output(family, model, batch)
    assert out.shape == (stock.shape if family != "llava" else (len(lengths), stock.shape[-1]))
    assert torch.isfinite(out.float()).all()
    if t["dtype"] == torch.float32 and family != "llava":  # alone == in the batch (LLaVA: left padding moves RoPE)
        for i in range(len(lengths)):
            alone = output(family, model, row(family, batch, i))[0]
            mine = out[i, i : i + 1] if family == "clip" else out[i]  # CLIP: image i with caption i
            assert torch.allclose(alone.float(), mine.float(), atol=tol), (i, lengths, kw)

    twin = copy.deepcopy(model)
    assert torch.equal(output(family, twin, batch), out)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin.load_state_dict(state)
    assert torch.equal(output(family, twin, batch), out)

    crossget.unpatch(model)
    batch = inputs(family, model, t, lengths, t["seed"])
    assert torch.equal(output(family, model, batch), stock)


@given(st.data())
def test_clip_properties(data):
    check_family("clip", data)


@given(st.data())
def test_blip_properties(data):
    check_family("blip", data)


@given(st.data())
def test_blip2_properties(data):
    check_family("blip2", data)


@given(st.data())
def test_llava_properties(data):
    check_family("llava", data)


@given(st.data())
def test_vit_properties(data):
    check_family("vit", data)
