"""crossget on LLaVA-OneVision (SigLIP tower without CLS, anyres-max tiles, packed features with
newlines, multi-image prompts): the projector-site reduction (tome, crossget) and FastV, on a
tiny random model built from its config.

Exactness of the stock path, generation with and without a KV cache, the visual tokens the
language model receives, batches of differently sized images and multi-image prompts, videos
(never reduced), placeholders and the processor, budgets and errors, unpatch / copies."""

import copy
import functools

import numpy as np
import pytest
import torch
from mllm_common import (
    BAD_BUDGETS,
    MLLM,
    anyres_pixels,
    check_bad_budget,
    check_batch_matches_single,
    check_cache_agreement,
    check_copies,
    check_encodes_once,
    check_fastv_prunes,
    check_fastv_refuses,
    check_flops_target,
    check_lm_receives_reduced,
    check_stock_path,
    check_unpatch_restores,
    generated,
    lm_visual_tokens,
    torch_saved,
    word_tokenizer,
)
from mllm_common import make_prompts as prompts_of
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision import modeling_llava_onevision as hf

import crossget
from crossget.families import llava_onevision as ov
from crossget.families.visual_site import reduce_visual_tokens

IMG, VID = 99, 98  # image and video token ids
TILE, PATCH = 32, 8  # 4 x 4 patches per tile, no CLS
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [128, 128]]
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG, VID])
# stock tokens (base tile 16, unpadded grid, newlines): WIDE, TALL and BIG take the 128 x 128 grid
# (17 tiles; BIG is downsampled by anyres_max_9 from 16 x 16 to 12 x 12), MID a 2 x 3 grid (7 tiles)
WIDE, TALL, BIG, MID = (40, 100), (100, 40), (128, 128), (64, 96)
STOCK = {WIDE: 118, TALL: 128, BIG: 172, MID: 120}
MULTI = 17  # an image of a multi-image prompt: the base tile's 16 patches and a newline
KEEP = 12


def make_ov(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMG,
                               video_token_index=VID, image_grid_pinpoints=PINPOINTS)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def pixels(sizes, seed=2, multi=False):
    """Random tiles ``[images, max tiles, 3, 32, 32]`` (unused tiles padded, as the processor does;
    ``multi``: one prompt's images, a base tile each)."""
    return anyres_pixels(sizes, PINPOINTS, TILE, seed, multi)


make_prompts = functools.partial(prompts_of, token=IMG)  # BOS, counts[i] placeholders (token=), then random text


def inputs(model, sizes=(WIDE, TALL), lengths=(5, 3)):
    ids, mask = make_prompts([crossget.image_tokens(model, s) for s in sizes], lengths)
    px, image_sizes = pixels(sizes)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=image_sizes)


def multi_inputs(model, sizes=(WIDE, BIG), length=4):
    """One prompt holding every image of ``sizes`` (a base tile each)."""
    ids, mask = make_prompts([len(sizes) * crossget.image_tokens(model, ov.MULTI_IMAGE)], [length])
    px, image_sizes = pixels(sizes, multi=True)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=image_sizes,
                batch_num_images=torch.tensor([len(sizes)]))


def run_generate(model, x, **kw):
    return generated(model, x, GEN, **kw)


def stock_features(model, sizes, multi=False):
    """The unpatched model's packed features per image (``[L_i, D]``)."""
    px, image_sizes = pixels(sizes, multi=multi)
    extra = dict(batch_num_images=torch.tensor([len(sizes)])) if multi else {}
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=px, image_sizes=image_sizes, **extra).pooler_output)


OV = MLLM(make_ov, inputs, stock_features, GEN, IMG, ov.LlavaOnevisionModel, hf.LlavaOnevisionModel, (WIDE, TALL))
generate, logits = OV.generate, OV.logits


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    check_stock_path(OV, impl)


