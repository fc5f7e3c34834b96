"""crossget on LLaVA-NeXT (anyres tiles, packed features with newlines): the projector-site
reduction (tome, crossget) and FastV, on a tiny random model built from its config.

Exactness of the stock path, generation with and without a KV cache, the visual tokens the
language model receives, batches of differently sized images, placeholders and the
processor, budgets and errors, unpatch / copies, and a naive reference of the site's matching."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
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
    tiles = max(hf.image_size_to_num_patches(list(s), PINPOINTS, TILE) for s in sizes)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(sizes), tiles, 3, TILE, TILE, generator=g), torch.tensor(sizes)


def make_prompts(counts, lengths, seed=1):
    """Left-padded prompts: BOS, ``counts[i]`` image placeholders, then random text."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1] + [IMG] * c + torch.randint(3, 90, (n,), generator=g).tolist() for c, n in zip(counts, lengths)]
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


def generate(model, sizes=(WIDE, TALL), lengths=(5, 3), **kw):
    x = inputs(model, sizes, lengths)
    with torch.no_grad():
        out = model.generate(**x, **GEN, **kw)
    return out[:, x["input_ids"].shape[1]:]


def logits(model, sizes=(WIDE, TALL)):
    with torch.no_grad():
        return model(**inputs(model, sizes)).logits


def stock_features(model, sizes):
    """The unpatched model's packed features per image (``[L_i, D]``)."""
    px, image_sizes = pixels(sizes)
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=px, image_sizes=image_sizes).pooler_output)


# --------------------------------------------------------------------------- stock path
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_none_and_unpatched_generate_stock_ids(impl):
    model = make_next(impl)
    ref_ids, ref_logits = generate(model), logits(model)
    assert [f.shape[0] for f in stock_features(model, (WIDE, TALL, BIG))] == [52, 56, 88]
    crossget.patch(model, method="none")
    assert type(model.model) is llava_next.LlavaNextModel
    assert torch.equal(generate(model), ref_ids)
    assert torch.equal(logits(model), ref_logits)
    crossget.unpatch(model)
    assert type(model.model) is hf.LlavaNextModel
    assert torch.equal(generate(model), ref_ids)


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
    model = make_next()
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
    model = make_next()
    crossget.patch(model, method="crossget", keep=KEEP)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    for use_cache in (True, False):
        calls.clear()
        generate(model, use_cache=use_cache)
        assert len(calls) == 1


# --------------------------------------------------------------------------- what reaches the LM
def lm_visual_tokens(model, x, layer=None):
    """Visual tokens per prompt the LM (or its decoder layer ``layer``) receives in one forward:
    its input length minus the prompt's text tokens."""
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
    text = (x["input_ids"] != IMG).sum(-1)
    return (seen[0].shape[1] - text).tolist(), seen[0]


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_lm_receives_keep_tokens_per_image_which_are_the_reduced_features(method):
    model = make_next()
    stock = stock_features(model, (WIDE, BIG))
    crossget.patch(model, method=method, keep=KEEP)
    x = inputs(model, (WIDE, BIG), lengths=(4, 4))
    counts, embeds = lm_visual_tokens(model, x)
    assert counts == [KEEP, KEEP]
    for row in range(2):
        want = reduce_visual_tokens(stock[row], KEEP, method)[0]
        assert torch.allclose(embeds[row][x["input_ids"][row] == IMG], want, atol=1e-6)
    # the LM now sees fewer tokens than the stock 52 and 88
    crossget.unpatch(model)
    assert lm_visual_tokens(model, inputs(model, (WIDE, BIG), lengths=(4, 4)))[0] == [52, 88]


def test_fastv_prunes_to_keep_per_image_inside_the_lm():
    model = make_next()
    crossget.patch(model, method="fastv", keep=KEEP)
    layer = crossget.config(model).fastv_layer
    x = inputs(model, SAME_COUNT)
    assert lm_visual_tokens(model, x)[0] == [52, 52]  # the prompt keeps every placeholder
    assert lm_visual_tokens(model, x, layer - 1)[0] == [52, 52]
    # left padding is text here: the pruned sequence keeps every non-image position
    assert lm_visual_tokens(model, x, layer)[0] == [KEEP, KEEP]
    assert crossget.tokens_per_layer(model, text_len=6, image_size=WIDE)["language"] == [58, 58, KEEP + 6]


