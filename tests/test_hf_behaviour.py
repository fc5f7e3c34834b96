"""Patched models under Hugging Face's own switches: ``output_attentions`` /
``output_hidden_states`` (the cross token never shows, text hidden states at full length)
and gradient checkpointing (the same gradients as without it), for CLIP, BLIP and BLIP-2."""


import pytest
import torch
from conftest import make_clip, make_texts
from test_blip import make_blip, make_blip2, texts
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2VisionModel,
    BlipForImageTextRetrieval,
    BlipVisionModel,
    CLIPTextModel,
)

import crossget
from crossget.families.clip import LayerReplay
from crossget.merge import gather_tokens

FLAGS = dict(output_attentions=True, output_hidden_states=True)


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def assert_all_close(outs, refs, what, atol=1e-6):
    assert len(outs) == len(refs), what
    for i, (a, b) in enumerate(zip(outs, refs, strict=True)):
        assert a.shape == b.shape, f"{what}[{i}]: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.allclose(a, b, atol=atol), f"{what}[{i}]: max diff {(a - b).abs().max().item()}"


def assert_outputs_close(out, ref, what):
    for name in ("attentions", "hidden_states", "cross_attentions"):
        if getattr(ref, name, None) is not None:
            assert_all_close(getattr(out, name), getattr(ref, name), f"{what}.{name}")


# --------------------------------------------------------------------------- output_attentions / hidden_states
@pytest.mark.parametrize("method, impl", [("crossget", "eager"), ("crossget", "sdpa"), ("tome", "eager")])
def test_clip_attentions_and_hidden_states_at_r0_equal_stock(method, impl, pixels):
    ids, mask = make_texts([16, 9, 5])
    ref, model = make_clip(impl), make_clip(impl)
    crossget.patch(model, r=0, method=method, towers=("vision", "text"))
    with torch.no_grad():
        a = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, **FLAGS)
        b = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, **FLAGS)
    for tower in ("vision_model_output", "text_model_output"):
        assert_outputs_close(getattr(b, tower), getattr(a, tower), tower)
    if impl == "eager":
        assert b.vision_model_output.attentions[0].shape == (3, 2, 65, 65)
        assert b.text_model_output.attentions[0].shape == (3, 2, 16, 16)


@pytest.mark.parametrize(
    "make", [lambda: make_blip(BlipVisionModel), lambda: make_blip(BlipForImageTextRetrieval),
             lambda: make_blip2(Blip2VisionModel, "eager"), lambda: make_blip2(Blip2VisionModel, "sdpa"),
             lambda: make_blip2(Blip2ForConditionalGeneration, "eager")],
    ids=["blip-vision", "blip-itm", "blip2-vision-eager", "blip2-vision-sdpa", "blip2-eager"],
)
def test_blip_vision_attentions_and_hidden_states_at_r0_equal_stock(make, pixels):
    ref, model = make(), make()
    crossget.patch(model, r=0, method="crossget")
    vision = getattr(model, "vision_model", model)
    with torch.no_grad():
        a = getattr(ref, "vision_model", ref)(pixel_values=pixels, **FLAGS)
        b = vision(pixel_values=pixels, **FLAGS)
    assert_outputs_close(b, a, "vision")
    assert len(b.hidden_states) == 4


def test_blip_text_encoder_attentions_and_hidden_states_at_r0_equal_stock(pixels):
    ref, model = make_blip(BlipForImageTextRetrieval), make_blip(BlipForImageTextRetrieval)
    crossget.patch(model, r=0, method="crossget", towers=("vision", "text"))
    ids, mask = texts()
    outs = []
    with torch.no_grad():
        for m in (ref, model):
            image = m.vision_model(pixel_values=pixels).last_hidden_state
            outs.append(m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image, **FLAGS))
    assert outs[1].attentions[0].shape == (3, 2, 12, 12) and outs[1].cross_attentions[0].shape == (3, 2, 12, 65)
    assert_outputs_close(outs[1], outs[0], "text_encoder")


