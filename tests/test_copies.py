"""A patched model copies and pickles like a stock one (issue 16, finding 2): the copy has
its own state, hooks and classes, runs the same outputs, and unpatches on its own."""

import copy
import io

import pytest
import torch
from conftest import make_clip, make_texts
from test_blip import make_blip
from test_llava import make_llava, make_prompts
from transformers import BlipForImageTextRetrieval

import crossget


def clip_forward(model, images):
    ids, mask = make_texts((6, 9))
    return model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits_per_image


def blip_forward(model, images):
    ids = torch.tensor([[52, 5, 6, 7], [52, 8, 9, 0]])
    return model(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=images[:2]).itm_score


def llava_forward(model, images):
    ids, mask = make_prompts(crossget.image_tokens(model), lengths=(5, 3))
    return model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits


CASES = [
    (make_clip, clip_forward, dict(r=2, towers=("vision", "text"))),
    (make_clip, clip_forward, dict(r=2, method="tome")),
    (lambda: make_blip(BlipForImageTextRetrieval), blip_forward, dict(r=2, towers=("vision", "text"))),
    (make_llava, llava_forward, dict(keep=20, method="crossget")),
    (make_llava, llava_forward, dict(keep=20, method="fastv")),
    (make_llava, llava_forward, dict(keep=20, method="visionzip")),
]


def pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("build, forward, kw", CASES)
@pytest.mark.parametrize("clone", [copy.deepcopy, pickled], ids=["deepcopy", "torch.save"])
def test_copies_run_and_unpatch_on_their_own(build, forward, kw, clone, images):
    model = build()
    crossget.patch(model, **kw)
    if clone is pickled:
        # before any forward: a stock LLaVA that ran a forward cannot be pickled either
        # (transformers installs a local output-capturing hook on the first forward)
        twin = clone(model)
    with torch.no_grad():
        want = forward(model, images)
    if clone is not pickled:
        twin = clone(model)
    assert crossget.config(twin) == crossget.config(model)
    for kind, state in crossget.states(twin).items():
        assert state is not crossget.states(model)[kind]  # its own per-forward state
    with torch.no_grad():
        assert torch.allclose(forward(twin, images), want, atol=1e-6)
        # the original is untouched by the copy's forward, and the other way round
        assert torch.allclose(forward(model, images), want, atol=1e-6)
    crossget.unpatch(twin)
    assert not any(hasattr(m, "_crossget") for m in twin.modules())
    with torch.no_grad():
        assert torch.allclose(forward(model, images), want, atol=1e-6)  # still patched


@pytest.mark.parametrize("build, forward, kw", CASES[:3])
def test_encoders_pickle_after_a_forward(build, forward, kw, images):
    """What a forward leaves behind (BLIP's link to the last image tokens) is not pickled."""
    model = build()
    crossget.patch(model, **kw)
    with torch.no_grad():
        want = forward(model, images)
        assert torch.allclose(forward(pickled(model), images), want, atol=1e-6)
