"""crossget on LLaVA-NeXT (anyres tiles, packed features with newlines): the projector-site
reduction (tome, crossget) and FastV, on a tiny random model built from its config.

Exactness of the stock path, generation with and without a KV cache, the visual tokens the
language model receives, batches of differently sized images, placeholders and the
processor, budgets and errors, unpatch / copies, and a naive reference of the site's matching."""

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
    torch_saved,
    word_tokenizer,
)
from mllm_common import make_prompts as prompts_of
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.models.llava_next import modeling_llava_next as hf

import crossget
from crossget.families import llava_next
from crossget.families.visual_site import reduce_visual_tokens

IMG = 99  # image token id
TILE, PATCH = 56, 14  # 4 x 4 patches per tile
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG])
WIDE, TALL, BIG = (40, 100), (100, 40), (112, 112)  # 3, 3 and 5 tiles; 52, 56 and 88 stock tokens
KEEP = 20


def make_next(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMG,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def pixels(sizes, seed=2):
    """Random tiles ``[images, max tiles, 3, 56, 56]`` (unused tiles padded, as the processor does)."""
    return anyres_pixels(sizes, PINPOINTS, TILE, seed)


make_prompts = functools.partial(prompts_of, token=IMG)  # BOS, counts[i] placeholders, then random text


def inputs(model, sizes=(WIDE, TALL), lengths=(5, 3)):
    ids, mask = make_prompts([crossget.image_tokens(model, s) for s in sizes], lengths)
    px, image_sizes = pixels(sizes)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=image_sizes)


def stock_features(model, sizes):
    """The unpatched model's packed features per image (``[L_i, D]``)."""
    px, image_sizes = pixels(sizes)
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=px, image_sizes=image_sizes).pooler_output)


NEXT = MLLM(make_next, inputs, stock_features, GEN, IMG, llava_next.LlavaNextModel, hf.LlavaNextModel, (WIDE, TALL))
generate, logits = NEXT.generate, NEXT.logits


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    model = check_stock_path(NEXT, impl)
    assert [f.shape[0] for f in stock_features(model, (WIDE, TALL, BIG))] == [52, 56, 88]


@pytest.mark.parametrize("size", [(56, 56), WIDE, TALL, BIG, (30, 112), (112, 20), (13, 200), (200, 9), (57, 113)])
def test_stock_count_is_what_the_model_and_the_processor_give(size):
    model = make_next()
    got = llava_next.stock_image_tokens(model, size)
    assert [f.shape[0] for f in stock_features(model, [size])] == [got]
    assert crossget.image_tokens(model, size) == got
    processor = tiny_processor()
    crossget.adapt_processor(processor, model)
    assert processor._get_number_of_features(*size, TILE, TILE) - 1 == got  # "default": CLS dropped


# --------------------------------------------------------------------------- generation
BUDGETS = {"tome": dict(keep=KEEP), "crossget": dict(keep=KEEP), "fastv": dict(keep=KEEP)}
SAME_COUNT = (WIDE, WIDE)  # FastV: one count of visual tokens for the whole batch


@pytest.mark.parametrize("method", list(BUDGETS))
def test_reduced_generation_same_with_and_without_cache(method):
    check_cache_agreement(NEXT, method, BUDGETS[method], SAME_COUNT if method == "fastv" else (WIDE, TALL))


def test_decoding_never_reencodes_images():
    check_encodes_once(NEXT, lambda model: model.model.vision_tower, KEEP)


# --------------------------------------------------------------------------- what reaches the LM
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    check_lm_receives_reduced(NEXT, method, KEEP, (WIDE, BIG), [52, 88])  # fewer than the stock 52 and 88


def test_fastv_prunes_to_keep_per_image_inside_the_lm():
    model = check_fastv_prunes(NEXT, BUDGETS["fastv"], SAME_COUNT, 52)
    assert crossget.tokens_per_layer(model, text_len=6, image_size=WIDE)["language"] == [58, 58, KEEP + 6]


# --------------------------------------------------------------------------- batches of different sizes
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_sizes_gives_keep_each_and_matches_single_prompts(method):
    tiles = lambda size: hf.image_size_to_num_patches(list(size), PINPOINTS, TILE)
    check_batch_matches_single(NEXT, method, KEEP, (WIDE, BIG), tiles, 64)  # 3 and 5 tiles


def test_fastv_refuses_a_batch_with_different_counts():
    check_fastv_refuses(NEXT, BUDGETS["fastv"], (WIDE, BIG), r"same size.*tome")


# --------------------------------------------------------------------------- placeholders and processor
def tiny_processor():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "what": 6, "is": 7, "<image>": IMG}
    tokenizer = word_tokenizer(vocab, ["<image>"])
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer)


def test_adapt_processor_writes_the_count_the_model_needs():
    model, processor = make_next(), tiny_processor()
    pictures = [(np.random.default_rng(i).random((*s, 3)) * 255).astype("uint8") for i, s in enumerate((WIDE, BIG))]
    text = ["<s> USER: <image> what is ASSISTANT:", "<s> USER: <image> is ASSISTANT:"]
    for budget, want in ((dict(method="crossget", keep=KEEP), [KEEP] * 2), (dict(method="tome", keep=9), [9] * 2),
                         (dict(method="none"), [52, 88])):
        crossget.patch(model, **budget)
        x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
        assert (x["input_ids"] == IMG).sum(-1).tolist() == want
        with torch.no_grad():
            model.generate(**x, **GEN)
    crossget.unpatch(model)
    x = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
    assert (x["input_ids"] == IMG).sum(-1).tolist() == [52, 88]
    assert "replace_image_token" not in vars(processor)
    with pytest.raises(TypeError, match="LlavaNextProcessor"):
        crossget.adapt_processor(object(), model)


