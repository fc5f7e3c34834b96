"""crossget.patch on Hugging Face SigLIP and SigLIP2: no CLS (nothing protected in the vision
tower), the attention-pooling head over merged tokens, the pooled last text token protected,
SigLIP2's padded patches; exactness at r=0, schedules, batching, copies, HF switches, errors."""

import copy
import io
import warnings

import pytest
import torch
from test_hf_behaviour import assert_same_grads, with_and_without_checkpointing
from transformers import (
    Siglip2Config,
    Siglip2Model,
    Siglip2TextModel,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipTextModel,
    SiglipVisionModel,
)

import crossget
from crossget.families import siglip
from crossget.families.registry import family_of
from crossget.flops import count_flops
from crossget.record import record

PATCHES = 64  # image 32, patch 4 (SigLIP); an 8 x 8 position grid (SigLIP2)
TEXT_LEN = 16


def configs(two: bool, layers: int = 3):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                max_position_embeddings=TEXT_LEN, vocab_size=50, bos_token_id=48, eos_token_id=49, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, patch_size=4)
    if two:
        return Siglip2Config(text_config=text, vision_config=vision | {"num_patches": PATCHES})
    return SiglipConfig(text_config=text, vision_config=vision | {"image_size": 32})


def make(name: str = "SiglipModel", impl: str = "sdpa", seed: int = 0, layers: int = 3):
    """A tiny random SigLIP / SigLIP2 model (or one of its towers) by class name."""
    two = name.startswith("Siglip2")
    cfg = configs(two, layers)
    cls = {"SiglipModel": SiglipModel, "SiglipVisionModel": SiglipVisionModel, "SiglipTextModel": SiglipTextModel,
           "Siglip2Model": Siglip2Model, "Siglip2VisionModel": Siglip2VisionModel,
           "Siglip2TextModel": Siglip2TextModel, "SiglipForImageClassification": SiglipForImageClassification}[name]
    if name.endswith("VisionModel"):
        cfg = cfg.vision_config
    elif name.endswith("TextModel"):
        cfg = cfg.text_config
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def texts(lengths, total: int = TEXT_LEN, left: bool = False, seed: int = 0):
    """input_ids / attention_mask padded to ``total`` (right, as SigLIP's tokenizer; left, as SigLIP2's)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), 1)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        at = slice(total - n, total) if left else slice(0, n)
        ids[i, at] = torch.cat([torch.randint(2, 40, (n - 1,), generator=g), torch.tensor([49])])
        mask[i, at] = 1
    return ids, mask


def patches(shapes, total: int = PATCHES, seed: int = 1):
    """SigLIP2 inputs: ``pixel_values`` [B, total, 48], ``pixel_attention_mask``, ``spatial_shapes``."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    pixels = torch.randn(len(shapes), total, 48, generator=g)
    mask = torch.zeros(len(shapes), total, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        mask[i, : h * w] = 1
    return dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)


SHAPES = [(8, 8), (6, 5), (4, 7)]


def images(two: bool, shapes=SHAPES):
    if two:
        return patches(shapes)
    return dict(pixel_values=torch.randn(len(shapes), 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def both(two: bool):
    """Inputs of a whole model: images and padded texts."""
    ids, mask = texts([16, 9, 5], left=two)
    return images(two) | dict(input_ids=ids, attention_mask=mask)


KINDS = [("SiglipModel", False), ("Siglip2Model", True)]


# --------------------------------------------------------------------------- r = 0 is the stock model
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["none", "tome", "crossget"])
@pytest.mark.parametrize("name, two", KINDS)
def test_r0_equals_stock(name, two, method, impl):
    model = make(name, impl)
    inputs = both(two)
    ref = run(model, **inputs)
    crossget.patch(model, r=0, method=method, towers=("vision", "text"))
    out = run(model, **inputs)
    for field in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.allclose(getattr(out, field), getattr(ref, field), atol=1e-5), field
    for tower in ("vision_model_output", "text_model_output"):
        a, b = getattr(out, tower), getattr(ref, tower)
        assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5), tower
        assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-5), tower