# --------------------------------------------------------------------------- batches of different sizes
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_batch_of_different_sizes_gives_keep_each_and_matches_single_prompts(method):
    model = make_next()
    crossget.patch(model, method=method, keep=KEEP)
    sizes = (WIDE, BIG)  # 3 and 5 tiles
    assert [crossget.image_tokens(model, s) for s in sizes] == [KEEP, KEEP]
    x = inputs(model, sizes, lengths=(4, 4))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    assert [f.shape for f in feats] == [(KEEP, 64)] * 2
    with torch.no_grad():
        both = model.generate(**x, **GEN)
        for i, size in enumerate(sizes):  # each row alone, its own tiles only (no padding tiles)
            tiles = hf.image_size_to_num_patches(list(size), PINPOINTS, TILE)
            alone = {k: v[i : i + 1] for k, v in x.items()}
            alone["pixel_values"] = alone["pixel_values"][:, :tiles]
            assert torch.equal(model.generate(**alone, **GEN)[0], both[i])


def test_fastv_refuses_a_batch_with_different_counts():
    model = make_next()
    crossget.patch(model, method="fastv", keep=KEEP)
    with pytest.raises(ValueError, match=r"same size.*tome"):
        generate(model, (WIDE, BIG))


# --------------------------------------------------------------------------- placeholders and processor
def tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "what": 6, "is": 7, "<image>": IMG}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
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
    [
        (dict(keep=0), "positive"),
        (dict(keep=-3), "positive"),
        (dict(keep=2.5), "int"),
        (dict(keep=True), "int"),
        (dict(keep=89), "more than the 88"),  # the reference size, 112 x 112, gives 88
        (dict(method="fastv", keep=8, fastv_layer=3), "fastv_layer"),
        (dict(keep=8, flops=0.5), "not both"),
        (dict(r=4), "not an option of the LLaVA-NeXT"),
        (dict(method="visionzip", keep=8), "method must be one of"),
        (dict(method="tome"), "keep="),
        (dict(keep=8, towers=("vision",)), "towers"),
        (dict(keep=8, guidance="scaled"), "no importance to guide"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    model = make_next()
    kwargs.setdefault("method", "crossget")
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **kwargs)
    assert not crossget.is_patched(model) and type(model.model) is hf.LlavaNextModel


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
    model = make_next()
    crossget.patch(model, method="crossget", flops=0.6, text_len=8)
    cfg = crossget.config(model)
    assert cfg.flops == 0.6 and cfg.flops_estimate <= 0.6 and 0 < cfg.keep < 88
    base = llava_next.prefill_flops(model, text_len=8)
    assert llava_next.prefill_flops(model, "crossget", cfg.keep + 1, text_len=8) / base > 0.6
    assert math.isclose(llava_next.prefill_flops(model, "crossget", cfg.keep, text_len=8) / base, cfg.flops_estimate)
    ids = generate(model)
    twin = make_next()
    crossget.patch_from_config(twin, cfg.to_dict())
    assert crossget.config(twin) == cfg
    assert torch.equal(generate(twin), ids)
    with pytest.raises(ValueError, match="out of reach"):
        crossget.patch(model, method="crossget", flops=0.01)


# --------------------------------------------------------------------------- unpatch and copies
def test_unpatch_restores_stock_outputs_exactly():
    model = make_next()
    ref_ids, ref_logits = generate(model), logits(model)
    keys = set(model.state_dict())
    hooks = lambda: [(list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for m in model.modules()]
    stock_hooks = hooks()  # transformers' own output capture, installed by the first forward
    for method in ("crossget", "fastv", "tome"):
        crossget.patch(model, method=method, keep=KEEP)
        generate(model, SAME_COUNT)
        crossget.unpatch(model)
        assert not crossget.is_patched(model) and type(model.model) is hf.LlavaNextModel
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
    model = make_next()
    crossget.patch(model, method=method, keep=KEEP)
    # before any forward: a stock LLaVA-NeXT that ran one cannot be pickled either
    # (transformers installs a local output-capturing hook)
    twin = clone(model)
    want = generate(model, SAME_COUNT)
    assert crossget.config(twin) == crossget.config(model)
    assert type(twin.model) is llava_next.LlavaNextModel
    assert torch.equal(generate(twin, SAME_COUNT), want)
    crossget.unpatch(twin)
    assert type(twin.model) is hf.LlavaNextModel and crossget.is_patched(model)
    assert torch.equal(generate(model, SAME_COUNT), want)


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
