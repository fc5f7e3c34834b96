"""crossget on LLaVA-OneVision (SigLIP tower without CLS, anyres-max tiles, packed features with
newlines, multi-image prompts): the projector-site reduction (tome, crossget) and FastV, on a
tiny random model built from its config.

Exactness of the stock path, generation with and without a KV cache, the visual tokens the
language model receives, batches of differently sized images and multi-image prompts, videos
(never reduced), placeholders and the processor, budgets and errors, unpatch / copies."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
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
    tiles = 1 if multi else max(hf.image_size_to_num_patches(list(s), PINPOINTS, TILE) for s in sizes)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(sizes), tiles, 3, TILE, TILE, generator=g), torch.tensor(sizes)


def make_prompts(counts, lengths, seed=1, token=IMG):
    """Left-padded prompts: BOS, ``counts[i]`` placeholders, then random text."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1] + [token] * c + torch.randint(3, 90, (n,), generator=g).tolist() for c, n in zip(counts, lengths)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


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
    with torch.no_grad():
        out = model.generate(**x, **GEN, **kw)
    return out[:, x["input_ids"].shape[1]:]


def generate(model, sizes=(WIDE, TALL), lengths=(5, 3), **kw):
    return run_generate(model, inputs(model, sizes, lengths), **kw)


def logits(model, sizes=(WIDE, TALL)):
    with torch.no_grad():
        return model(**inputs(model, sizes)).logits


def stock_features(model, sizes, multi=False):
    """The unpatched model's packed features per image (``[L_i, D]``)."""
    px, image_sizes = pixels(sizes, multi=multi)
    extra = dict(batch_num_images=torch.tensor([len(sizes)])) if multi else {}
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=px, image_sizes=image_sizes, **extra).pooler_output)


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    model = make_ov(impl)
    ref_ids, ref_logits = generate(model), logits(model)
    crossget.patch(model, method="none")
    assert type(model.model) is ov.LlavaOnevisionModel
    assert crossget.config(model).keep is None
    assert torch.equal(generate(model), ref_ids)
    assert torch.equal(logits(model), ref_logits)
    crossget.unpatch(model)
    assert type(model.model) is hf.LlavaOnevisionModel
    assert torch.equal(generate(model), ref_ids)


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
    model = make_ov()
    sizes = SAME_COUNT if method == "fastv" else (WIDE, TALL)
    ref = logits(model, sizes)[:, -1]
    crossget.patch(model, method=method, **BUDGETS[method])
    greedy = generate(model, sizes)
    assert torch.equal(greedy, generate(model, sizes, use_cache=False))
    beams = generate(model, sizes, num_beams=2)
    assert torch.equal(beams, generate(model, sizes, num_beams=2, use_cache=False))
    assert greedy.shape == beams.shape == (2, GEN["max_new_tokens"])
    # the reduction changes what the LM sees (a no-op patch would not)
    assert not torch.allclose(logits(model, sizes)[:, -1], ref, atol=1e-4)


def test_decoding_never_reencodes_images():
    model = make_ov()
    crossget.patch(model, method="crossget", keep=KEEP)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    for use_cache in (True, False):
        calls.clear()
        generate(model, use_cache=use_cache)
        assert len(calls) == 1


# --------------------------------------------------------------------------- what reaches the LM
def lm_visual_tokens(model, x, layer=None, token=IMG):
    """Visual tokens per prompt the LM (or its decoder layer ``layer``) receives in one forward:
    its input length minus the prompt's other tokens."""
    seen = []
    lm = model.model.language_model
    if layer is None:
        hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
    else:
        hook = lm.layers[layer].register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                          with_kwargs=True)
    with torch.no_grad():
        model(**x)
    hook.remove()
    other = (x["input_ids"] != token).sum(-1)
    return (seen[0].shape[1] - other).tolist(), seen[0]


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    model = make_ov()
    stock = stock_features(model, (WIDE, BIG))
    assert [f.shape[0] for f in stock] == [118, 172]
    crossget.patch(model, method=method, keep=KEEP)
    x = inputs(model, (WIDE, BIG), lengths=(4, 4))
    counts, embeds = lm_visual_tokens(model, x)
    assert counts == [KEEP, KEEP]
    for row in range(2):
        want = reduce_visual_tokens(stock[row], KEEP, method)[0]
        assert torch.allclose(embeds[row][x["input_ids"][row] == IMG], want, atol=1e-6)
    crossget.unpatch(model)
    assert lm_visual_tokens(model, inputs(model, (WIDE, BIG), lengths=(4, 4)))[0] == [118, 172]