@pytest.mark.parametrize("size", [(32, 32), WIDE, TALL, BIG, MID, (300, 300), (20, 130), (130, 20), (33, 95)])
def test_stock_count_is_what_the_model_and_the_processor_give(size):
    model = make_ov()
    got = ov.stock_image_tokens(model, size)
    assert STOCK.get(size, got) == got
    assert [f.shape[0] for f in stock_features(model, [size])] == [got]
    assert crossget.image_tokens(model, size) == got
    processor = crossget.adapt_processor(tiny_processor(), model)
    assert processor._get_number_of_features(*size, TILE, TILE) == got  # "full": nothing dropped
    # an image of a multi-image prompt gives its base tile whatever its size
    assert [f.shape[0] for f in stock_features(model, [size, WIDE], multi=True)] == [MULTI, MULTI]
    assert crossget.image_tokens(model, ov.MULTI_IMAGE) == MULTI


# --------------------------------------------------------------------------- generation
BUDGETS = {"tome": dict(keep=KEEP), "crossget": dict(keep=KEEP), "fastv": dict(keep=KEEP, fastv_layer=1)}
SAME_COUNT = (WIDE, WIDE)  # FastV: one count of visual tokens for the whole batch


@pytest.mark.parametrize("method", list(BUDGETS))
def test_reduced_generation_same_with_and_without_cache(method):
    check_cache_agreement(OV, method, BUDGETS[method], SAME_COUNT if method == "fastv" else (WIDE, TALL))


def test_decoding_never_reencodes_images():
    check_encodes_once(OV, lambda model: model.model.vision_tower, KEEP)


# --------------------------------------------------------------------------- what reaches the LM
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    check_lm_receives_reduced(OV, method, KEEP, (WIDE, BIG), [118, 172])


def test_fastv_prunes_to_keep_per_image_inside_the_lm():
    model = check_fastv_prunes(OV, BUDGETS["fastv"], SAME_COUNT, 118)  # layers 0 and 1
    assert crossget.tokens_per_layer(model, text_len=6, image_size=WIDE) == {
        "vision": [16, 16], "language": [124, KEEP + 6]}


# --------------------------------------------------------------------------- batches and multi-image prompts
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_sizes_gives_keep_each_and_matches_single_prompts(method):
    tiles = lambda size: hf.image_size_to_num_patches(list(size), PINPOINTS, TILE)
    check_batch_matches_single(OV, method, KEEP, (MID, BIG), tiles, 64)  # 7 and 17 tiles


@pytest.mark.parametrize("method", ["tome", "crossget", "fastv"])
def test_multi_image_prompt(method):
    model = make_ov()
    stock = stock_features(model, (WIDE, BIG), multi=True)
    crossget.patch(model, method=method, **BUDGETS[method])
    x = multi_inputs(model)
    counts, embeds = lm_visual_tokens(model, x, IMG)
    if method == "fastv":
        assert counts == [2 * MULTI] and lm_visual_tokens(model, x, IMG, 1)[0] == [2 * KEEP]
    else:
        assert counts == [2 * KEEP]
        want = torch.cat([reduce_visual_tokens(f, KEEP, method)[0] for f in stock])
        assert torch.allclose(embeds[0][x["input_ids"][0] == IMG], want, atol=1e-6)
    ids = run_generate(model, x)
    assert torch.equal(ids, run_generate(model, x, use_cache=False))


@pytest.mark.parametrize("method, budget", [("tome", dict(keep=KEEP)), ("crossget", dict(keep=KEEP)),
                                            ("tome", dict(keep=6, site="tower")),
                                            ("crossget", dict(keep=6, site="tower"))])  # tower: 7 tiles x 6, 1 x 6
