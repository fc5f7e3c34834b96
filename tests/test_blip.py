"""crossget.patch on BLIP and BLIP-2: exactness at r=0, generation, proportional cross-attention,
the BLIP text encoder, unpatching, errors, cross tokens."""

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2QFormerModel,
    Blip2VisionModel,
    Blip2VisionModelWithProjection,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipModel,
    BlipVisionModel,
)
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

import crossget
from crossget.families.blip import (
    BlipTextCrossAttention,
    CrossGETBlipAttention,
    CrossGETBlipEncoderLayer,
    CrossGETBlipTextLayer,
    encoder_bias,
)
from crossget.families.blip2 import CrossGETBlip2EncoderLayer

BOS, SEP, ENC, PAD = 50, 51, 52, 0
N_IMAGE = 65  # 32 px / 4 px patches + CLS
METHODS = ["none", "tome", "crossget"]


# --------------------------------------------------------------------------- tiny models
def blip_config() -> BlipConfig:
    return BlipConfig(
        text_config=dict(
            vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, encoder_hidden_size=32, bos_token_id=BOS, sep_token_id=SEP,
            pad_token_id=PAD, eos_token_id=SEP, initializer_range=0.2,
        ),
        # BLIP's vision default initializer_range is 1e-10: every image would look alike
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=4, initializer_range=0.2,
        ),
        image_text_hidden_size=16,
    )


def make_blip(cls, seed: int = 0):
    torch.manual_seed(seed)
    cfg = blip_config()
    return (cls(cfg.vision_config) if cls is BlipVisionModel else cls(cfg)).eval()


def blip2_config() -> Blip2Config:
    return Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=4, initializer_range=0.2,
        ),
        qformer_config=dict(
            vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            encoder_hidden_size=32, max_position_embeddings=32, initializer_range=0.2, use_qformer_text_input=True,
        ),
        text_config=dict(
            model_type="opt", vocab_size=60, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            init_std=0.2,
        ),
        num_query_tokens=4,
        image_token_index=59,
        image_text_hidden_size=16,
    )


