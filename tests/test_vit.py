"""crossget.patch on ViT-style vision encoders (ViT, DeiT, DINOv2, DINOv2 with registers) and
their classification heads: exactness at r=0, schedules, protected special tokens, proportional
attention, batching, copies, Hugging Face switches, pooling and errors."""

import copy
import io

import pytest
import torch
from test_hf_behaviour import assert_same_grads, with_and_without_checkpointing
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import crossget
from crossget.families import vit
from crossget.families.registry import family_of

REGISTERS = 4
COMMON = dict(hidden_size=32, num_attention_heads=2, image_size=32, num_labels=5)
CONFIGS = {
    "vit": (ViTConfig, dict(intermediate_size=64)),
    "deit": (DeiTConfig, dict(intermediate_size=64)),
    # layer scale and drop path not the identity: upstream's math around the merge is kept
    "dinov2": (Dinov2Config, dict(mlp_ratio=2, layerscale_value=0.5, drop_path_rate=0.1)),
    "dinov2_reg": (Dinov2WithRegistersConfig, dict(mlp_ratio=2, layerscale_value=0.5, drop_path_rate=0.1,
                                                    num_register_tokens=REGISTERS)),
    "dinov2_swiglu": (Dinov2Config, dict(mlp_ratio=2, use_swiglu_ffn=True)),
}
BACKBONES = {"vit": ViTModel, "deit": DeiTModel, "dinov2": Dinov2Model, "dinov2_reg": Dinov2WithRegistersModel,
             "dinov2_swiglu": Dinov2Model}
HEADS = {
    "ViTForImageClassification": ("vit", ViTForImageClassification),
    "DeiTForImageClassification": ("deit", DeiTForImageClassification),
    "DeiTForImageClassificationWithTeacher": ("deit", DeiTForImageClassificationWithTeacher),
    "Dinov2ForImageClassification": ("dinov2", Dinov2ForImageClassification),
    "Dinov2WithRegistersForImageClassification": ("dinov2_reg", Dinov2WithRegistersForImageClassification),
}
PROTECTED = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_reg": 1 + REGISTERS, "dinov2_swiglu": 1}
METHODS = ["none", "tome", "crossget"]


def config(kind, layers=3, patch=4, **kw):
    cfg_class, extra = CONFIGS[kind]
    return cfg_class(**COMMON, **extra, num_hidden_layers=layers, patch_size=patch, **kw)


def make(kind, cls=None, impl="sdpa", seed=0, **kw):
    """A tiny random model: ``cls`` (default the backbone) of family member ``kind``."""
    torch.manual_seed(seed)
    model = (cls or BACKBONES[kind])(config(kind, **kw)).eval()
    model.set_attn_implementation(impl)
    return model


def make_head(name, impl="sdpa", **kw):
    kind, cls = HEADS[name]
    return make(kind, cls, impl, **kw)


def backbone(model):
    return vit._backbone(model)


def run(model, pixels, **kw):
    with torch.no_grad():
        return model(pixel_values=pixels, **kw)


pytestmark = pytest.mark.usefixtures("quiet_warnings")


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_r0_equals_stock(kind, method, impl, pixels):
    model = make(kind, impl=impl)
    ref = run(model, pixels)
    crossget.patch(model, r=0, method=method)
    out = run(model, pixels)
    for name in ("last_hidden_state", "pooler_output"):
        got, want = getattr(out, name), getattr(ref, name)
        if method == "crossget":  # the observer's mask: rounding only
            assert torch.allclose(got, want, atol=1e-5), name
        else:  # upstream's path, untouched
            assert torch.equal(got, want), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(HEADS))