def test_fastv_prunes_to_keep_per_image_inside_the_lm():
    model = make_ov()
    crossget.patch(model, method="fastv", keep=KEEP, fastv_layer=1)
    x = inputs(model, SAME_COUNT)
    assert lm_visual_tokens(model, x)[0] == [118, 118]  # the prompt keeps every placeholder
    assert lm_visual_tokens(model, x, 0)[0] == [118, 118]
    assert lm_visual_tokens(model, x, 1)[0] == [KEEP, KEEP]
    assert crossget.tokens_per_layer(model, text_len=6, image_size=WIDE) == {
        "vision": [16, 16], "language": [124, KEEP + 6]}


# --------------------------------------------------------------------------- batches and multi-image prompts
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_sizes_gives_keep_each_and_matches_single_prompts(method):
    model = make_ov()
    crossget.patch(model, method=method, keep=KEEP)
    sizes = (MID, BIG)  # 7 and 17 tiles
    assert [crossget.image_tokens(model, s) for s in sizes] == [KEEP, KEEP]
    x = inputs(model, sizes, lengths=(4, 4))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    assert [f.shape for f in feats] == [(KEEP, 64)] * 2
    both = run_generate(model, x)
    for i, size in enumerate(sizes):  # each row alone, its own tiles only (no padding tiles)
        tiles = hf.image_size_to_num_patches(list(size), PINPOINTS, TILE)
        alone = {k: v[i : i + 1] for k, v in x.items()}
        alone["pixel_values"] = alone["pixel_values"][:, :tiles]
        assert torch.equal(run_generate(model, alone)[0], both[i])


@pytest.mark.parametrize("method", ["tome", "crossget", "fastv"])
def test_multi_image_prompt(method):
    model = make_ov()
    stock = stock_features(model, (WIDE, BIG), multi=True)
    crossget.patch(model, method=method, **BUDGETS[method])
    x = multi_inputs(model)
    counts, embeds = lm_visual_tokens(model, x)
    if method == "fastv":
        assert counts == [2 * MULTI] and lm_visual_tokens(model, x, 1)[0] == [2 * KEEP]
    else:
        assert counts == [2 * KEEP]
        want = torch.cat([reduce_visual_tokens(f, KEEP, method)[0] for f in stock])
        assert torch.allclose(embeds[0][x["input_ids"][0] == IMG], want, atol=1e-6)
    ids = run_generate(model, x)
    assert torch.equal(ids, run_generate(model, x, use_cache=False))


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_mixing_a_single_and_a_multi_image_prompt(method):
    model = make_ov()
    crossget.patch(model, method=method, keep=KEEP)
    one, two = inputs(model, (MID,), lengths=(6,)), multi_inputs(model, (WIDE, TALL), length=3)
    ids, mask = make_prompts([KEEP, 2 * KEEP], (6, 3))
    tiles = one["pixel_values"].shape[1]
    px = torch.zeros(3, tiles, 3, TILE, TILE)
    px[0], px[1:, :1] = one["pixel_values"][0], two["pixel_values"]
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=torch.tensor([MID, WIDE, TALL]),
             batch_num_images=torch.tensor([1, 2]))
    assert lm_visual_tokens(model, x)[0] == [KEEP, 2 * KEEP]
    both = run_generate(model, x)
    alone = [dict(x, input_ids=ids[:1], attention_mask=mask[:1], pixel_values=px[:1], image_sizes=x["image_sizes"][:1],
                  batch_num_images=torch.tensor([1])),
             dict(x, input_ids=ids[1:], attention_mask=mask[1:], pixel_values=px[1:, :1],
                  image_sizes=x["image_sizes"][1:], batch_num_images=torch.tensor([2]))]
    for i in range(2):
        assert torch.equal(run_generate(model, alone[i])[0], both[i])


def test_fastv_refuses_a_batch_with_different_counts():
    model = make_ov()
    crossget.patch(model, method="fastv", keep=KEEP, fastv_layer=1)
    with pytest.raises(ValueError, match=r"LLaVA-OneVision.*\[118, 172\].*same size.*tome"):
        generate(model, (WIDE, BIG))


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
    assert lm_visual_tokens(model, x, token=VID)[0] == [9]
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)
    assert torch.equal(run_generate(model, x), ref_ids)