@pytest.mark.parametrize("name, two", KINDS)
def test_attentions_and_hidden_states_at_r0_equal_stock(name, two):
    ref, model = make(name, "eager"), make(name, "eager")
    crossget.patch(model, r=0, method="crossget", towers=("vision", "text"))
    flags = dict(output_attentions=True, output_hidden_states=True)
    a, b = run(ref, **both(two), **flags), run(model, **both(two), **flags)
    for tower in ("vision_model_output", "text_model_output"):
        for field in ("attentions", "hidden_states"):
            got, want = getattr(getattr(b, tower), field), getattr(getattr(a, tower), field)
            assert len(got) == len(want)
            for x, y in zip(got, want, strict=True):
                assert x.shape == y.shape and torch.allclose(x, y, atol=1e-6), (tower, field)
    assert b.vision_model_output.attentions[0].shape == (3, 2, PATCHES, PATCHES)


# --------------------------------------------------------------------------- schedules, no protected patch
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name, two", KINDS)
def test_reduction_follows_the_schedule(name, two, method):
    model = make(name)
    inputs = both(two)
    ref = run(model, **inputs)
    crossget.patch(model, r={"vision": [10, 6, 30], "text": [3, 2, 2]}, method=method)
    out = run(model, **inputs, output_hidden_states=True)
    # nothing protected in the vision tower: 64 -> 54 -> 48 -> the clamp floor(48 / 2) = 24
    assert crossget.tokens_per_layer(model) == {"vision": [54, 48, 24], "text": [13, 11, 9]}
    st = crossget.states(model)
    assert [h.shape[1] for h in out.vision_model_output.hidden_states[1:]] == [54, 48, 24] == st["vision"].tokens
    assert not st["vision"].book.protected.any()
    assert torch.equal(st["vision"].size.sum(1), torch.full((3, 1), float(PATCHES)))
    assert out.vision_model_output.last_hidden_state.shape == (3, 24, 32)
    assert out.text_model_output.last_hidden_state.shape == ref.text_model_output.last_hidden_state.shape
    for field in ("image_embeds", "text_embeds"):
        cos = torch.cosine_similarity(getattr(out, field), getattr(ref, field))
        assert (cos > 0.5).all() and (cos < 1 - 1e-6).all(), field


def test_every_patch_may_merge():
    """P = 0: ``r`` is clamped to ``floor(N / 2)``, token 0 merges like any other."""
    model = make("SiglipVisionModel")
    crossget.patch(model, r=100, method="crossget", trace_sources=True)
    run(model, **images(False))
    st = crossget.states(model)["vision"]
    assert st.tokens == [32, 16, 8] == crossget.tokens_per_layer(model)["vision"]
    src = crossget.sources(model)  # [B, N_out, N0]
    holder = src[:, :, 0].int().argmax(-1)  # the output token that covers input token 0
    assert (src[torch.arange(len(src)), holder].sum(-1) > 1).all()  # input token 0 was merged with others


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name, two", KINDS)
def test_a_flops_target_is_met(name, two, method):
    model = make(name)
    crossget.patch(model, flops=0.7, method=method)
    cfg = crossget.config(model)
    assert cfg.flops_estimate <= 0.7 and sum(cfg.r["vision"]) > 0
    run(model.vision_model, **images(two, [(8, 8)] * 3))  # SigLIP2 padding may append padding to absorb merges (§4)
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"]
    assert torch.isfinite(run(model, **both(two)).logits_per_image).all()


@pytest.mark.parametrize("name, two", KINDS)
def test_the_cost_model_counts_the_stock_model(name, two):
    """The analytic FLOPs of both towers, pooling head and text head included, are what the
    FLOPs counter measures on the stock model (no padding: every patch is counted)."""
    model = make(name)
    fam = family_of(model)
    inputs = images(two, [(8, 8)] * 2) | {"input_ids": texts([16, 16])[0]}
    with torch.no_grad():
        measured = count_flops(model, **inputs) / 2
    cost = sum(fam.encoder_cost(t, k).flops() for k, t in siglip.find_towers(model).items())
    assert cost == pytest.approx(measured, rel=1e-3)


