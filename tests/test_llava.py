"""crossget on LLaVA-1.5-style models: exactness at r=0, generation (cache, beams, batches),
placeholder counts, FastV / VisionZip against references, cross tokens, errors, unpatch."""

import numpy as np
import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

import crossget
from crossget.families import llava
from crossget.methods import crossget as crossget_method
from crossget.methods import visionzip
from crossget.state import TowerSettings, TowerState

IMG = 99  # image token id
PATCHES = 64  # 32 px images, 4 px patches
GEN = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMG])


def make_llava(impl="sdpa", strategy="default", feature_layer=-2, seed=0, vision_layers=3, lm_layers=4):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=32, patch_size=4,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=lm_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMG,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def make_prompts(n_image_tokens, lengths=(5, 3), seed=1):
    """Left-padded prompts: BOS, the image placeholders, then random text."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1] + [IMG] * n_image_tokens + torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def generate(model, images, **kw):
    ids, mask = make_prompts(crossget.image_tokens(model), lengths=kw.pop("lengths", (5, 3)))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images[: ids.shape[0]], **GEN, **kw)
    return out[:, ids.shape[1] :]


def logits(model, images):
    ids, mask = make_prompts(crossget.image_tokens(model))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=images).logits


BUDGETS = {  # a reduced setting per method (64 visual tokens unreduced)
    "crossget": dict(r=8),
    "tome": dict(keep=20),
    "fastv": dict(keep=20),
    "visionzip": dict(keep=20),
}


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["crossget", "tome", "none", "fastv", "visionzip"])
def test_r0_generates_like_unpatched(method, impl, strategy, images):
    model = make_llava(impl, strategy)
    ref_ids, ref_logits = generate(model, images), logits(model, images)
    crossget.patch(model, r=0, method=method)
    assert crossget.image_tokens(model) == PATCHES + (strategy == "full")
    assert torch.equal(generate(model, images), ref_ids)
    assert torch.allclose(logits(model, images), ref_logits, atol=1e-5)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method", list(BUDGETS))
def test_reduced_generation_same_with_and_without_cache(method, images):
    model = make_llava()
    ref = generate(model, images)
    crossget.patch(model, method=method, **BUDGETS[method])
    greedy = generate(model, images)
    assert torch.equal(greedy, generate(model, images, use_cache=False))
    beams = generate(model, images, num_beams=2)
    assert torch.equal(beams, generate(model, images, num_beams=2, use_cache=False))
    assert greedy.shape == ref.shape == beams.shape
    # reduction changes what the LM sees (a no-op patch would not)
    assert not torch.allclose(logits(model, images)[:, -1], make_llava_logits(images), atol=1e-4)


def make_llava_logits(images):
    model = make_llava()
    ids, mask = make_prompts(PATCHES)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=images).logits[:, -1]


@pytest.mark.parametrize("method", list(BUDGETS))
@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_never_reencodes_images(method, use_cache, images):
    model = make_llava()
    crossget.patch(model, method=method, **BUDGETS[method])
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, images, use_cache=use_cache)
    assert out.shape[1] == GEN["max_new_tokens"] and len(calls) == 1


def test_batched_rows_match_single_prompts(images):
    """Same-length prompts: a batch of two generates what each prompt generates alone."""
    model = make_llava()
    crossget.patch(model, r=8, method="crossget")
    both = generate(model, images, lengths=(4, 4))
    ids, mask = make_prompts(crossget.image_tokens(model), lengths=(4, 4))
    for i in range(2):
        with torch.no_grad():
            alone = model.generate(input_ids=ids[i : i + 1], pixel_values=images[i : i + 1], **GEN)
        assert torch.equal(alone[0, ids.shape[1] :], both[i])


# --------------------------------------------------------------------------- placeholder counts
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize(
    "method,budget",
    [("crossget", dict(r=8)), ("crossget", dict(r=[10, 3, 0])), ("tome", dict(r=13)), ("crossget", dict(keep=30)),
     ("tome", dict(keep=17)), ("fastv", dict(keep=9)), ("fastv", dict(r=8)), ("visionzip", dict(keep=30)),
     ("visionzip", dict(r=8)), ("none", {})],
)
def test_placeholder_count_matches_features(method, budget, strategy, images):
    model = make_llava(strategy=strategy)
    crossget.patch(model, method=method, **budget)
    cls = strategy == "full"
    expected = {
        ("crossget", "r"): 65 - 8 - 8 - (not cls) if budget.get("r") == 8 else 65 - 10 - 3 - (not cls),
        ("tome", "r"): 65 - 13 - 13 - (not cls),
        ("crossget", "keep"): 30,
        ("tome", "keep"): 17,
        ("fastv", "keep"): PATCHES + cls,  # FastV prunes inside the LM: the prompt keeps every token
        ("fastv", "r"): PATCHES + cls,
        ("visionzip", "keep"): 30,
        ("visionzip", "r"): 65 - 16 - (not cls),
        ("none", None): PATCHES + cls,
    }[(method, next(iter(budget), None))]
    assert crossget.image_tokens(model) == expected
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=images).pooler_output
    assert [f.shape[0] for f in feats] == [expected if method != "fastv" else PATCHES + cls] * 2
    if method == "fastv":
        assert crossget.tokens_per_layer(model, text_len=6)["language"] == [expected + 6] * 2 + [
            crossget.config(model).to_dict()["keep"] + 6
        ] * 2
    assert generate(model, images).shape == (2, GEN["max_new_tokens"])


def test_cls_first_and_spatial_order(images):
    model = make_llava(strategy="full")
    crossget.patch(model, r=8, method="crossget", trace_sources=True)
    with torch.no_grad():
        model.model.get_image_features(pixel_values=images)
    src = crossget.sources(model)  # [B, N_out, 65]
    assert src[:, 0, 0].all() and src[:, 0].sum(-1).eq(1).all()  # CLS alone, first
    # tokens that absorbed nothing keep their original (spatial) order
    for row in src:
        alone = row[row.sum(-1) == 1].float().argmax(-1)
        assert len(alone) > 10 and (alone[1:] > alone[:-1]).all()
    assert src.sum(1).eq(1).all()  # every patch is covered exactly once


def test_mismatched_prompt_says_what_to_call(images):
    model = make_llava()
    crossget.patch(model, keep=20, method="crossget")
    ids, mask = make_prompts(PATCHES)
    with pytest.raises(ValueError, match=r"adapt_processor"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images)


def tiny_processor(strategy="default"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "what": 6, "is": 7, "<image>": IMG}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_adapt_processor(strategy):
    model, processor = make_llava(strategy=strategy), tiny_processor(strategy)
    pictures = [(np.random.default_rng(i).random((40, 48, 3)) * 255).astype("uint8") for i in range(2)]
    text = ["<s> USER: <image> what is ASSISTANT:", "<s> USER: <image> is ASSISTANT:"]
    for budget in (dict(keep=20, method="crossget"), dict(r=8, method="tome"), dict(keep=9, method="visionzip"),
                   dict(keep=9, method="fastv")):
        crossget.patch(model, **budget)
        inputs = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
        assert (inputs["input_ids"] == IMG).sum(-1).tolist() == [crossget.image_tokens(model)] * 2
        with torch.no_grad():
            model.generate(**inputs, **GEN)
    crossget.unpatch(model)
    inputs = crossget.adapt_processor(processor, model)(images=pictures, text=text, padding=True, return_tensors="pt")
    assert (inputs["input_ids"] == IMG).sum(-1).tolist() == [PATCHES + (strategy == "full")] * 2


def test_several_feature_layers_merge_only_before_the_first(images):
    model = make_llava(feature_layer=[-3, -2])  # outputs of layers 1 and 2 (of 0..2) are concatenated
    ref = generate(model, images)
    crossget.patch(model, r=8, method="crossget")
    assert crossget.config(model).to_dict()["r"]["vision"] == [8, 0, 0]
    assert crossget.image_tokens(model) == 65 - 8 - 1
    out = generate(model, images)
    assert out.shape == ref.shape
    with pytest.raises(ValueError, match="one feature layer"):
        crossget.patch(model, keep=20, method="visionzip")


# --------------------------------------------------------------------------- budgets and errors
def test_schedule_for_keep_reaches_exactly():
    for n, layers, target in [(577, 23, 65), (577, 23, 129), (577, 23, 289), (65, 2, 21), (577, 23, 2), (65, 2, 65)]:
        sched = llava.schedule_for_keep(n, layers, target)
        assert len(sched) == layers and crossget.schedule.token_counts(n, sched)[-1][1] == target
    assert llava.schedule_for_keep(577, 23, 278) == [13] * 23  # LLaVA-1.5 with r=13 (277 features + CLS)
    with pytest.raises(ValueError, match="at least"):
        llava.schedule_for_keep(65, 2, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep=65), "more than the 64"),
        (dict(keep=0), "positive"),
        (dict(keep=-3), "positive"),
        (dict(keep=2.5), "must be an int"),
        (dict(keep=5), "at least"),  # two layers cannot merge that far
        (dict(r=-1), "non-negative"),
        (dict(r=[4, 4, 4]), "must be 0 from layer 2"),
        (dict(r=[4, 4]), "entries"),
        (dict(flops=0), r"\(0, 1\]"),
        (dict(flops=1.5), r"\(0, 1\]"),
        (dict(flops=0.01), "out of reach"),
        (dict(r=4, keep=20), "one of"),
        (dict(r=4, method="bogus"), "method must be one of"),
        (dict(r=4, towers=("text",)), "vision tower only"),
        (dict(keep=20, method="fastv", fastv_layer=4), "fastv_layer"),
        (dict(keep=20, method="fastv", fastv_layer=0), "fastv_layer"),
        (dict(keep=20, method="visionzip", contextual=30), "contextual"),
    ],
)
def test_bad_budgets_raise(kwargs, match):
    model = make_llava()
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, method=kwargs.pop("method", "crossget"), **kwargs)


def test_unsupported_towers_and_models():
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=4).to_dict(),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=100).to_dict(),
        image_token_id=IMG,
    )
    with pytest.raises(TypeError, match="CLIP vision tower"):
        crossget.patch(LlavaForConditionalGeneration(cfg), r=2)
    with pytest.raises(ValueError, match="keep="):
        from conftest import make_clip

        crossget.patch(make_clip(), keep=10)


def test_flops_target_solves_a_budget():
    model = make_llava()
    base = llava.prefill_flops(model)
    for method in ("crossget", "fastv", "visionzip"):
        crossget.patch(model, flops=0.7, method=method, text_len=8)
        cfg = crossget.config(model).to_dict()
        assert cfg["flops_estimate"] <= 0.7
        sched = (cfg["r"] or {}).get("vision")
        assert llava.prefill_flops(model, method, cfg["keep"], sched, text_len=8) / llava.prefill_flops(
            model, text_len=8
        ) == pytest.approx(cfg["flops_estimate"])
        # one more visual token would be above the target
        more = cfg["keep"] + 1
        sched = llava.merge_schedule(model, more) if method == "crossget" else None
        assert llava.prefill_flops(model, method, more, sched, text_len=8) / llava.prefill_flops(model, text_len=8) > 0.7
    assert llava.prefill_flops(model, "crossget", 20, llava.merge_schedule(model, 20)) < base


def test_unpatch_restores(images):
    model = make_llava()
    ref_ids, ref_logits = generate(model, images), logits(model, images)
    keys = set(model.state_dict())
    classes = [type(m) for m in model.modules()]
    hooks = lambda: [(list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for m in model.modules()]
    stock_hooks = hooks()  # transformers' own (output capture), installed by the first generate
    for method in ("crossget", "fastv", "visionzip", "tome"):
        crossget.patch(model, method=method, **BUDGETS[method])
        generate(model, images)
        crossget.unpatch(model)
        assert not crossget.is_patched(model) and crossget.image_tokens(model) == PATCHES
        assert set(model.state_dict()) == keys
        assert [type(m) for m in model.modules()] == classes
        assert hooks() == stock_hooks
        assert torch.equal(generate(model, images), ref_ids)
        assert torch.equal(logits(model, images), ref_logits)


# --------------------------------------------------------------------------- FastV against a reference
def test_fastv_keeps_the_most_attended_tokens_and_matches_manual_pruning(images):
    model = make_llava("eager")
    ids, mask = make_prompts(PATCHES, lengths=(6,))
    pixels = images[:1]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    k, keep = llava.FASTV_LAYER, 16
    attn = ref.attentions[k - 1][0].mean(0)[-1]  # last token's attention in layer K-1, mean over heads
    img = (ids[0] == IMG).nonzero()[:, 0]
    chosen = img[attn[img].topk(keep).indices].sort().values
    kept = torch.cat([(ids[0] != IMG).nonzero()[:, 0], chosen]).sort().values

    crossget.patch(model, keep=keep, method="fastv")
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(llava.glue(model).fastv.keep_idx[0], kept)

    # by hand: layers K.. on the kept tokens at their original positions
    lm = model.model.language_model
    x = ref.hidden_states[k][:, kept]
    rope = lm.rotary_emb(x, kept[None])
    mask4 = torch.full((len(kept), len(kept)), torch.finfo(x.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        for layer in lm.layers[k:]:
            x = layer(x, attention_mask=mask4, position_embeddings=rope, position_ids=kept[None])
        want = model.lm_head(lm.norm(x))
    assert torch.allclose(out.logits[0, kept], want[0], atol=1e-5)
    assert out.logits.shape == ref.logits.shape


def test_fastv_decode_masks_follow_the_pruned_cache(images):
    """Left padding (explicit masks): cached and uncached decoding agree, eager and sdpa."""
    for impl in ("eager", "sdpa"):
        model = make_llava(impl)
        crossget.patch(model, keep=10, method="fastv")
        out = generate(model, images, lengths=(7, 2))
        assert torch.equal(out, generate(model, images, lengths=(7, 2), use_cache=False))


# --------------------------------------------------------------------------- VisionZip against a reference
def naive_visionzip(x, cls_attention, metric, dominant, contextual):
    out = []
    for b in range(x.shape[0]):
        dom = sorted((cls_attention[b].topk(dominant).indices + 1).tolist())
        rest = [i for i in range(1, x.shape[1]) if i not in dom]
        tokens = [x[b, 0]] + [x[b, i] for i in dom]
        if not contextual:
            out.append(torch.stack(tokens))
            continue
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [i for i in rest if i not in targets]
        groups = {t: [t] for t in targets}
        for o in others:
            sims = [torch.cosine_similarity(metric[b, o], metric[b, t], dim=0) for t in targets]
            groups[targets[int(torch.stack(sims).argmax())]].append(o)
        tokens += [x[b, groups[t]].mean(0) for t in targets]
        out.append(torch.stack(tokens))
    return torch.stack(out)


def test_visionzip_select_matches_naive():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 65, 8, generator=g), torch.randn(2, 65, 4, generator=g)
    cls_attention = torch.rand(2, 64, generator=g)
    for dominant, contextual in [(16, 3), (54, 10), (20, 0)]:
        got = visionzip.visionzip_select(x, cls_attention, metric, dominant, contextual)
        assert got.shape == (2, 1 + dominant + contextual, 8)
        assert torch.allclose(got, naive_visionzip(x, cls_attention, metric, dominant, contextual), atol=1e-6)


def test_visionzip_in_the_model_uses_the_feature_layer(images):
    model = make_llava("eager")
    with torch.no_grad():
        ref = model.model.vision_tower(images, output_attentions=True, output_hidden_states=True)
    crossget.patch(model, keep=20, method="visionzip")
    dominant, contextual = visionzip.budget(llava.glue(model).visionzip_layer)
    assert (dominant, contextual) == (17, 3)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=images).pooler_output
    layer = model.model.vision_tower.encoder.layers[1]  # produces hidden_states[-2]
    h = ref.hidden_states[1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(h)).view(2, 65, 2, 16).mean(2)
    want = visionzip.visionzip_select(ref.hidden_states[2], ref.attentions[1][:, :, 0, 1:].sum(1), keys, dominant, contextual)
    proj = model.model.multi_modal_projector(want[:, 1:])
    assert torch.allclose(torch.stack(feats), proj, atol=1e-5)


# --------------------------------------------------------------------------- CrossGET importance and cross tokens
def test_attention_importance_rule(monkeypatch):
    seen = {}
    real = crossget_method.complete_graph_soft_matching

    def spy(metric, r, importance=None, protected=None, groups=None, **guidance):
        seen["importance"] = importance
        return real(metric, r, importance, protected, groups, **guidance)

    monkeypatch.setattr(crossget_method, "complete_graph_soft_matching", spy)
    g = torch.Generator().manual_seed(0)
    st = TowerState(settings=TowerSettings("vision", [2], "crossget", importance="attention"), heads=2)
    st.cross_tokens = torch.nn.Parameter(torch.zeros(1, 8))
    x = torch.randn(1, 6, 8, generator=g)
    st.start(x)
    x, mask, _ = st.begin_layer(x, None, 0)
    q, k = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    st.observe(q, k)
    st.reduce(x, 0)
    # the probabilities written out: 2 heads of width 4, the cross token (last) seen by nobody
    logits = torch.einsum("bihd,bjhd->bhij", q.view(1, 7, 2, 4), k.view(1, 7, 2, 4)) / 2.0
    logits[..., :6, 6] = -torch.inf
    attention = logits.softmax(-1).mean(1)
    want = attention[:, :6, :6].mean(1) + attention[:, 6, :6]
    assert torch.allclose(seen["importance"], want, atol=1e-6)


def test_llava_importance_reads_the_layers_attention(monkeypatch, images):
    seen = []
    real = crossget_method.complete_graph_soft_matching
    monkeypatch.setattr(
        crossget_method, "complete_graph_soft_matching",
        lambda metric, r, importance=None, protected=None, groups=None, **guidance: seen.append(importance)
        or real(metric, r, importance, protected, groups, **guidance),
    )
    model = make_llava("sdpa")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.model.vision_tower(images, output_attentions=True).attentions[0].mean(1).mean(1)  # [B, 65]
        model.set_attn_implementation("sdpa")
        crossget.patch(model, r=8, method="crossget")
        model.model.get_image_features(pixel_values=images)
    cross = seen[0] - ref  # what is left is the cross token's attention to each token
    assert (cross > 0).all() and (cross.sum(-1) < 1).all()


def train_step(model, images):
    ids, mask = make_prompts(crossget.image_tokens(model))
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels)
    return out.loss + llava.CROSS_LOSS_WEIGHT * crossget.cross_token_loss(model)


def test_training_step_moves_both_cross_tokens(images):
    model = make_llava()
    crossget.patch(model, r=8, method="crossget")
    for p in model.parameters():
        p.requires_grad_(False)
    thetas = {k: s.cross_tokens for k, s in crossget.states(model).items()}
    assert set(thetas) == {"vision", "text"} and thetas["text"].shape == (4, 64) and thetas["vision"].shape == (3, 32)
    for t in thetas.values():
        t.requires_grad_(True)
    before = {k: t.detach().clone() for k, t in thetas.items()}
    alignment = None
    opt = torch.optim.SGD(list(thetas.values()), lr=1.0)
    model.train()
    loss = train_step(model, images)
    alignment = crossget.cross_token_loss(model)
    loss.backward()
    opt.step()
    assert alignment > 0
    for k, t in thetas.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, k
        assert not torch.equal(t.detach(), before[k]), k
    # names as the state dict has them: one parameter per tower
    names = {n for n, p in model.named_parameters() if "crossget" in n}
    assert names == {"model.vision_tower.encoder.crossget_cross_tokens", "model.language_model.crossget_cross_tokens"}


def test_cross_token_loss_pairs_layers_like_the_authors():
    # 3 vision layers over 4 LM layers: vision layer 0 -> LM 0, 1 -> LM 1, 2 -> LM 2, 3
    lv, lt = 3, 4
    assert [i for i in range(lv) for _ in range((i + 1) * lt // lv - i * lt // lv)] == [0, 1, 2, 2]


def test_save_and_load_cross_tokens(tmp_path, images):
    model = make_llava()
    crossget.patch(model, r=8, method="crossget")
    untrained = logits(model, images)
    with torch.no_grad():
        for st in crossget.states(model).values():
            st.cross_tokens.normal_(0, 0.5)
    want = logits(model, images)
    assert not torch.allclose(want, untrained, atol=1e-4)  # the tokens act (the LM's directly on BOS)
    path = tmp_path / "llava-cross.safetensors"
    crossget.save_cross_tokens(model, path)

    fresh = make_llava()
    assert torch.allclose(logits(fresh, images)[:, -1], make_llava_logits(images))  # stock before loading
    crossget.load_cross_tokens(fresh, path)
    assert crossget.config(fresh).to_dict()["r"] == crossget.config(model).to_dict()["r"]
    for k, st in crossget.states(model).items():
        assert torch.equal(crossget.states(fresh)[k].cross_tokens, st.cross_tokens)
    assert torch.equal(logits(fresh, images), want)
    crossget.patch(fresh, r=8, method="crossget")  # re-patching keeps them
    assert torch.equal(logits(fresh, images), want)


def test_unguided_ablation_has_no_cross_tokens(images):
    model = make_llava()
    crossget.patch(model, r=8, method="crossget", importance="none")
    assert crossget.config(model).to_dict()["importance"] == "none"
    assert not [n for n, _ in model.named_parameters() if "crossget" in n] and not crossget.states(model)["vision"].cross_tokens
    assert generate(model, images).shape == (2, GEN["max_new_tokens"])
    with pytest.raises(ValueError, match="cross tokens"):
        crossget.save_cross_tokens(model, "unused.safetensors")
    with pytest.raises(ValueError, match="importance"):
        crossget.patch(model, r=8, method="crossget", importance="bogus")