# --------------------------------------------------------------------------- placeholders and processor
class ImageProcessorOnly(LlavaOnevisionProcessor):
    """The OneVision processor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)


def tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "what": 6, "is": 7,
             "<video>": VID, "<image>": IMG}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
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
    [
        (dict(keep=0), "positive"),
        (dict(keep=-3), "positive"),
        (dict(keep=2.5), "int"),
        (dict(keep="12"), "int"),
        (dict(keep=True), "int"),
        (dict(keep=173), "more than the 172"),  # the reference size, 128 x 128, gives 172
        (dict(keep=8, image_size=32), None),  # 36 tokens: fine
        (dict(keep=37, image_size=32), "more than the 36"),
        (dict(method="fastv", keep=8), "fastv_layer"),  # K=2 needs a third LM layer
        (dict(keep=8, flops=0.5), "not both"),
        (dict(r=4), "not an option of the LLaVA-OneVision"),
        (dict(method="visionzip", keep=8), "method must be one of"),
        (dict(method="tome"), "keep="),
        (dict(keep=8, towers=("vision",)), "towers"),
        (dict(keep=8, guidance="scaled"), "no importance to guide"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    model = make_ov()
    kwargs.setdefault("method", "crossget")
    if match is None:
        crossget.patch(model, **kwargs)
        assert crossget.config(model).keep == kwargs["keep"] and crossget.config(model).importance == "none"
        return
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **kwargs)
    assert not crossget.is_patched(model) and type(model.model) is hf.LlavaOnevisionModel


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
    model = make_ov()
    crossget.patch(model, method="crossget", flops=0.6, text_len=8)
    cfg = crossget.config(model)
    assert cfg.flops == 0.6 and cfg.flops_estimate <= 0.6 and 0 < cfg.keep < 172
    base = ov.prefill_flops(model, text_len=8)
    assert ov.prefill_flops(model, "crossget", cfg.keep + 1, text_len=8) / base > 0.6
    assert math.isclose(ov.prefill_flops(model, "crossget", cfg.keep, text_len=8) / base, cfg.flops_estimate)
    assert ov.prefill_flops(model, "tome", 20, text_len=8) < base
    ids = generate(model)
    twin = make_ov()
    crossget.patch_from_config(twin, cfg.to_dict())
    assert crossget.config(twin) == cfg
    assert torch.equal(generate(twin), ids)
    with pytest.raises(ValueError, match="out of reach"):
        crossget.patch(model, method="crossget", flops=0.01)


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
    model = make_ov()
    ref_ids, ref_logits = generate(model), logits(model)
    keys = set(model.state_dict())
    hooks = lambda: [(list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for m in model.modules()]
    stock_hooks = hooks()  # transformers' own output capture, installed by the first forward
    for method in ("crossget", "fastv", "tome"):
        crossget.patch(model, method=method, **BUDGETS[method])
        generate(model, SAME_COUNT)
        crossget.unpatch(model)
        assert not crossget.is_patched(model) and type(model.model) is hf.LlavaOnevisionModel
        assert not any(hasattr(m, "_crossget") for m in model.modules())
        assert set(model.state_dict()) == keys and hooks() == stock_hooks
        assert torch.equal(generate(model), ref_ids)
        assert torch.equal(logits(model), ref_logits)


def torch_saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("method", ["crossget", "fastv"])
@pytest.mark.parametrize("clone", [copy.deepcopy, torch_saved], ids=["deepcopy", "torch.save"])
def test_copies_run_and_unpatch_on_their_own(clone, method):
    model = make_ov()
    crossget.patch(model, method=method, **BUDGETS[method])
    twin = clone(model)  # before any forward, as for LLaVA-NeXT (upstream's capture hook is local)
    want = generate(model, SAME_COUNT)
    assert crossget.config(twin) == crossget.config(model)
    assert type(twin.model) is ov.LlavaOnevisionModel
    assert torch.equal(generate(twin, SAME_COUNT), want)
    crossget.unpatch(twin)
    assert type(twin.model) is hf.LlavaOnevisionModel and crossget.is_patched(model)
    assert torch.equal(generate(model, SAME_COUNT), want)