def test_heads_give_stock_logits_at_r0(name, method, pixels):
    model = make_head(name)
    ref = run(model, pixels)
    crossget.patch(model, r=0, method=method)
    out = run(model, pixels)
    fields = ("logits", "cls_logits", "distillation_logits") if "Teacher" in name else ("logits",)
    for f in fields:
        assert torch.allclose(getattr(out, f), getattr(ref, f), atol=1e-5), f


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name", list(HEADS))
def test_reduced_heads_give_finite_logits_of_the_stock_shape(name, method, pixels):
    model = make_head(name)
    ref = run(model, pixels)
    crossget.patch(model, r=8, method=method)
    out = run(model, pixels)
    assert crossget.states(model)["vision"].tokens[-1] < 64
    for f in ("logits", "cls_logits", "distillation_logits"):
        if getattr(ref, f, None) is not None:
            got = getattr(out, f)
            assert got.shape == getattr(ref, f).shape and torch.isfinite(got).all(), f
            assert not torch.allclose(got, getattr(ref, f), atol=1e-6), f  # the reduction did something


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_reduction_follows_the_schedule(kind, method, pixels):
    model = make(kind)
    n0 = 64 + PROTECTED[kind]
    crossget.patch(model, r=[10, 6, 30], method=method)
    out = run(model, pixels, output_hidden_states=True)
    expected = crossget.tokens_per_layer(model)["vision"]
    p = PROTECTED[kind]
    # 10, 6, then the clamp of docs/method.md §4 with P protected tokens: (N - P) // 2
    assert expected == [n0 - 10, n0 - 16, n0 - 16 - (n0 - 16 - p) // 2]
    assert [h.shape[1] for h in out.hidden_states] == [n0, *expected]
    assert crossget.states(model)["vision"].tokens == expected
    assert out.last_hidden_state.shape == (3, expected[-1], 32)
    sizes = crossget.states(model)["vision"].size
    assert torch.equal(sizes.sum(1), torch.full((3, 1), float(n0)))  # every input counted once
    assert (sizes[:, :p] == 1).all()  # the special tokens stand for themselves

    crossget.patch(model, flops=0.6, method=method)
    cfg = crossget.config(model)
    assert 0.5 < cfg.flops_estimate <= 0.6
    run(model, pixels)
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"]


@pytest.mark.parametrize("kind", ["vit", "dinov2_swiglu"])
def test_encoder_cost_matches_measured_flops(kind, pixels):
    from crossget.flops import model_gflops

    model = make(kind)
    cost = vit.FAMILY.encoder_cost(model, "vision")
    assert cost.protected == PROTECTED[kind] and cost.n_tokens == 64 + PROTECTED[kind]
    measured = model_gflops(model, {"pixel_values": pixels[:1]}) * 1e9
    assert abs(cost.flops() - measured) / measured < 0.05, (cost.flops(), measured)
    for method in ("tome", "crossget"):
        crossget.patch(model, flops=0.6, method=method)
        ratio = model_gflops(model, {"pixel_values": pixels[:1]}) * 1e9 / measured
        assert 0.5 < ratio < 0.65, (method, ratio)
    crossget.unpatch(model)


def test_image_size_plans_for_the_size_the_model_runs_at():
    """DINOv2 interpolates its position embeddings: a 48-pixel input has 144 patches."""
    model = make("dinov2_reg")
    crossget.patch(model, r=12, image_size=48)
    run(model, torch.randn(2, 3, 48, 48))
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"] == [137, 125, 113]


# --------------------------------------------------------------------------- protected tokens
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2_reg"])
def test_special_tokens_never_merge(kind, method, pixels):
    """CLS, the distillation token and the registers each cover only themselves, in their
    place, even when every layer merges as much as the clamp allows."""
    model = make(kind, layers=4)
    p = PROTECTED[kind]
    crossget.patch(model, r=100, method=method, trace_sources=True)
    run(model, pixels)
    src = crossget.sources(model)  # [B, N_out, N0]
    assert src.shape[1] == crossget.tokens_per_layer(model)["vision"][-1]
    assert (src.sum(1) == 1).all()  # every input in exactly one output token
    for i in range(p):
        assert src[:, i, i].all() and (src[:, i].sum(-1) == 1).all()  # token i alone, at i
    assert (src[:, p:, p:].sum((1, 2)) == 64).all()  # the patches, in the other tokens


def test_matchers_see_every_special_token_protected(pixels):
    seen = []
    model = make("dinov2_reg")
    crossget.patch(model, r=4)
    state = crossget.states(model)["vision"]
    match = state.match

    def spy(r):
        seen.append(state.book.protected.clone())
        return match(r)

    state.match = spy
    run(model, pixels)
    assert len(seen) == 3
    for protected in seen:
        assert protected[:, : 1 + REGISTERS].all() and not protected[:, 1 + REGISTERS :].any()


# --------------------------------------------------------------------------- proportional attention
def duplicated(x, sizes):
    """Token ``j`` of ``x`` ``[1, N, C]`` repeated ``sizes[j]`` times."""
    return x[0].repeat_interleave(sizes, dim=0).unsqueeze(0)


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "dinov2_reg"])
def test_a_token_of_size_k_is_k_copies_through_a_patched_layer(kind, impl, method):
    """Proportional attention (docs/method.md §6): through one patched layer (attention with
    ``log(size)``, layer scale, MLP), a token of size ``k`` gives what ``k`` copies of it give
    in the stock layer."""
    stock = make(kind, impl=impl)
    model = copy.deepcopy(stock)
    crossget.patch(model, r=0, method=method)
    g = torch.Generator().manual_seed(5)
    n = 12
    x = torch.randn(1, n, 32, generator=g)
    sizes = torch.tensor([1] * PROTECTED[kind] + [int(k) for k in torch.randint(1, 4, (n - PROTECTED[kind],), generator=g)])
    state = crossget.states(model)["vision"]
    state.start(x)
    state.book.size = sizes.float().view(1, n, 1)
    state.book.merged = True
    layer, ref_layer = vit.tower("vision", backbone(model)).layers[1], vit.tower("vision", backbone(stock)).layers[1]
    with torch.no_grad():
        got = layer(x, None)
        want = ref_layer(duplicated(x, sizes), None)
    first = torch.cumsum(sizes, 0) - sizes  # where each token's copies start
    assert got.shape == x.shape
    assert torch.allclose(got[0], want[0, first], atol=1e-5)
    with torch.no_grad():
        plain = ref_layer(x, None)
    assert not torch.allclose(plain, got, atol=1e-3)  # the sizes matter here