def test_mismatched_prompt_says_what_to_call():
    model = make_next()
    crossget.patch(model, method="crossget", keep=KEEP)
    ids, mask = make_prompts([52, 56], (5, 3))  # the stock counts
    px, sizes = pixels((WIDE, TALL))
    with pytest.raises(ValueError, match=r"adapt_processor.*image_tokens"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)
    crossget.unpatch(model)
    with pytest.raises(ValueError, match="image_size"):
        crossget.image_tokens(model)  # the stock count depends on the image's size


# --------------------------------------------------------------------------- budgets and errors
@pytest.mark.parametrize(
    "kwargs, match",
    [b for b in BAD_BUDGETS if b[0].get("method") != "visionzip"] + [  # NeXT runs VisionZip at its tower site
        (dict(keep=89), "more than the 88"),  # the reference size, 112 x 112, gives 88
        (dict(method="fastv", keep=8, fastv_layer=3), "fastv_layer"),
        (dict(r=4), "r= is for site='tower'"),
        (dict(method="visionzip", keep=8, site="projector"), "site must be 'tower'"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    check_bad_budget(NEXT, kwargs, match)


def test_keep_above_an_images_count_raises_at_the_image():
    model = make_next()
    crossget.patch(model, method="tome", keep=40)  # (13, 200) gives 16: the base tile, no grid row left
    assert crossget.image_tokens(model, WIDE) == 40
    with pytest.raises(ValueError, match="keep=40 is more than the 16"):
        crossget.image_tokens(model, (13, 200))
    ids, mask = make_prompts([40, 40], (3, 3))
    px, sizes = pixels((WIDE, (13, 200)))
    with pytest.raises(ValueError, match=r"keep=40 is more than the 16 visual tokens image 1"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)


def test_flops_target_solves_keep_and_replays():
    check_flops_target(NEXT, llava_next.prefill_flops, 88)


# --------------------------------------------------------------------------- unpatch and copies
def test_unpatch_restores_stock_outputs_exactly():
    check_unpatch_restores(NEXT, {method: BUDGETS[method] for method in ("crossget", "fastv", "tome")}, SAME_COUNT)


@pytest.mark.parametrize("method", ["crossget", "fastv"])
@pytest.mark.parametrize("clone", [copy.deepcopy, torch_saved], ids=["deepcopy", "torch.save"])
def test_copies_run_and_unpatch_on_their_own(clone, method):
    check_copies(NEXT, clone, dict(method=method, keep=KEEP), SAME_COUNT)


# --------------------------------------------------------------------------- the site's matching
def naive_tome(x, keep):
    """Plain-python ToMe rounds: alternate tokens into A and B, each A token's best B match by
    cosine, the best edges merge (size-weighted mean), tokens ordered by smallest index."""
    toks = [(x[i].double(), 1.0, i) for i in range(x.shape[0])]  # (value, size, smallest index)
    while len(toks) > keep:
        n = len(toks)
        r = min(n - keep, n // 2)
        a, b = toks[0::2], toks[1::2]
        edges = []
        for ia, (va, _, _) in enumerate(a):
            sims = [float(torch.dot(va, vb) / (va.norm() * vb.norm())) for vb, _, _ in b]
            best = max(range(len(b)), key=lambda j: sims[j])
            edges.append((-sims[best], ia, best))
        edges.sort()  # best edges first, ties by A index
        merged = {ia: jb for _, ia, jb in edges[:r]}
        groups = {jb: [b[jb]] for jb in range(len(b))}
        for ia, jb in merged.items():
            groups[jb].append(a[ia])
        out = [a[ia] for ia in range(len(a)) if ia not in merged]
        for members in groups.values():
            size = sum(s for _, s, _ in members)
            value = sum(v * s for v, s, _ in members) / size
            out.append((value, size, min(i for _, _, i in members)))
        toks = sorted(out, key=lambda t: t[2])
    return torch.stack([v for v, _, _ in toks]).float(), torch.tensor([i for _, _, i in toks])


@pytest.mark.parametrize("n, keep", [(9, 5), (10, 5), (37, 30), (37, 19), (23, 4), (52, 20), (88, 1)])
def test_tome_site_matches_naive_rounds(n, keep):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + keep))
    tokens, first = reduce_visual_tokens(x, keep, "tome")
    want, want_first = naive_tome(x, keep)
    assert tokens.shape == (keep, 8)
    assert torch.equal(first, want_first)
    assert torch.allclose(tokens, want, atol=1e-5)


def test_crossget_site_merges_the_most_similar_pair_first_and_keeps_order():
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    u = x / x.norm(dim=-1, keepdim=True)
    sim = (u @ u.T).fill_diagonal_(-2)
    i, j = sorted(divmod(int(sim.argmax()), 12))
    tokens, first = reduce_visual_tokens(x, 11, "crossget")
    assert first.tolist() == [k for k in range(12) if k != j]
    want = torch.cat([x[:j], x[j + 1:]])
    want[i] = (x[i] + x[j]) / 2
    assert torch.allclose(tokens, want, atol=1e-6)
    for keep in (7, 3, 1):
        tokens, first = reduce_visual_tokens(x, keep, "crossget")
        assert tokens.shape == (keep, 6) and first[0] == 0 and (first[1:] > first[:-1]).all()
    assert torch.equal(reduce_visual_tokens(x, 12, "crossget")[0], x)


@pytest.mark.parametrize("keep", [0, -1, 13, 2.0, True, None])
def test_site_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        reduce_visual_tokens(torch.randn(12, 4), keep, "tome")
    with pytest.raises(ValueError, match="method"):
        reduce_visual_tokens(torch.randn(12, 4), 4, "fastv")