# --------------------------------------------------------------------------- text: the last token is pooled
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name, left", [("SiglipTextModel", False), ("Siglip2TextModel", True)])
def test_the_pooled_last_token_never_merges(name, left, method):
    model = make(name)
    ids, mask = texts([16, 9, 5], left=left)
    crossget.patch(model, r=4, method=method)
    out = run(model, input_ids=ids, attention_mask=mask)
    st = crossget.states(model)["text"]
    assert st.tokens == [12, 8, 5]
    assert out.last_hidden_state.shape == (3, TEXT_LEN, 32)
    assert torch.equal(out.pooler_output, model.head(out.last_hidden_state[:, -1]))
    tm = st.token_map
    for row in range(3):
        assert (tm[row] == tm[row, -1]).sum() == 1  # alone in its group
        real, pad = tm[row][mask[row].bool()], tm[row][~mask[row].bool()]
        assert not set(real.tolist()) & set(pad.tolist())  # padding never joins real text


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_text_without_a_mask_merges_padding_like_text(method):
    """SigLIP's own way (``padding="max_length"``, no mask): every position is a token."""
    model = make("SiglipTextModel")
    ids, _ = texts([16, 9, 5])
    crossget.patch(model, r=4, method=method)
    run(model, input_ids=ids)
    st = crossget.states(model)["text"]
    assert st.book.valid is None and st.tokens == [12, 8, 5]
    assert (st.token_map[:, -1:] == st.token_map).sum(-1).eq(1).all()


# --------------------------------------------------------------------------- proportional attention
def duplicated(x, sizes):
    """Token ``j`` of ``x`` ``[1, N, C]`` repeated ``sizes[j]`` times."""
    return x[0].repeat_interleave(sizes, dim=0).unsqueeze(0)


def merged_state(model, x, sizes, valid=None):
    """The vision state as if ``x`` ``[1, N, C]`` were tokens of ``sizes`` after a merge."""
    state = crossget.states(model)["vision"]
    state.input_valid = valid
    state.start(x)
    state.book.protected = torch.zeros_like(state.book.protected)
    state.book.size = sizes.float().view(1, -1, 1)
    state.book.valid = valid
    state.book.merged = True
    return state


def vision_of(model):
    return getattr(model, "vision_model", model)


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["SiglipVisionModel", "Siglip2VisionModel"])
def test_a_token_of_size_k_is_k_copies_through_a_patched_layer(name, impl, method):
    stock = make(name, impl)
    model = copy.deepcopy(stock)
    crossget.patch(model, r=0, method=method)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 12, 32, generator=g)
    sizes = torch.randint(1, 4, (12,), generator=g)
    merged_state(model, x, sizes)
    layer, ref = vision_of(model).encoder.layers[1], vision_of(stock).encoder.layers[1]
    with torch.no_grad():
        got = layer(x, None)
        want = ref(duplicated(x, sizes), None)
        plain = ref(x, None)
    first = torch.cumsum(sizes, 0) - sizes  # where each token's copies start
    assert torch.allclose(got[0], want[0, first], atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-3)  # the sizes matter here