def layer_outputs(layers):
    """Forward hooks that keep what each layer returns (the merged sequence)."""
    seen = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: seen.append(out)) for layer in layers]
    return seen, handles


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_clip_reduced_attentions_and_hidden_states(method, pixels):
    """Reduced layers: attention over the layer's tokens before its merge (no cross token);
    vision hidden states merged; text hidden states at full length, as last_hidden_state."""
    ids, mask = make_texts([16, 9, 5])
    model = make_clip("eager")
    crossget.patch(model, r={"vision": [10, 6, 30], "text": [3, 2, 2]}, method=method, towers=("vision", "text"))
    with torch.no_grad():
        plain = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        text_seen, handles = layer_outputs(model.text_model.encoder.layers)
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, **FLAGS)
    for h in handles:
        h.remove()
    # the flags change nothing else
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.equal(getattr(out, name), getattr(plain, name)), name
    vision, text = out.vision_model_output, out.text_model_output
    states = crossget.states(model)
    entering = [65, *states["vision"].tokens[:-1]]
    assert [a.shape[-1] for a in vision.attentions] == entering == [65, 55, 49]
    assert [h.shape[1] for h in vision.hidden_states] == [65, *states["vision"].tokens] == [65, 55, 49, 25]
    for a in (*vision.attentions, *text.attentions):
        assert a.shape[-1] == a.shape[-2]
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)  # a distribution over the layer's tokens
    assert [a.shape[-1] for a in text.attentions] == [16, *states["text"].tokens[:-1]]
    # text: every hidden state has the input length; each position holds its covering token
    assert all(h.shape == (3, 16, 32) for h in text.hidden_states)
    assert states["text"].tokens[-1] < 16
    for h, merged, token_map in zip(text.hidden_states[1:], text_seen, states["text"].token_maps, strict=True):
        assert torch.equal(h, merged if token_map is None else gather_tokens(merged, token_map))
    final = model.text_model.final_layer_norm(text.hidden_states[-1])
    assert torch.allclose(final, text.last_hidden_state, atol=1e-6)


def test_clip_text_hidden_states_full_length_as_tuple():
    """return_dict=False gives the same (restored) hidden states, as a tuple."""
    ids, mask = make_texts([16, 9, 5])
    model = make_clip("eager").text_model
    assert isinstance(model, CLIPTextModel)
    crossget.patch(model, r=3, method="crossget")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        tup = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple)
    assert torch.equal(tup[0], out.last_hidden_state)
    assert_all_close(tup[2], out.hidden_states, "hidden_states", atol=0)
    assert all(h.shape[1] == 16 for h in out.hidden_states)


def test_blip_text_encoder_reduced_hidden_states_full_length(pixels):
    model = make_blip(BlipForImageTextRetrieval)
    crossget.patch(model, r={"vision": 8, "text": 2}, method="crossget", towers=("vision", "text"))
    ids, mask = texts()
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        seen, handles = layer_outputs(model.text_encoder.encoder.layer)
        out = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image, **FLAGS)
    for h in handles:
        h.remove()
    st = crossget.states(model)["text"]
    assert st.tokens == [10, 8]
    assert all(h.shape == (3, 12, 32) for h in out.hidden_states)
    assert out.hidden_states[-1] is out.last_hidden_state
    for h, merged, token_map in zip(out.hidden_states[1:], seen, st.token_maps, strict=True):
        assert torch.equal(h, gather_tokens(merged, token_map))
    assert [a.shape[-2:] for a in out.attentions] == [(12, 12), (10, 10)]
    assert [a.shape[-2:] for a in out.cross_attentions] == [(10, image.shape[1]), (8, image.shape[1])]


def test_unpatch_removes_the_hidden_state_hooks():
    model = make_clip("eager")
    hooks = (len(model.text_model._forward_hooks), len(model.text_model._forward_pre_hooks))
    crossget.patch(model, r=2, method="crossget", towers=("vision", "text"))
    crossget.patch(model, r=1, method="tome", towers=("text",))  # re-patching does not stack them
    assert len(model.text_model._forward_hooks) == hooks[0] + 1
    crossget.unpatch(model)
    assert (len(model.text_model._forward_hooks), len(model.text_model._forward_pre_hooks)) == hooks


# --------------------------------------------------------------------------- gradient checkpointing
def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max diff {(a[n] - b[n]).abs().max().item()}"


def clip_step(model, pixels, ids, mask):
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_loss=True)
    loss = out.loss + crossget.cross_token_loss(model)
    loss.backward()
    return loss.detach()


def with_and_without_checkpointing(make, patch, step, reentrant=False, theta_std=0.5, enable_first=False):
    """Loss, gradients and tower states of one training step, without and with gradient
    checkpointing, on two copies of the same patched model; checks that every patched
    layer the forward ran was recomputed in the backward."""
    runs = []
    calls = []
    replay = LayerReplay.__call__

    def counted(self, *args):
        calls.append((id(self), self.entry is None))
        return replay(self, *args)

    for checkpointing in (False, True):
        model = make()
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
        if checkpointing and enable_first:  # switched on before patching: the patched layers keep the flag
            model.gradient_checkpointing_enable(**kwargs)
        patch(model)
        torch.manual_seed(3)
        with torch.no_grad():
            for st in crossget.states(model).values():
                if st.cross_tokens is not None:
                    st.cross_tokens.normal_(std=theta_std)  # non-zero theta: importance matters
        model.train()
        if checkpointing:
            if not enable_first:
                model.gradient_checkpointing_enable(**kwargs)
            LayerReplay.__call__ = counted
        try:
            loss = step(model)
        finally:
            LayerReplay.__call__ = replay
        st = {k: (list(s.tokens), len(s.cross_outputs), None if s.size is None else s.size.clone())
              for k, s in crossget.states(model).items()}
        runs.append((loss, grads(model), st))
    forwards = {i for i, first in calls if first}
    assert forwards and sorted(i for i, first in calls if not first) == sorted(forwards)  # each recomputed once
    return runs