def test_batch_mixing_a_single_and_a_multi_image_prompt(method, budget):
    model = make_ov()
    crossget.patch(model, method=method, **budget)
    one, two = inputs(model, (MID,), lengths=(6,)), multi_inputs(model, (WIDE, TALL), length=3)
    counts = [crossget.image_tokens(model, MID), 2 * crossget.image_tokens(model, ov.MULTI_IMAGE)]
    assert counts == ([42, 12] if "site" in budget else [KEEP, 2 * KEEP])
    ids, mask = make_prompts(counts, (6, 3))
    tiles = one["pixel_values"].shape[1]
    px = torch.zeros(3, tiles, 3, TILE, TILE)
    px[0], px[1:, :1] = one["pixel_values"][0], two["pixel_values"]
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=torch.tensor([MID, WIDE, TALL]),
             batch_num_images=torch.tensor([1, 2]))
    assert lm_visual_tokens(model, x, IMG)[0] == counts
    both = run_generate(model, x)
    alone = [dict(x, input_ids=ids[:1], attention_mask=mask[:1], pixel_values=px[:1], image_sizes=x["image_sizes"][:1],
                  batch_num_images=torch.tensor([1])),
             dict(x, input_ids=ids[1:], attention_mask=mask[1:], pixel_values=px[1:, :1],
                  image_sizes=x["image_sizes"][1:], batch_num_images=torch.tensor([2]))]
    for i in range(2):
        assert torch.equal(run_generate(model, alone[i])[0], both[i])


def test_fastv_refuses_a_batch_with_different_counts():
    check_fastv_refuses(OV, BUDGETS["fastv"], (WIDE, BIG), r"LLaVA-OneVision.*\[118, 172\].*same size.*tome")


# --------------------------------------------------------------------------- videos
def video_inputs(frames=2, seed=3):
    """One prompt with a video of ``frames`` frames: 2 x 2 pooled patches each, one newline."""
    ids, mask = make_prompts([frames * 4 + 1], [5], token=VID)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.randn(1, frames, 3, TILE, TILE, generator=g))


@pytest.mark.parametrize("method", list(BUDGETS))
def test_videos_run_unreduced(method):
    model = make_ov()
    x = video_inputs()
    with torch.no_grad():
        ref = model(**x).logits
    ref_ids = run_generate(model, x)
    crossget.patch(model, method=method, **BUDGETS[method])
    assert lm_visual_tokens(model, x, VID)[0] == [9]
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)
    assert torch.equal(run_generate(model, x), ref_ids)


