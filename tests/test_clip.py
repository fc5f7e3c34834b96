"""crossget.patch on Hugging Face CLIP: exactness at r=0, schedules, batching, training, errors."""

import pytest
import torch
from conftest import make_clip, make_texts
from transformers import (
    CLIPTextModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    GPT2Config,
    GPT2Model,
)

import crossget
from crossget.families.clip import CrossGETCLIPAttention, CrossGETCLIPEncoderLayer


def run(model, images, ids, mask, **kw):
    with torch.no_grad():
        return model(pixel_values=images, input_ids=ids, attention_mask=mask, **kw)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["none", "tome", "crossget"])
def test_r0_equals_unpatched(impl, method, images):
    model = make_clip(impl)
    ids, mask = make_texts([16, 9, 5])
    ref = run(model, images, ids, mask)
    crossget.patch(model, r=0, method=method, towers=("vision", "text"))
    out = run(model, images, ids, mask)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.allclose(getattr(out, name), getattr(ref, name), atol=1e-5), name
    assert torch.allclose(out.text_model_output.last_hidden_state, ref.text_model_output.last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_reduced_shapes_and_token_counts(method, images):
    model = make_clip()
    ids, mask = make_texts([16, 9, 5])
    ref = run(model, images, ids, mask)
    crossget.patch(model, r=[10, 6, 30], method=method, towers=("vision", "text"))
    out = run(model, images, ids, mask, output_hidden_states=True)
    assert out.image_embeds.shape == ref.image_embeds.shape
    assert out.text_embeds.shape == ref.text_embeds.shape
    # text keeps its length (EOT pooling indexes original positions)
    assert out.text_model_output.last_hidden_state.shape == ref.text_model_output.last_hidden_state.shape
    expected = crossget.tokens_per_layer(model)["vision"]
    assert expected == [55, 49, 25]  # 65 -> -10 -> -6 -> clamp (49 - 1) // 2 = 24
    seen = [h.shape[1] for h in out.vision_model_output.hidden_states[1:]]
    assert seen == expected == crossget.states(model)["vision"].tokens
    assert out.vision_model_output.last_hidden_state.shape[1] == 25
    sizes = crossget.states(model)["vision"].size
    assert torch.equal(sizes.sum(1), torch.full((3, 1), 65.0))  # every patch counted once
    cos = torch.cosine_similarity(out.image_embeds, ref.image_embeds)
    assert (cos > 0.5).all() and (cos < 1 - 1e-6).all()  # changed, but still the same image


def test_eot_pooling_exact_and_padding_kept_apart():
    model = make_clip()
    ids, mask = make_texts([16, 9, 5])
    crossget.patch(model, r=4, method="crossget", towers=("text",))
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask)
    st = crossget.states(model)["text"]
    eot = torch.tensor([15, 8, 4])
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(3), eot])
    # the EOT token is alone in its group; padding never shares a token with real text
    tm = st.token_map
    for row in range(3):
        assert (tm[row] == tm[row, eot[row]]).sum() == 1
        real, pad = tm[row][mask[row].bool()], tm[row][~mask[row].bool()]
        assert not set(real.tolist()) & set(pad.tolist())


def test_each_sample_alone_equals_batched(images):
    model = make_clip()
    ids, mask = make_texts([16, 9, 5])  # all padded to the same length, alone and batched
    crossget.patch(model, r=5, method="crossget", towers=("vision", "text"))
    batch = run(model, images, ids, mask)
    for i in range(3):
        one = run(model, images[i : i + 1], ids[i : i + 1], mask[i : i + 1])
        assert torch.allclose(one.image_embeds, batch.image_embeds[i : i + 1], atol=1e-5)
        assert torch.allclose(one.text_embeds, batch.text_embeds[i : i + 1], atol=1e-5)


def test_eager_and_sdpa_agree_when_reduced(images):
    ids, mask = make_texts([16, 9, 5])
    outs = []
    for impl in ("eager", "sdpa"):
        model = make_clip(impl)
        crossget.patch(model, r=6, method="crossget", towers=("vision", "text"))
        outs.append(run(model, images, ids, mask))
    assert torch.allclose(outs[0].image_embeds, outs[1].image_embeds, atol=1e-4)
    assert torch.allclose(outs[0].text_embeds, outs[1].text_embeds, atol=1e-4)


def test_bfloat16_runs(images):
    model = make_clip().to(torch.bfloat16)
    ids, mask = make_texts([16, 9, 5])
    crossget.patch(model, r=6, method="crossget", towers=("vision", "text"))
    out = run(model, images.to(torch.bfloat16), ids, mask)
    assert out.image_embeds.dtype == torch.bfloat16 and torch.isfinite(out.image_embeds).all()
    assert crossget.states(model)["vision"].cross_tokens.dtype == torch.bfloat16