# --------------------------------------------------------------------------- DINOv2's patch mean
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("name", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_dinov2_head_mean_is_size_weighted(name, method, pixels):
    """The classifier reads CLS and the mean of the patch tokens: over merged tokens it is the
    size-weighted mean (the stock mean at duplicate-token equivalence); the backbone called
    on its own keeps the reduced sequence."""
    model = make_head(name)
    p = PROTECTED[HEADS[name][0]]
    crossget.patch(model, r=[10, 6, 8], method=method)
    logits = run(model, pixels).logits
    seq = run(backbone(model), pixels).last_hidden_state  # reduced: [B, N', C]
    state = crossget.states(model)["vision"]
    assert seq.shape[1] == state.tokens[-1] == 64 + p - 24
    s = state.size[:, p:]
    mean = (seq[:, p:] * s).sum(1) / s.sum(1)
    assert torch.allclose(logits, model.classifier(torch.cat([seq[:, 0], mean], 1)), atol=1e-5)
    plain = seq[:, p:].mean(1)
    assert not torch.allclose(logits, model.classifier(torch.cat([seq[:, 0], plain], 1)), atol=1e-4)
    # the backbone's own outputs are the reduced ones, also inside the head (hidden states)
    out = run(model, pixels, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [64 + p, *state.tokens]


# --------------------------------------------------------------------------- batching, unpatching, copies
@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "dinov2_reg"])
def test_a_sample_alone_equals_it_in_a_batch(kind, method, pixels):
    model = make(kind)
    crossget.patch(model, r=[10, 6, 8], method=method)
    batch = run(model, pixels)
    for i in range(3):
        one = run(model, pixels[i : i + 1])
        assert torch.allclose(one.last_hidden_state, batch.last_hidden_state[i : i + 1], atol=1e-5)
        assert torch.allclose(one.pooler_output, batch.pooler_output[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", *HEADS])
def test_unpatch_restores_the_stock_model(name, pixels):
    model = make_head(name) if name in HEADS else make(name[:-5].lower())
    ref = run(model, pixels)
    n_params = len(list(model.parameters()))
    keys = set(model.state_dict())
    crossget.patch(model, r=5, method="crossget")
    assert len(list(model.parameters())) == n_params + 1  # theta [layers, C]
    assert set(model.state_dict()) == keys  # checkpoints stay stock
    run(model, pixels)
    crossget.unpatch(model)
    assert not crossget.is_patched(model)
    assert not any(hasattr(m, "_crossget") for m in model.modules())
    bb = backbone(model)
    assert not bb.embeddings._forward_hooks and not bb._forward_pre_hooks and not model._forward_pre_hooks
    assert not any(type(m).__name__.startswith("CrossGET") for m in model.modules())
    assert len(list(model.parameters())) == n_params
    out = run(model, pixels)
    for f in ("logits", "last_hidden_state"):
        if getattr(ref, f, None) is not None:
            assert torch.equal(getattr(out, f), getattr(ref, f)), f


def pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("clone", [copy.deepcopy, pickled], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", ["DeiTForImageClassificationWithTeacher", "Dinov2WithRegistersForImageClassification"])
def test_copies_run_and_unpatch_on_their_own(name, clone, pixels):
    model = make_head(name)
    crossget.patch(model, r=[10, 6, 8], method="crossget")
    twin = clone(model)  # before a forward: transformers adds local hooks on the first one
    want = run(model, pixels).logits
    assert crossget.config(twin) == crossget.config(model)
    assert crossget.states(twin)["vision"] is not crossget.states(model)["vision"]
    assert torch.allclose(run(twin, pixels).logits, want, atol=1e-6)
    assert torch.allclose(run(model, pixels).logits, want, atol=1e-6)
    crossget.unpatch(twin)
    assert not any(hasattr(m, "_crossget") for m in twin.modules())
    assert torch.allclose(run(model, pixels).logits, want, atol=1e-6)  # still patched
    assert not torch.allclose(run(twin, pixels).logits, want, atol=1e-4)


def test_repatch_reconfigures_in_place_and_keeps_cross_tokens(pixels):
    model = make_head("Dinov2WithRegistersForImageClassification")
    crossget.patch(model, r=4)
    with torch.no_grad():
        crossget.states(model)["vision"].cross_tokens.fill_(0.5)
    crossget.patch(model, r=2, method="crossget")
    assert (crossget.states(model)["vision"].cross_tokens == 0.5).all()
    bb = backbone(model)
    assert len(bb.embeddings._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1  # not stacked
    run(model, pixels)
    assert crossget.states(model)["vision"].tokens == [67, 65, 63]


def test_bfloat16_runs(pixels):
    model = make_head("DeiTForImageClassificationWithTeacher").to(torch.bfloat16)
    crossget.patch(model, r=6)
    out = run(model, pixels.to(torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------- Hugging Face switches
FLAGS = dict(output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2_reg"])
def test_attentions_and_hidden_states_at_r0_equal_stock(kind, method, pixels):
    ref, model = make(kind, impl="eager"), make(kind, impl="eager")
    crossget.patch(model, r=0, method=method)
    a, b = run(ref, pixels, **FLAGS), run(model, pixels, **FLAGS)
    n0 = 64 + PROTECTED[kind]
    assert b.attentions[0].shape == (3, 2, n0, n0) and len(b.hidden_states) == 4
    for name in ("attentions", "hidden_states"):
        for x, y in zip(getattr(b, name), getattr(a, name), strict=True):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-6), name


def test_reduced_attentions_cover_the_tokens_before_each_merge(pixels):
    model = make("dinov2_reg", impl="eager")
    crossget.patch(model, r=[10, 6, 30])
    out = run(model, pixels, **FLAGS)
    tokens = crossget.states(model)["vision"].tokens
    entering = [69, *tokens[:-1]]
    assert [a.shape[-1] for a in out.attentions] == entering
    for a in out.attentions:
        assert a.shape[-1] == a.shape[-2] and torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    assert [h.shape[1] for h in out.hidden_states] == [69, *tokens]
    plain = run(model, pixels)
    assert torch.equal(plain.last_hidden_state, out.last_hidden_state)  # the flags change nothing else


@pytest.mark.parametrize("kind, impl, reentrant", [("vit", "sdpa", False), ("deit", "eager", True),
                                                   ("dinov2_reg", "sdpa", False)])
def test_gradient_checkpointing_gives_the_same_gradients(kind, impl, reentrant, pixels):
    """Dropout-free ViT / DeiT; DINOv2 with drop path in training (the recomputation replays
    the RNG)."""
    name = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassificationWithTeacher",
            "dinov2_reg": "Dinov2WithRegistersForImageClassification"}[kind]

    def step(model):
        out = model(pixel_values=pixels)
        loss = out.logits.logsumexp(-1).mean()
        loss.backward()
        return loss.detach()

    (loss0, g0, st0), (loss1, g1, st1) = with_and_without_checkpointing(
        lambda: make_head(name, impl), lambda m: crossget.patch(m, r=[10, 6, 8], method="crossget"), step,
        reentrant=reentrant,
    )
    assert torch.equal(loss0, loss1)
    assert_same_grads(g0, g1)
    assert any(n.endswith("crossget_cross_tokens") for n in g1)
    assert st0["vision"][:2] == st1["vision"][:2] and torch.equal(st0["vision"][2], st1["vision"][2])


# --------------------------------------------------------------------------- errors
def test_the_family_and_its_classes():
    for name in ("ViTModel", "DeiTModel"):
        assert family_of(make(name[:-5].lower())).name == "ViT"
    for name in HEADS:
        assert family_of(make_head(name)).name == "ViT"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=2, keep=30), "keep= is not an option of the ViT family"),
        (dict(r=2, fastv_layer=1), "fastv_layer= is not an option of the ViT family"),
        (dict(r=2, method="fastv"), "for ViT models"),
        (dict(r=2, importance="received"), "importance must be one of"),
        (dict(r=-1), "-1"),
        (dict(r=[1, 2]), "2 entries"),
        (dict(flops=0.01), "out of reach"),
        (dict(flops=1.5), "1.5"),
        (dict(r=2, towers=("text",)), "text"),
        (dict(), "r="),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    model = make_head("DeiTForImageClassification")
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **{"method": "crossget", **kwargs})
    assert not crossget.is_patched(model)


def test_r_too_large_is_clamped(pixels):
    model = make("deit")
    crossget.patch(model, r=1000)
    run(model, pixels)
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"] == [34, 18, 10]


def test_a_mask_over_tokens_and_the_loss_are_refused(pixels):
    model = make("vit")
    crossget.patch(model, r=4)
    mask = torch.ones(3, 65, dtype=torch.long)
    run(model, pixels, attention_mask=mask)  # nothing masked: fine
    mask[:, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask that masks tokens"):
        run(model, pixels, attention_mask=mask)
    with pytest.raises(ValueError, match="both towers"):
        crossget.cross_token_loss(model)


def test_cross_tokens_save_and_load(tmp_path, pixels):
    model = make_head("DeiTForImageClassificationWithTeacher")
    crossget.patch(model, r=[3, 2, 1])
    with torch.no_grad():
        crossget.states(model)["vision"].cross_tokens.normal_()
    path = tmp_path / "cross.safetensors"
    crossget.save_cross_tokens(model, path)
    other = make_head("DeiTForImageClassificationWithTeacher")
    crossget.load_cross_tokens(other, path)
    assert crossget.config(other).to_dict()["r"] == {"vision": [3, 2, 1]}
    assert torch.equal(crossget.states(other)["vision"].cross_tokens, crossget.states(model)["vision"].cross_tokens)
    assert torch.equal(run(model, pixels).logits, run(other, pixels).logits)
    with pytest.raises(ValueError, match="layers"):
        crossget.load_cross_tokens(make("dinov2", layers=2), path)