def make_blip2(cls, impl: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = blip2_config()
    model = (cls(cfg.vision_config) if cls is Blip2VisionModel else cls(cfg)).eval()
    model.set_attn_implementation(impl)
    return model


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def texts(lengths=(12, 8, 5), total: int = 12, first: int = ENC):
    """input_ids / attention_mask: [first], random words, then padding."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((len(lengths), total), PAD)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = first
        ids[i, 1:n] = torch.randint(1, 49, (n - 1,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def restored(x, token_map):
    """Every input position gets the merged token covering it: ``[B, N0, C]``."""
    return x.gather(1, token_map.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


GEN = dict(max_new_tokens=5, min_new_tokens=5)
BEAMS = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)


# --------------------------------------------------------------------------- r = 0 is exact
def blip_outputs(model, pixels):
    """Every output a BLIP class gives, run in a fixed order."""
    ids, mask = texts()
    with torch.no_grad():
        if isinstance(model, BlipVisionModel):
            out = model(pixel_values=pixels)
            return [out.last_hidden_state, out.pooler_output]
        if isinstance(model, BlipForImageTextRetrieval):
            itm = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
            itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
            return [itm.itm_score, itm.question_embeds, itc.itm_score]
        if isinstance(model, BlipForQuestionAnswering):
            labels = texts((5, 5, 5), 5, BOS)[0]
            full = torch.ones_like(mask)  # padded questions: see test_vqa_answer_decoder_honours_question_padding
            loss = model(input_ids=ids, pixel_values=pixels, attention_mask=full, labels=labels).loss
            return [loss, model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **GEN),
                    model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **BEAMS)]
        prompt = texts((4, 4, 4), 4, BOS)[0]
        return [model(pixel_values=pixels, input_ids=prompt).logits,
                model.generate(pixel_values=pixels, **GEN), model.generate(pixel_values=pixels, **BEAMS)]


def assert_same(outs, refs):
    for out, ref in zip(outs, refs, strict=True):
        if ref.dtype == torch.long:
            assert torch.equal(out, ref)
        else:
            assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


BLIP_CLASSES = [BlipForConditionalGeneration, BlipForQuestionAnswering, BlipForImageTextRetrieval, BlipVisionModel]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls", BLIP_CLASSES)
def test_blip_r0_equals_unpatched(cls, method, pixels):
    model = make_blip(cls)
    refs = blip_outputs(model, pixels)
    towers = ("vision", "text") if hasattr(model, "text_encoder") else ("vision",)
    crossget.patch(model, r=0, method=method, towers=towers)
    assert_same(blip_outputs(model, pixels), refs)


def blip2_outputs(model, pixels):
    ids, mask = texts(first=5)
    with torch.no_grad():
        if isinstance(model, Blip2VisionModel):
            out = model(pixel_values=pixels)
            return [out.last_hidden_state, out.pooler_output]
        if isinstance(model, Blip2VisionModelWithProjection):
            return [model(pixel_values=pixels).image_embeds]
        if isinstance(model, Blip2ForImageTextRetrieval):
            itm = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
            itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            return [itm.logits_per_image, itc.logits_per_image, itc.image_embeds]
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        if isinstance(model, Blip2Model):
            return [feats]
        return [feats, model.generate(pixel_values=pixels, **GEN), model.generate(pixel_values=pixels, **BEAMS)]


BLIP2_CLASSES = [
    Blip2ForConditionalGeneration, Blip2Model, Blip2ForImageTextRetrieval, Blip2VisionModelWithProjection,
    Blip2VisionModel,
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls", BLIP2_CLASSES)
def test_blip2_r0_equals_unpatched(cls, method, impl, pixels):
    model = make_blip2(cls, impl)
    refs = blip2_outputs(model, pixels)
    crossget.patch(model, r=0, method=method)
    assert_same(blip2_outputs(model, pixels), refs)


# --------------------------------------------------------------------------- reduced runs
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("cls", BLIP_CLASSES)
def test_blip_reduced_keeps_shapes(cls, method, pixels):
    model = make_blip(cls)
    refs = blip_outputs(model, pixels)
    towers = ("vision", "text") if hasattr(model, "text_encoder") else ("vision",)
    r = {"vision": [10, 6, 30], "text": 3}
    crossget.patch(model, r={k: r[k] for k in towers}, method=method, towers=towers)
    outs = blip_outputs(model, pixels)
    for out, ref in zip(outs, refs, strict=True):
        skip = isinstance(model, BlipVisionModel) and out is outs[0]  # the merged tokens themselves
        assert skip or out.shape == ref.shape
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"] == [55, 49, 25]
    if not isinstance(model, BlipVisionModel):
        floats = [(o, r) for o, r in zip(outs, refs) if o.dtype != torch.long]
        assert all(not torch.allclose(o, r, atol=1e-4) for o, r in floats)  # merging changed them


@pytest.mark.parametrize("kwargs", [GEN, BEAMS, dict(max_new_tokens=5, num_beams=2)])
def test_blip_caption_generation_same_with_and_without_cache(kwargs, pixels):
    model = make_blip(BlipForConditionalGeneration)
    crossget.patch(model, r=12, method="crossget")
    with torch.no_grad():
        cached = model.generate(pixel_values=pixels, **kwargs)
        uncached = model.generate(pixel_values=pixels, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[0] == 3 * kwargs.get("num_return_sequences", 1)


def test_vqa_generation_same_with_and_without_cache(pixels):
    model = make_blip(BlipForQuestionAnswering)
    ids, mask = texts()
    crossget.patch(model, r=3, method="crossget", towers=("vision", "text"))
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **BEAMS)
        uncached = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=False, **BEAMS)
    assert torch.equal(cached, uncached) and cached.shape[0] == 6
    assert crossget.states(model)["text"].merged


def test_blip2_generation_same_with_and_without_cache(pixels):
    model = make_blip2(Blip2ForConditionalGeneration)
    crossget.patch(model, r=12, method="tome")
    for kwargs in (GEN, BEAMS):
        with torch.no_grad():
            cached = model.generate(pixel_values=pixels, **kwargs)
            uncached = model.generate(pixel_values=pixels, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------- proportional cross-attention
def duplicated(embeds, sizes):
    """Each token of ``embeds`` ``[B, K, C]`` repeated ``sizes[b, k]`` times (equal totals per row)."""
    return torch.stack([e.repeat_interleave(s, dim=0) for e, s in zip(embeds, sizes)])


def sizes_and_bias(b: int, k: int):
    g = torch.Generator().manual_seed(3)
    sizes = torch.stack([torch.randperm(k, generator=g) % 4 + 1 for _ in range(b)])  # equal totals per row
    return sizes, sizes.float().log()[:, None, None, :]


def test_blip_text_cross_attention_honours_the_size_bias():
    model = make_blip(BlipForConditionalGeneration)
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4)) * 3
    sizes, bias = sizes_and_bias(2, 9)
    prompt = texts((4, 4), 4, BOS)[0]
    with torch.no_grad():
        stock_bias = model.text_decoder(input_ids=prompt, encoder_hidden_states=embeds, encoder_attention_mask=bias).logits
        crossget.patch(model, r=0, method="none")  # installs the cross-attention fix
        merged = model.text_decoder(input_ids=prompt, encoder_hidden_states=embeds, encoder_attention_mask=bias).logits
        dup = model.text_decoder(
            input_ids=prompt, encoder_hidden_states=duplicated(embeds, sizes),
            encoder_attention_mask=torch.ones(2, int(sizes[0].sum()), dtype=torch.long),
        ).logits
        plain = model.text_decoder(input_ids=prompt, encoder_hidden_states=embeds).logits
    assert torch.allclose(merged, dup, atol=1e-5)  # k copies == one token of size k with log(k)
    assert not torch.allclose(plain, dup, atol=1e-3)  # the bias matters here
    assert torch.allclose(stock_bias, plain, atol=1e-6)  # upstream drops the mask (the bug)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qformer_honours_the_size_bias(impl):
    model = make_blip2(Blip2Model, impl)
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4)) * 3
    sizes, bias = sizes_and_bias(2, 9)
    queries = model.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        merged = model.qformer(query_embeds=queries, encoder_hidden_states=embeds, encoder_attention_mask=bias)
        dup = model.qformer(query_embeds=queries, encoder_hidden_states=duplicated(embeds, sizes))
        plain = model.qformer(query_embeds=queries, encoder_hidden_states=embeds)
    assert torch.allclose(merged.last_hidden_state, dup.last_hidden_state, atol=1e-5)
    assert not torch.allclose(plain.last_hidden_state, dup.last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("kwargs", [GEN, BEAMS])
def test_blip_caption_equals_decoder_on_unmerged_copies(kwargs, pixels):
    """End to end, through generate's beam / num_return_sequences expansion: the patched
    captioner equals the decoder reading every image position's merged token (each merged
    token present ``size`` times)."""
    model = make_blip(BlipForConditionalGeneration)
    kwargs = dict(kwargs, output_scores=True, return_dict_in_generate=True)
    crossget.patch(model, r=[10, 6, 8], method="crossget", trace_sources=True)
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, **kwargs)
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        full = restored(image, crossget.states(model)["vision"].token_map)
        bos = torch.full((3, 1), BOS)
        ref = model.text_decoder.generate(
            input_ids=bos, encoder_hidden_states=full, encoder_attention_mask=torch.ones(3, N_IMAGE, dtype=torch.long),
            eos_token_id=SEP, pad_token_id=PAD, **kwargs,
        )
        crossget.patch(model, r=[10, 6, 8], method="crossget", prop_attn=False, trace_sources=True)
        no_bias = model.generate(pixel_values=pixels, **kwargs)
    assert image.shape[1] == 41
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert not all(torch.allclose(a, c, atol=1e-3) for a, c in zip(out.scores, no_bias.scores))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_blip2_qformer_equals_unmerged_copies(impl, pixels):
    model = make_blip2(Blip2ForConditionalGeneration, impl)
    crossget.patch(model, r=[10, 6, 8], trace_sources=True)
    queries = model.query_tokens.expand(3, -1, -1)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
        full = restored(feats.last_hidden_state, crossget.states(model)["vision"].token_map)
        ref = model.qformer(query_embeds=queries, encoder_hidden_states=full)
        plain = model.qformer(query_embeds=queries, encoder_hidden_states=feats.last_hidden_state.clone())
    out = feats.qformer_outputs.last_hidden_state
    assert feats.last_hidden_state.shape[1] == 41
    assert torch.allclose(out, ref.last_hidden_state, atol=1e-5)
    assert not torch.allclose(out, plain.last_hidden_state, atol=1e-3)  # a copy is not recognised: no bias


def test_vqa_answer_decoder_honours_question_padding(pixels):
    """Upstream lets the answer decoder attend to padded question tokens (notes §4.3); patched,
    what the padding holds no longer matters."""
    model = make_blip(BlipForQuestionAnswering)
    ids, mask = texts()
    other = ids.masked_fill(mask == 0, 7)
    labels = texts((5, 5, 5), 5, BOS)[0]

    def loss(i):
        with torch.no_grad():
            return model(input_ids=i, pixel_values=pixels, attention_mask=mask, labels=labels).loss

    assert not torch.allclose(loss(ids), loss(other), atol=1e-6)
    crossget.patch(model, r=0, method="none", towers=("vision", "text"))
    assert torch.allclose(loss(ids), loss(other), atol=1e-6)


# --------------------------------------------------------------------------- the text encoder
def test_itm_text_encoder_protects_cls_and_keeps_padding_apart(pixels):
    model = make_blip(BlipForImageTextRetrieval)
    ids, mask = texts()
    crossget.patch(model, r=3, method="crossget", towers=("vision", "text"))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    st = crossget.states(model)["text"]
    assert st.tokens == [9, 6] and out.question_embeds.shape == (3, 12, 32)
    tm = st.token_map
    for row in range(3):
        assert (tm[row] == tm[row, 0]).sum() == 1 and tm[row, 0] == 0  # [ENC] alone, first
        real, pad = tm[row][mask[row].bool()], tm[row][~mask[row].bool()]
        assert not set(real.tolist()) & set(pad.tolist())
    assert len(st.cross_outputs) == 2  # the text cross token ran through both layers
    # each sample alone equals the batch
    for i in range(3):
        with torch.no_grad():
            one = model(input_ids=ids[i : i + 1], pixel_values=pixels[i : i + 1], attention_mask=mask[i : i + 1])
        assert torch.allclose(one.itm_score, out.itm_score[i : i + 1], atol=1e-5)


def test_text_reduction_alone_leaves_the_vision_tower_stock(pixels):
    model = make_blip(BlipForImageTextRetrieval)
    ids, mask = texts()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        crossget.patch(model, r=3, method="tome", towers=("text",))
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)  # vision not reduced
    assert not torch.allclose(out.itm_score, ref.itm_score, atol=1e-5)
    assert "vision" not in crossget.states(model)


# --------------------------------------------------------------------------- patch management
def test_unpatch_restores_the_stock_model(pixels):
    model = make_blip(BlipForQuestionAnswering)
    refs = blip_outputs(model, pixels)
    n_params = len(list(model.parameters()))
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    assert len(list(model.parameters())) == n_params + 2
    assert isinstance(model.vision_model.encoder.layers[0], CrossGETBlipEncoderLayer)
    assert isinstance(model.vision_model.encoder.layers[0].self_attn, CrossGETBlipAttention)
    assert isinstance(model.text_encoder.encoder.layer[0], CrossGETBlipTextLayer)
    assert type(model.text_decoder.bert.encoder.layer[0].crossattention.self) is BlipTextCrossAttention
    assert "generate" in model.text_decoder.__dict__
    crossget.patch(model, r=2, method="tome", towers=("vision", "text"))  # reconfigure: nothing stacks
    assert len(model.text_encoder._forward_pre_hooks) == 2  # tower inputs + bias injection
    crossget.unpatch(model)
    assert not crossget.is_patched(model)
    for m in model.modules():
        assert not type(m).__name__.startswith(("CrossGET", "BlipTextCross")), type(m)
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not any(k.startswith("_crossget") for k in m.__dict__)
    assert type(model.text_decoder.bert.encoder.layer[0].crossattention.self) is BlipTextSelfAttention
    assert "generate" not in model.text_decoder.__dict__
    assert len(list(model.parameters())) == n_params
    outs = blip_outputs(model, pixels)
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)


def test_unpatch_blip2(pixels):
    model = make_blip2(Blip2ForConditionalGeneration)
    refs = blip2_outputs(model, pixels)
    crossget.patch(model, r=6, method="crossget")
    assert isinstance(model.vision_model.encoder.layers[0], CrossGETBlip2EncoderLayer)
    assert model.qformer._forward_pre_hooks
    crossget.unpatch(model)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not type(m).__name__.startswith("CrossGET")
    for out, ref in zip(blip2_outputs(model, pixels), refs):
        assert torch.equal(out, ref)


def test_flops_target_on_blip(pixels):
    from crossget.flops import count_flops

    model = make_blip(BlipForConditionalGeneration)
    with torch.no_grad():
        base = count_flops(model.vision_model, pixel_values=pixels[:1])
        crossget.patch(model, flops=0.6, method="tome")
        reduced = count_flops(model.vision_model, pixel_values=pixels[:1])
    cfg = crossget.config(model).to_dict()
    assert set(cfg["r"]) == {"vision"} and 0.5 < cfg["flops_estimate"] <= 0.6
    assert abs(reduced / base - cfg["flops_estimate"]) < 0.05  # the analytic model tracks measured FLOPs
    itm = make_blip(BlipForImageTextRetrieval)
    crossget.patch(itm, flops=0.75, towers=("vision", "text"))
    assert set(crossget.config(itm).to_dict()["r"]) == {"vision", "text"}


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (BlipForConditionalGeneration, dict(r=2, towers=("text",)), "text"),
        (BlipForConditionalGeneration, dict(r=[1, 2]), "2 entries"),
        (BlipForImageTextRetrieval, dict(r={"vision": 2, "text": -1}, towers=("vision", "text")), "-1"),
        (BlipForQuestionAnswering, dict(r=2, method="fast"), "fast"),
    ],
)
def test_bad_arguments_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        crossget.patch(make_blip(cls), **kwargs)


@pytest.mark.parametrize("model", [
    lambda: BlipModel(blip_config()),
    lambda: Blip2QFormerModel(blip2_config().qformer_config),
])
def test_unsupported_blip_classes_raise_type_error(model):
    with pytest.raises(TypeError, match="BlipForConditionalGeneration"):
        crossget.patch(model(), r=2)


def test_bad_inputs_raise_clear_errors(pixels):
    model = make_blip(BlipForImageTextRetrieval)
    ids, mask = texts()
    crossget.patch(model, r=2, towers=("vision", "text"))
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask[:, None, None, :])
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        encoder_bias(model.vision_model, image, torch.ones(3, 5), torch.float32)


# --------------------------------------------------------------------------- cross tokens
def test_itm_cross_token_loss_trains_and_save_load(tmp_path, pixels):
    model = make_blip(BlipForImageTextRetrieval)
    ids, mask = texts()
    crossget.patch(model, r=[4, 3, 2], method="crossget", towers=("vision",))
    thetas = [st.cross_tokens for st in crossget.states(model).values()]
    assert [tuple(t.shape) for t in thetas] == [(3, 32), (2, 32)]  # the text tower runs its cross tokens at r=0
    model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
    loss = crossget.cross_token_loss(model)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)
    with torch.no_grad():
        for t in thetas:
            t.normal_()
    path = tmp_path / "blip.safetensors"
    crossget.save_cross_tokens(model, path)
    other = make_blip(BlipForImageTextRetrieval)
    crossget.load_cross_tokens(other, path)
    assert crossget.config(other).to_dict()["r"] == {"vision": [4, 3, 2]}
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
        b = other(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
    assert torch.equal(a, b)


def test_cross_tokens_steer_the_merges(pixels):
    """theta != 0 changes which tokens merge (importance), theta = 0 is training-free."""
    model = make_blip(BlipVisionModel)
    crossget.patch(model, r=8, method="crossget", trace_sources=True)
    with torch.no_grad():
        model(pixel_values=pixels)
        before = crossget.sources(model).clone()
        crossget.states(model)["vision"].cross_tokens.normal_(std=5.0)
        model(pixel_values=pixels)
    assert not torch.equal(before, crossget.sources(model))


# --------------------------------------------------------------------------- benchmark architectures
@pytest.mark.parametrize("spec, prompt", [("blip-tiny", 1), ("blip2-tiny", 4 + 1)])
def test_bench_captioning_architectures(spec, prompt):
    from crossget.tools.bench import forward_for, make_inputs, run_benchmark
    from crossget.tools.zoo import load_model

    model = load_model(spec, "caption")
    inputs = make_inputs(model, "caption", batch=2)
    forward = forward_for(model, "caption", max_new_tokens=3)
    with torch.no_grad():
        assert forward(model, inputs).shape == (2, prompt + 3)  # exactly max_new_tokens, EOS or not
    rows = run_benchmark(model, inputs, [{"method": "tome", "r": 2}, {"method": "crossget", "r": 2}], rounds=1,
                         warmup=0, threads=None, forward=forward, latency=False, progress=False)
    assert [r["tokens_per_layer"] for r in rows] == [{}, {"vision": [15, 13]}, {"vision": [15, 13]}]
    assert rows[1]["gflops_ratio"] < 1
    assert not crossget.is_patched(model)
    assert isinstance(load_model(spec, "vision"), (BlipVisionModel, Blip2VisionModel))
    with pytest.raises(ValueError, match="caption"):
        load_model(spec, "text")
    with pytest.raises(ValueError, match="captioning architecture"):
        load_model("clip-tiny", "caption")


@pytest.mark.parametrize("cls", [BlipForConditionalGeneration, Blip2ForConditionalGeneration])
def test_bfloat16_generation_runs(cls, pixels):
    model = (make_blip(cls) if cls is BlipForConditionalGeneration else make_blip2(cls)).to(torch.bfloat16)
    crossget.patch(model, r=8, method="crossget")
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels.to(torch.bfloat16), **BEAMS)
    assert ids.shape[0] == 6
    assert crossget.states(model)["vision"].cross_tokens.dtype == torch.bfloat16


def test_cross_token_loss_without_joint_space_says_so(pixels):
    model = make_blip(BlipForQuestionAnswering)
    ids, mask = texts()
    crossget.patch(model, r=3, method="crossget", towers=("vision", "text"))
    with torch.no_grad():
        model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **BEAMS)
    with pytest.raises(ValueError, match="joint image-text space"):
        crossget.cross_token_loss(model)