@pytest.mark.parametrize("name", ["SiglipVisionModel", "Siglip2VisionModel"])
def test_a_token_of_size_k_is_k_copies_through_the_pooling_head(name):
    stock = make(name)
    model = copy.deepcopy(stock)
    crossget.patch(model, r=0, method="crossget")
    head, ref = vision_of(model).head, vision_of(stock).head
    assert type(head) in (siglip.CrossGETSiglipPoolingHead, siglip.CrossGETSiglip2PoolingHead)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 12, 32, generator=g)
    sizes = torch.randint(1, 5, (12,), generator=g)
    merged_state(model, x, sizes)
    with torch.no_grad():
        got = head(x)
        want = ref(duplicated(x, sizes))
        plain = ref(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    if name.startswith("Siglip2"):  # merged padding is masked, whatever mask the head is given
        valid = torch.ones(1, 12, dtype=torch.bool)
        valid[0, 9:] = False
        merged_state(model, torch.cat([x[:, :9], torch.randn(1, 3, 32, generator=g)], 1), sizes, valid)
        with torch.no_grad():
            padded = head(torch.cat([x[:, :9], torch.randn(1, 3, 32, generator=g)], 1), torch.ones(1, 30))
            real = ref(duplicated(x[:, :9], sizes[:9]))
        assert torch.allclose(padded, real, atol=1e-5)


def test_the_head_is_stock_for_other_tokens():
    """Tokens that are not the last forward's merged ones (another length) go through the stock head."""
    model = make("SiglipVisionModel")
    crossget.patch(model, r=8, method="crossget")
    run(model, **images(False))
    x = torch.randn(2, 7, 32)
    ref = make("SiglipVisionModel").head
    with torch.no_grad():
        assert torch.equal(model.head(x), ref(x))


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name, two", KINDS)
def test_a_sample_alone_equals_it_in_a_batch(name, two, method):
    """Text padded to the same length alone and in the batch (SigLIP right, SigLIP2 left);
    SigLIP2 images alone with only their own patches, in the batch padded to 64."""
    model = make(name)
    inputs = both(two)
    crossget.patch(model, r={"vision": [10, 6, 8], "text": [3, 2, 2]}, method=method)
    batch = run(model, **inputs)
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        if two:  # only the image's own patches: no padding at all
            n = int(inputs["pixel_attention_mask"][i].sum())
            one["pixel_values"], one["pixel_attention_mask"] = one["pixel_values"][:, :n], one["pixel_attention_mask"][:, :n]
        out = run(model, **one)
        assert torch.allclose(out.image_embeds, batch.image_embeds[i : i + 1], atol=1e-5)
        assert torch.allclose(out.text_embeds, batch.text_embeds[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_padded_patches_never_merge_with_real_ones(method):
    model = make("Siglip2VisionModel")
    inputs = patches(SHAPES)
    crossget.patch(model, r=[10, 6, 8], method=method, trace_sources=True)
    run(model, **inputs)
    st = crossget.states(model)["vision"]
    tm, mask = st.token_map, inputs["pixel_attention_mask"].bool()
    for row in range(3):
        real, pad = tm[row][mask[row]], tm[row][~mask[row]]
        assert not set(real.tolist()) & set(pad.tolist())
        assert int(st.book.valid[row].sum()) == len(set(real.tolist()))


# --------------------------------------------------------------------------- unpatch, copies
@pytest.mark.parametrize("name, two", KINDS)
def test_unpatch_restores_the_stock_model(name, two):
    model = make(name)
    inputs = both(two)
    ref = run(model, **inputs)
    n_params = len(list(model.parameters()))
    classes = {n: type(m) for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    crossget.patch(model, r=5, method="crossget", towers=("vision", "text"))
    assert len(list(model.parameters())) == n_params + 2
    assert type(model.vision_model.head) in (siglip.CrossGETSiglipPoolingHead, siglip.CrossGETSiglip2PoolingHead)
    crossget.patch(model, r=3, method="tome")  # re-patching does not stack anything
    crossget.unpatch(model)
    assert not crossget.is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert not any("_crossget" in m.__dict__ for m in model.modules())
    assert len(list(model.parameters())) == n_params
    out = run(model, **inputs)
    assert torch.equal(out.image_embeds, ref.image_embeds) and torch.equal(out.text_embeds, ref.text_embeds)


@pytest.mark.parametrize("name, two", KINDS)
def test_deepcopy_and_pickle_run_and_unpatch_on_their_own(name, two):
    model = make(name)
    inputs = both(two)
    ref = run(model, **inputs)
    crossget.patch(model, r=5, method="crossget", towers=("vision", "text"))
    with torch.no_grad():
        for st in crossget.states(model).values():
            st.cross_tokens.normal_()
    want = run(model, **inputs)
    twin = copy.deepcopy(model)
    got = run(twin, **inputs)
    assert torch.equal(got.image_embeds, want.image_embeds) and torch.equal(got.text_embeds, want.text_embeds)
    assert crossget.states(twin)["vision"] is not crossget.states(model)["vision"]
    assert record(twin.vision_model.head).state is crossget.states(twin)["vision"]
    crossget.unpatch(twin)
    assert torch.equal(run(twin, **inputs).image_embeds, ref.image_embeds)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(run(loaded, **inputs).image_embeds, want.image_embeds)
    assert torch.equal(run(model, **inputs).image_embeds, want.image_embeds)  # the original is untouched


# --------------------------------------------------------------------------- cross tokens, training
@pytest.mark.parametrize("name, two", KINDS)
def test_joint_projections_are_the_pooling_heads(name, two):
    model = make(name)
    fam = family_of(model)
    x = torch.randn(5, 32)
    v, t = fam.joint_projection(model, "vision"), fam.joint_projection(model, "text")
    with torch.no_grad():
        want_v = model.vision_model.head(model.vision_model.post_layernorm(x).unsqueeze(1))
        want_t = model.text_model.head(model.text_model.final_layer_norm(x))
    assert torch.allclose(v(x), want_v, atol=1e-5)
    assert torch.allclose(t(x), want_t, atol=1e-6)
    x.requires_grad_(True)
    v(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model.parameters())  # weights detached


@pytest.mark.parametrize("name, two", KINDS)
def test_a_training_step_reaches_the_cross_tokens(name, two):
    model = make(name).train()
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    for p in model.parameters():
        p.requires_grad_(False)
    thetas = [st.cross_tokens for st in crossget.states(model).values()]
    for t in thetas:
        t.requires_grad_(True)
    out = model(**both(two), return_loss=True)
    loss = 0.5 * out.loss + 0.5 * crossget.cross_token_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)


@pytest.mark.parametrize("name, two", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(name, two):
    inputs = both(two)

    def step(model):
        out = model(**inputs, return_loss=True)
        loss = out.loss + crossget.cross_token_loss(model)
        loss.backward()
        return loss.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (loss0, g0, _), (loss1, g1, _) = with_and_without_checkpointing(
            lambda: make(name, "eager"),
            lambda m: crossget.patch(m, r={"vision": [10, 6, 8], "text": [3, 2, 2]}, method="crossget"),
            step,
        )
    assert torch.equal(loss0, loss1)
    assert_same_grads(g0, g1)
    assert sum(n.endswith("crossget_cross_tokens") for n in g1) == 2


def test_bfloat16_runs():
    model = make("Siglip2Model").to(torch.bfloat16)
    inputs = both(True)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    crossget.patch(model, r=6, method="crossget", towers=("vision", "text"))
    out = run(model, **inputs)
    assert out.image_embeds.dtype == torch.bfloat16 and torch.isfinite(out.image_embeds).all()


# --------------------------------------------------------------------------- refused
def test_bad_inputs_are_refused_clearly():
    text = make("SiglipTextModel")
    crossget.patch(text, r=2)
    ids, mask = texts([16, 9])
    with pytest.raises(ValueError, match="needs input_ids"):
        text(attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask is"):
        text(input_ids=ids, attention_mask=mask[:, :8])
    with pytest.raises(ValueError, match=r"rows \[1\] without a single token"):
        text(input_ids=ids, attention_mask=torch.stack([mask[0], torch.zeros_like(mask[1])]))

    vision = make("Siglip2VisionModel")
    crossget.patch(vision, r=2)
    inputs = patches(SHAPES)
    with pytest.raises(ValueError, match="pixel_attention_mask must be"):
        vision(**inputs | {"pixel_attention_mask": inputs["pixel_attention_mask"][:, :10]})
    with pytest.raises(ValueError, match="spatial_shapes gives"):
        vision(**inputs | {"spatial_shapes": torch.tensor([[8, 8], [6, 5], [4, 6]])})
    empty = inputs["pixel_attention_mask"].clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"images \[2\] without a patch"):
        vision(**inputs | {"pixel_attention_mask": empty})


@pytest.mark.parametrize(
    "kw, error, match",
    [({"keep": 30}, ValueError, "keep= is not an option of the SigLIP family"),
     ({"fastv_layer": 3}, ValueError, "fastv_layer= is not an option of the SigLIP family"),
     ({"method": "fastv"}, ValueError, "for SigLIP models")],
)
def test_options_the_family_does_not_take(kw, error, match):
    model = make("SiglipModel")
    with pytest.raises(error, match=match):
        crossget.patch(model, **{"method": "crossget", "r": 2, **kw})
    assert not crossget.is_patched(model)


def test_an_unsupported_siglip_class_is_refused():
    with pytest.raises(TypeError, match="cannot patch SiglipForImageClassification"):
        crossget.patch(make("SiglipForImageClassification"), r=2)