@pytest.mark.parametrize(
    "method, impl, reentrant, enable_first",
    [("crossget", "eager", False, False), ("crossget", "sdpa", True, False), ("crossget", "sdpa", False, True),
     ("tome", "eager", True, True)],
)
def test_clip_gradient_checkpointing_gives_the_same_gradients(method, impl, reentrant, enable_first, pixels):
    ids, mask = make_texts([16, 9, 5])
    (loss0, g0, st0), (loss1, g1, st1) = with_and_without_checkpointing(
        lambda: make_clip(impl),
        lambda m: crossget.patch(m, r={"vision": [10, 6, 8], "text": [3, 2, 2]}, method=method,
                                 towers=("vision", "text")),
        lambda m: clip_step(m, pixels, ids, mask) if method == "crossget" else
        _backward(m(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_loss=True).loss),
        reentrant=reentrant, enable_first=enable_first,
    )
    assert torch.equal(loss0, loss1)
    assert_same_grads(g0, g1)
    if method == "crossget":
        thetas = [n for n in g1 if n.endswith("crossget_cross_tokens")]
        assert len(thetas) == 2 and all(g1[n].abs().sum() > 0 for n in thetas)
    # the state is left as the forward left it (cross_token_loss, sources, sizes)
    for k in st0:
        assert st0[k][:2] == st1[k][:2] and torch.equal(st0[k][2], st1[k][2])


def _backward(loss):
    loss.backward()
    return loss.detach()


def test_blip_gradient_checkpointing_gives_the_same_gradients(pixels):
    ids, mask = texts()

    def step(model):
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
        loss = out.itm_score.logsumexp(-1).mean() + itc.itm_score.diagonal().mean() + crossget.cross_token_loss(model)
        return _backward(loss)

    (loss0, g0, _), (loss1, g1, _) = with_and_without_checkpointing(
        lambda: make_blip(BlipForImageTextRetrieval),
        lambda m: crossget.patch(m, r={"vision": [8, 6, 4], "text": [2, 2]}, method="crossget",
                                 towers=("vision", "text")),
        step,
    )
    assert torch.equal(loss0, loss1)
    assert_same_grads(g0, g1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_blip2_gradient_checkpointing_gives_the_same_gradients(impl, pixels):
    ids = texts((4, 4, 4), 4, 1)[0]

    def step(model):
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        return _backward(feats.pow(2).mean() + model(pixel_values=pixels, input_ids=ids, labels=ids).loss)

    (loss0, g0, _), (loss1, g1, _) = with_and_without_checkpointing(
        lambda: make_blip2(Blip2ForConditionalGeneration, impl),
        lambda m: crossget.patch(m, r=[8, 6, 4], method="crossget"),
        step,
    )
    assert torch.equal(loss0, loss1)
    assert_same_grads(g0, g1)
    assert any(n.endswith("crossget_cross_tokens") for n in g1)


@pytest.mark.parametrize(
    "make", [lambda: make_clip("eager"), lambda: make_blip(BlipForImageTextRetrieval),
             lambda: make_blip2(Blip2ForConditionalGeneration, "eager")],
    ids=["clip", "blip", "blip2"],
)
def test_inference_with_checkpointing_flags_on_is_unchanged(make, pixels):
    model = make()
    crossget.patch(model, r=4, method="crossget")
    vision = model.vision_model
    with torch.no_grad():
        ref = vision(pixel_values=pixels).last_hidden_state
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in vision.encoder.layers)
    with torch.no_grad():
        assert torch.equal(vision(pixel_values=pixels).last_hidden_state, ref)  # eval
        model.train()
        assert torch.equal(vision(pixel_values=pixels).last_hidden_state, ref)  # training, no grad


def test_checkpointing_refuses_a_recomputation_that_merges_differently(pixels):
    """The recomputed bookkeeping must be the forward's bit for bit: here theta changes
    between the forward and the backward, which would silently give wrong gradients."""
    model = make_blip(BlipVisionModel)
    crossget.patch(model, r=8, method="crossget", trace_sources=True)
    model.train()
    model.gradient_checkpointing_enable()
    out = model(pixel_values=pixels).pooler_output.sum()
    with torch.no_grad():
        crossget.states(model)["vision"].cross_tokens.normal_(std=5.0)
    with pytest.raises(RuntimeError, match="merged tokens differently"):
        out.backward()