# --------------------------------------------------------------------------- placeholders and processor
class ImageProcessorOnly(LlavaOnevisionProcessor):
    """The OneVision processor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)


def tiny_processor():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "what": 6, "is": 7,
             "<video>": VID, "<image>": IMG}
    tokenizer = word_tokenizer(vocab, ["<image>", "<video>"])
    images = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return ImageProcessorOnly(image_processor=images, tokenizer=tokenizer)


def picture(size, seed):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")


def test_adapt_processor_writes_the_count_the_model_needs():
    model, processor = make_ov(), tiny_processor()
    single = dict(images=[picture(WIDE, 0), picture(BIG, 1)],
                  text=["<s> USER: <image> what is ASSISTANT:", "<s> USER: <image> is ASSISTANT:"])
    multi = dict(images=[[picture(WIDE, 0), picture(TALL, 2)]], text=["<s> USER: <image> <image> is ASSISTANT:"])
    for budget, want, want_multi in ((dict(method="crossget", keep=KEEP), [KEEP] * 2, [2 * KEEP]),
                                     (dict(method="tome", keep=9), [9] * 2, [18]),
                                     (dict(method="none"), [118, 172], [2 * MULTI])):
        crossget.patch(model, **budget)
        crossget.adapt_processor(processor, model)
        for prompts, counts in ((single, want), (multi, want_multi)):
            x = processor(**prompts, padding=True, return_tensors="pt")
            assert (x["input_ids"] == IMG).sum(-1).tolist() == counts
            with torch.no_grad():
                model.generate(**x, **GEN)
    crossget.unpatch(model)
    x = crossget.adapt_processor(processor, model)(**single, padding=True, return_tensors="pt")
    assert (x["input_ids"] == IMG).sum(-1).tolist() == [118, 172]
    assert "replace_image_token" not in vars(processor)
    with pytest.raises(TypeError, match="LlavaOnevisionProcessor"):
        crossget.adapt_processor(object(), model)
    processor.num_image_tokens = 9
    with pytest.raises(ValueError, match="num_image_tokens"):
        crossget.adapt_processor(processor, model)


def test_mismatched_prompt_says_what_to_call():
    model = make_ov()
    crossget.patch(model, method="crossget", keep=KEEP)
    ids, mask = make_prompts([118, 128], (5, 3))  # the stock counts
    px, sizes = pixels((WIDE, TALL))
    with pytest.raises(ValueError, match=r"adapt_processor.*image_tokens"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)
    crossget.unpatch(model)
    with pytest.raises(ValueError, match="image_size.*MULTI_IMAGE"):
        crossget.image_tokens(model)  # the stock count depends on the image's size
    with pytest.raises(ValueError, match="image_size"):
        crossget.image_tokens(model, "single")


# --------------------------------------------------------------------------- budgets and errors
@pytest.mark.parametrize(
    "kwargs, match",
    BAD_BUDGETS + [
        (dict(keep="12"), "int"),
        (dict(keep=173), "more than the 172"),  # the reference size, 128 x 128, gives 172
        (dict(keep=8, image_size=32), None),  # 36 tokens: fine
        (dict(keep=37, image_size=32), "more than the 36"),
        (dict(method="fastv", keep=8), "fastv_layer"),  # K=2 needs a third LM layer
        (dict(r=4), "r= is for site='tower'"),
        (dict(method="visionzip", keep=8, site="tower"), "has no CLS token"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    check_bad_budget(OV, kwargs, match)


def test_keep_above_an_images_count_raises_at_the_image():
    model = make_ov()
    crossget.patch(model, method="tome", keep=30)  # a multi-image prompt's images give 17 each
    assert crossget.image_tokens(model, WIDE) == 30
    with pytest.raises(ValueError, match="keep=30 is more than the 17 tokens of an image of a multi-image prompt"):
        crossget.image_tokens(model, ov.MULTI_IMAGE)
    ids, mask = make_prompts([60], [3])
    px, sizes = pixels((WIDE, BIG), multi=True)
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes, batch_num_images=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"keep=30 is more than the 17 visual tokens image 0"):
        model(**x)


def test_flops_target_solves_keep_and_replays():
    model = check_flops_target(OV, ov.prefill_flops, 172)
    assert ov.prefill_flops(model, "tome", 20, text_len=8) < ov.prefill_flops(model, text_len=8)


def test_prefill_flops_counts_the_siglip_tower_without_cls():
    model = make_ov()
    v, t = model.config.vision_config, model.config.text_config
    tiles, n, c = 17, 16, v.hidden_size
    tower = tiles * (2 * n * c * 3 * PATCH**2 + 2 * (8 * n * c * c + 4 * n * n * c + 4 * n * c * v.intermediate_size))
    projector = 2 * tiles * n * (c * t.hidden_size + t.hidden_size**2)
    hd = t.hidden_size // t.num_attention_heads
    q, kv, length = t.num_attention_heads * hd, t.num_key_value_heads * hd, 172 + 8
    lm = 2 * (2 * length * (2 * 64 * q + 2 * 64 * kv + 3 * 64 * t.intermediate_size) + 4 * length * length * q)
    assert ov.prefill_flops(model, text_len=8) == tower + projector + lm


# --------------------------------------------------------------------------- unpatch and copies
def test_unpatch_restores_stock_outputs_exactly():
    check_unpatch_restores(OV, {method: BUDGETS[method] for method in ("crossget", "fastv", "tome")}, SAME_COUNT)


@pytest.mark.parametrize("method", ["crossget", "fastv"])
@pytest.mark.parametrize("clone", [copy.deepcopy, torch_saved], ids=["deepcopy", "torch.save"])
def test_copies_run_and_unpatch_on_their_own(clone, method):
    check_copies(OV, clone, dict(method=method, **BUDGETS[method]), SAME_COUNT)