def test_unpatch_restores_the_stock_model(images):
    model = make_clip()
    ids, mask = make_texts([16, 9, 5])
    ref = run(model, images, ids, mask)
    n_params = len(list(model.parameters()))
    crossget.patch(model, r=5, method="crossget", towers=("vision", "text"))
    assert len(list(model.parameters())) == n_params + 2  # one theta [layers, C] per tower
    assert isinstance(model.vision_model.encoder.layers[0], CrossGETCLIPEncoderLayer)
    crossget.unpatch(model)
    assert not crossget.is_patched(model)
    for layer in model.vision_model.encoder.layers:
        assert type(layer) is not CrossGETCLIPEncoderLayer
        assert type(layer.self_attn) is not CrossGETCLIPAttention
    assert not model.vision_model.encoder._forward_pre_hooks
    assert len(list(model.parameters())) == n_params
    assert "crossget_cross_tokens" not in str(model.state_dict().keys())
    out = run(model, images, ids, mask)
    assert torch.equal(out.image_embeds, ref.image_embeds)


def test_training_step_moves_only_cross_tokens(images):
    model = make_clip().train()
    ids, mask = make_texts([16, 9, 5])
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    for p in model.parameters():
        p.requires_grad_(False)
    thetas = [st.cross_tokens for st in crossget.states(model).values()]
    for t in thetas:
        t.requires_grad_(True)
    before = [t.detach().clone() for t in thetas]
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "cross_tokens" not in k}
    opt = torch.optim.SGD(thetas, lr=1.0)
    out = model(pixel_values=images, input_ids=ids, attention_mask=mask, return_loss=True)
    loss = 0.5 * out.loss + 0.5 * crossget.cross_token_loss(model)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in thetas)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, thetas))
    after = {k: v for k, v in model.state_dict().items() if "cross_tokens" not in k}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


def test_cross_token_loss_is_spec_js_divergence():
    u = torch.randn(2, 3, 5)
    v = torch.randn(2, 3, 5)
    p, q = u.softmax(-1), v.softmax(-1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum(-1)
    expected = ((kl(m, p) + kl(m, q)) / 2).mean()
    assert torch.allclose(crossget.cross_token_alignment(u, v), expected, atol=1e-6)
    assert crossget.cross_token_alignment(u, u).abs() < 1e-6


def test_save_and_load_cross_tokens(tmp_path, images):
    model = make_clip()
    crossget.patch(model, r=[3, 2, 1], method="crossget", towers=("vision",))
    with torch.no_grad():
        for st in crossget.states(model).values():
            st.cross_tokens.normal_()
    path = tmp_path / "cross.safetensors"
    crossget.save_cross_tokens(model, path)
    other = make_clip(seed=0)
    crossget.load_cross_tokens(other, path)
    assert crossget.config(other).to_dict()["r"] == {"vision": [3, 2, 1]}
    for kind, st in crossget.states(model).items():
        assert torch.equal(st.cross_tokens, crossget.states(other)[kind].cross_tokens)
    ids, mask = make_texts([16, 9, 5])
    assert torch.equal(run(model, images, ids, mask).image_embeds, run(other, images, ids, mask).image_embeds)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        crossget.load_cross_tokens(other, tmp_path / "nowhere.safetensors")


def test_repatch_reconfigures_and_keeps_trained_cross_tokens(images):
    model = make_clip()
    crossget.patch(model, r=4)
    with torch.no_grad():
        crossget.states(model)["vision"].cross_tokens.fill_(0.5)
    crossget.patch(model, r=2)
    assert crossget.config(model).to_dict()["r"]["vision"] == [2, 2, 2]
    assert (crossget.states(model)["vision"].cross_tokens == 0.5).all()
    assert len(model.vision_model.encoder._forward_pre_hooks) == 1  # not stacked


def test_unguided_ablation_ignores_cross_tokens_and_keeps_them(images):
    model = make_clip()
    crossget.patch(model, r=8)
    with torch.no_grad():
        crossget.states(model)["vision"].cross_tokens.normal_()  # "trained" theta
    theta = crossget.states(model)["vision"].cross_tokens.clone()
    guided = run(model, images, *make_texts([16, 9, 5])).image_embeds
    crossget.patch(model, r=8, importance="none")
    assert crossget.config(model).to_dict()["importance"] == "none"
    st = crossget.states(model)["vision"]
    assert st.cross_tokens is None and not st.settings.uses_cross_token
    unguided = run(model, images, *make_texts([16, 9, 5])).image_embeds
    assert st.cross is None and st.tokens == [57, 49, 41]
    assert not torch.allclose(unguided, guided, atol=1e-4)
    # theta is kept (unused) and back in use after re-patching with guidance
    crossget.patch(model, r=8)
    assert torch.equal(crossget.states(model)["vision"].cross_tokens, theta)
    assert torch.allclose(run(model, images, *make_texts([16, 9, 5])).image_embeds, guided, atol=1e-6)
    with pytest.raises(ValueError, match="importance"):
        crossget.patch(model, r=8, importance="received")


def test_single_tower_models(images):
    torch.manual_seed(0)
    clip = make_clip()
    for tower in (CLIPVisionModel(clip.config.vision_config), CLIPVisionModelWithProjection(clip.config.vision_config)):
        tower.eval()
        with torch.no_grad():
            ref = tower(pixel_values=images)
            crossget.patch(tower, r=8)
            out = tower(pixel_values=images)
        assert out[0].shape[0] == ref[0].shape[0]
        assert out.last_hidden_state.shape[1] == 65 - 24
    text = CLIPTextModel(clip.config.text_config).eval()
    ids, mask = make_texts([16, 9, 5])
    crossget.patch(text, r=3, method="tome")
    with torch.no_grad():
        assert text(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (3, 16, 32)


def test_flops_target_is_solved_into_a_schedule():
    model = make_clip()
    crossget.patch(model, flops=0.7)
    cfg = crossget.config(model).to_dict()
    assert cfg["flops_estimate"] <= 0.7 and cfg["flops_estimate"] > 0.6
    assert len(cfg["r"]["vision"]) == 3 and "text" not in cfg["r"]
    with pytest.raises(ValueError, match="out of reach"):
        crossget.patch(model, flops=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=-1), "-1"),
        (dict(r=[1, 2]), "2 entries"),
        (dict(r=1.5), "1.5"),
        (dict(flops=0.0), "0.0"),
        (dict(flops=1.2), "1.2"),
        (dict(r=2, flops=0.5), "not both"),
        (dict(), "r="),
        (dict(r=2, method="fast"), "fast"),
        (dict(r=2, towers=("audio",)), "audio"),
        (dict(r=2, towers="vision"), "towers"),
        (dict(r=2, metric="values"), "values"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        crossget.patch(make_clip(), **kwargs)


def test_unsupported_model_raises_type_error():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2))
    with pytest.raises(TypeError, match="CLIPModel"):
        crossget.patch(model, r=2)


