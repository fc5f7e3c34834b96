"""BERT / RoBERTa text towers and VisionTextDualEncoderModel (CLIP and ViT vision towers):
r = 0 is the stock model, the schedule, [CLS] protected, proportional attention through a
patched BERT layer, padding, unpatching, copies, the cross-token loss and refused inputs."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    RobertaConfig,
    RobertaModel,
    VisionTextDualEncoderModel,
    ViTConfig,
    ViTModel,
)

import crossget
from crossget.families.registry import family_of

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32)


def make_text(cls=BertModel, impl="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = (RobertaConfig if cls is RobertaModel else BertConfig)(**TEXT, **kw)
    model = cls(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def make_vision(kind):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=4)
    return CLIPVisionModel(CLIPVisionConfig(**common)) if kind == "clip" else ViTModel(ViTConfig(**common))


def make_dual(vision="clip", impl="sdpa", seed=0):
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(vision_model=make_vision(vision), text_model=BertModel(BertConfig(**TEXT)))
    model.eval()
    model.set_attn_implementation(impl)
    return model


def texts(lengths=(7, 10), n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), n), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
        ids[i, k:] = 0
    return ids, mask


def run_dual(m, **kw):
    ids, mask = texts()
    return m(input_ids=ids, attention_mask=mask, pixel_values=PIXELS, **kw)


def run_text(m, **kw):
    ids, mask = texts()
    return m(input_ids=ids, attention_mask=mask, **kw)


BUILDS = {
    "bert": lambda impl: make_text(BertModel, impl),
    "roberta": lambda impl: make_text(RobertaModel, impl, pad_token_id=1),
    "dual-clip": lambda impl: make_dual("clip", impl),
    "dual-vit": lambda impl: make_dual("vit", impl),
}


def outputs(name, m):
    with torch.no_grad():
        if name.startswith("dual"):
            out = run_dual(m, output_hidden_states=True, output_attentions=True)
            t = out.text_model_output
            return [out.logits_per_image, t.last_hidden_state, *t.hidden_states, *t.attentions]
        out = run_text(m, output_hidden_states=True, output_attentions=True)
        return [out.last_hidden_state, out.pooler_output, *out.hidden_states, *out.attentions]


# --------------------------------------------------------------------------- stock at r = 0
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(BUILDS))
def test_r0_is_the_stock_model(name, impl, method):
    stock = BUILDS[name](impl)
    model = copy.deepcopy(stock)
    towers = ("vision", "text") if name.startswith("dual") else None
    crossget.patch(model, method=method, r=0, towers=towers)
    assert type(model.text_model if name.startswith("dual") else model).__name__ in ("BertModel", "RobertaModel")
    for got, want in zip(outputs(name, model), outputs(name, stock), strict=True):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_default_towers():
    model, text = make_dual(), make_text()
    crossget.patch(model, method="tome", r=1)
    crossget.patch(text, method="tome", r=1)
    assert crossget.config(model).towers == ("vision",) and crossget.config(text).towers == ("text",)


# --------------------------------------------------------------------------- schedule, [CLS]
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_both_towers_follow_the_schedule(vision, method):
    model = make_dual(vision)
    crossget.patch(model, method=method, r={"vision": 3, "text": 2}, towers=("vision", "text"))
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=PIXELS)
    st = crossget.states(model)
    assert st["vision"].tokens == [62, 59, 56]
    assert st["text"].tokens == [8, 6]
    assert out.text_model_output.last_hidden_state.shape == (2, 10, 32)  # full length again
    assert (st["text"].token_map == 0).sum(-1).eq(1).all()  # [CLS] alone, at position 0
    assert st["text"].token_map[:, 0].eq(0).all() and st["text"].size[:, 0].eq(1).all()


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_cls_never_merges_and_the_pooler_reads_it(method):
    model = make_text()
    crossget.patch(model, method=method, r=2)
    ids = torch.full((1, 10), 7)  # all tokens alike: [CLS] would merge first if it could
    ids[0, 0] = 2
    with torch.no_grad():
        out = model(input_ids=ids)
    st = crossget.states(model)["text"]
    assert st.tokens == [8, 6]
    assert (st.token_map == 0).sum(-1).eq(1).all()
    pooled = model.pooler.activation(model.pooler.dense(out.last_hidden_state[:, 0]))
    assert torch.allclose(out.pooler_output, pooled)


# --------------------------------------------------------------------------- proportional attention
def duplicated(x, sizes):
    return x[0].repeat_interleave(sizes, dim=0).unsqueeze(0)


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_token_of_size_k_is_k_copies_through_a_patched_bert_layer(impl, method):
    stock = make_text(impl=impl)
    model = copy.deepcopy(stock)
    crossget.patch(model, method=method, r=0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 12, 32, generator=g)
    sizes = torch.randint(1, 4, (12,), generator=g)
    state = crossget.states(model)["text"]
    state.input_valid = None
    state.start(x)
    state.book.size = sizes.float().view(1, -1, 1)
    state.book.merged = True
    layer, ref = model.encoder.layer[1], stock.encoder.layer[1]
    with torch.no_grad():
        got = layer(x, None)
        want = ref(duplicated(x, sizes), None)
        plain = ref(x, None)
    first = torch.cumsum(sizes, 0) - sizes
    assert torch.allclose(got[0], want[0, first], atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-3)


# --------------------------------------------------------------------------- padding
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_caption_alone_equals_it_in_a_padded_batch(impl, method):
    model = make_text(impl=impl)
    crossget.patch(model, method=method, r=2)
    ids, mask = texts(lengths=(6, 10))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask)
        alone = model(input_ids=ids[:1, :6], attention_mask=mask[:1, :6])
    assert torch.allclose(batch.pooler_output[0], alone.pooler_output[0], atol=1e-5)
    assert torch.allclose(batch.last_hidden_state[0, :6], alone.last_hidden_state[0], atol=1e-5)


# --------------------------------------------------------------------------- unpatch, copies
@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_unpatch_restores_the_stock_model(vision):
    stock = make_dual(vision)
    model = copy.deepcopy(stock)
    crossget.patch(model, method="crossget", r=2, towers=("vision", "text"))
    crossget.unpatch(model)
    assert not crossget.is_patched(model)
    assert type(model.text_model.encoder.layer[0]) is type(stock.text_model.encoder.layer[0])
    assert type(model.text_model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert set(model.state_dict()) == set(stock.state_dict())
    for got, want in zip(outputs("dual", model), outputs("dual", stock), strict=True):
        assert torch.equal(got, want)


def test_deepcopy_and_state_dict():
    model = make_dual("vit")
    crossget.patch(model, method="crossget", r=2, towers=("vision", "text"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a, b = run_dual(model).logits_per_image, run_dual(twin).logits_per_image
    assert torch.equal(a, b)
    assert set(model.state_dict()) == set(make_dual("vit").state_dict())


# --------------------------------------------------------------------------- loss, checkpointing
@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_cross_token_loss_reaches_the_cross_tokens(vision):
    model = make_dual(vision)
    crossget.patch(model, method="crossget", r=2, towers=("vision", "text"))
    run_dual(model)
    loss = crossget.cross_token_loss(model)
    loss.backward()
    thetas = [p for n, p in model.named_parameters() if n.endswith("crossget_cross_tokens")]
    assert len(thetas) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in thetas)
    # the projections into the joint space are detached
    detached = [model.visual_projection, model.text_projection, model.text_model.pooler.dense]
    assert all(p.grad is None for m in detached for p in m.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(ckpt):
        model = make_text()
        crossget.patch(model, method="crossget", r=2)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        run_text(model).pooler_output.sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_flops_budget():
    model = make_dual("clip")
    crossget.patch(model, method="crossget", flops=0.7, towers=("vision", "text"), text_len=10)
    cfg = crossget.config(model)
    assert cfg.flops_estimate is not None and cfg.flops_estimate <= 0.71
    assert family_of(model).encoder_cost(model.text_model, "text").n_tokens == 32


# --------------------------------------------------------------------------- refused
def test_bad_inputs_are_refused():
    model = make_text()
    crossget.patch(model, method="tome", r=1)
    ids, mask = texts()
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(input_ids=ids, encoder_hidden_states=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="decoder"):
        crossget.patch(make_text(is_decoder=True), method="tome", r=1)
    with pytest.raises(ValueError, match="towers must name"):
        crossget.patch(make_text(), method="tome", r=1, towers=("vision",))
    dual = make_dual("clip")
    crossget.patch(dual, method="tome", r=1, towers=("vision", "text"))
    run_dual(dual)
    with pytest.raises(ValueError, match="both towers"):
        crossget.cross_token_loss(dual)
    tome = make_text()
    crossget.patch(tome, method="crossget", r=1)
    run_text(tome)
    with pytest.raises(ValueError):
        crossget.cross_token_loss(tome)


def test_a_siglip_vision_tower_is_reduced_but_has_no_single_token_projection():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=32, patch_size=4))
    stock = VisionTextDualEncoderModel(vision_model=vision, text_model=BertModel(BertConfig(**TEXT))).eval()
    model = copy.deepcopy(stock)
    crossget.patch(model, method="crossget", r=0, towers=("vision", "text"))
    with torch.no_grad():
        assert torch.allclose(run_dual(model).logits_per_image, run_dual(stock).logits_per_image, atol=1e-5)
    crossget.patch(model, method="crossget", r=2, towers=("vision", "text"))
    with torch.no_grad():
        run_dual(model)
    assert crossget.states(model)["vision"].tokens == [62, 60]
    with pytest.raises(ValueError, match="joint image-text space"):
        crossget.cross_token_loss(model)
    crossget.unpatch(model)
    with torch.no_grad():
        assert torch.equal(run_dual(model).logits_per_image, run_dual(stock).logits_per_image)


def test_a_vision_model_of_no_family_is_refused():
    model = VisionTextDualEncoderModel(vision_model=make_text(), text_model=make_text())
    with pytest.raises(TypeError, match="not a vision tower"):
        crossget.patch(model, method="tome", r=1)


@pytest.mark.parametrize("vision", ["clip", "vit"])
def test_the_projections_are_the_pooled_paths_for_one_token(vision):
    model = make_dual(vision)
    fam = family_of(model)
    ids, mask = texts()
    with torch.no_grad():
        seen = model.vision_model(pixel_values=PIXELS, output_hidden_states=True)
        image = model.get_image_features(pixel_values=PIXELS).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        words = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        # the encoder's last layer output (before any final norm), as the cross tokens are
        assert torch.allclose(fam.joint_projection(model, "vision")(seen.hidden_states[-1][:, 0]), image, atol=1e-5)
        assert torch.allclose(fam.joint_projection(model, "text")(words[:, 0]), text, atol=1e-5)
    assert fam.joint_projection(make_text(), "text") is None