def test_loss_needs_both_towers(images):
    model = make_clip()
    crossget.patch(model, r=2, method="tome")
    with pytest.raises(ValueError, match="crossget"):
        crossget.cross_token_loss(model)


def test_sources_cover_every_patch_once(images):
    model = make_clip()
    crossget.patch(model, r=[10, 6, 30], trace_sources=True)
    with torch.no_grad():
        model.get_image_features(pixel_values=images)
    src = crossget.sources(model, "vision")  # [B, 25, 65]
    assert src.shape == (3, 25, 65)
    assert (src.sum(1) == 1).all()
    sizes = crossget.states(model)["vision"].size[..., 0]
    assert torch.equal(src.sum(2).float(), sizes)
    assert src[:, 0, 0].all() and (src[:, 0].sum(-1) == 1).all()  # CLS alone, first
    crossget.patch(model, r=4)
    with pytest.raises(ValueError, match="trace_sources"):
        crossget.sources(model, "vision")


def test_flops_target_counts_the_cross_token(images):
    """Both methods land on the target as measured against the stock model: CrossGET's
    schedule pays for the cross tokens it carries (one per tower)."""
    from crossget.flops import model_gflops

    model = make_clip()
    ids, mask = make_texts([16, 16, 16])
    inputs = dict(pixel_values=images, input_ids=ids, attention_mask=mask)
    base = model_gflops(model, inputs)
    measured, removed = {}, {}
    for method in ("tome", "crossget"):
        crossget.patch(model, flops=0.7, method=method)
        measured[method] = model_gflops(model, inputs) / base
        removed[method] = sum(crossget.config(model).to_dict()["r"]["vision"])
        crossget.unpatch(model)
    assert removed["crossget"] > removed["tome"]
    for ratio in measured.values():
        assert 0.62 < ratio < 0.72
    assert abs(measured["crossget"] - measured["tome"]) < 0.03, measured


def test_cross_token_does_not_keep_layer_outputs_alive(images):
    """The cross token's per-layer outputs must not be views of the layer outputs: with views,
    every layer's whole hidden state stayed alive to the end of the forward (2x peak memory)."""
    from crossget.tools.memory import PeakMemory

    tower = CLIPVisionModel(make_clip(layers=24).config.vision_config).eval()
    peaks = {}
    for importance in ("none", "cross"):
        crossget.patch(tower, r=2, importance=importance)
        with torch.no_grad(), PeakMemory() as mem:
            tower(pixel_values=images)
        peaks[importance] = mem.peak_mib
    assert peaks["cross"] < 1.3 * peaks["none"]  # the cross token's mask and states cost ~20% here
