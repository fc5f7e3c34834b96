"""patch() arguments as a user passes them (issue 16, finding 7): a schedule per tower implies
the towers, any real number is a FLOPs ratio, flops=1 is the stock computation, bad text
lengths are refused, unpatching a model clears a tower patched on its own."""

import numpy as np
import pytest
import torch
from conftest import make_clip, make_texts
from test_llava import make_llava

import crossget


def test_a_schedule_per_tower_implies_the_towers():
    model = make_clip()
    crossget.patch(model, r={"text": 2})
    assert crossget.config(model).towers == ("text",) and set(crossget.config(model).r) == {"text"}
    crossget.patch(model, r={"vision": 2, "text": 3})
    assert crossget.config(model).towers == ("vision", "text")
    assert crossget.config(model).r == {"vision": (2, 2, 2), "text": (3, 3, 3)}
    with pytest.raises(ValueError, match="not reduced"):
        crossget.patch(model, r={"vision": 2, "text": 3}, towers=("vision",))


def test_flops_takes_any_real_number():
    model = make_clip()
    crossget.patch(model, flops=np.float32(0.7))
    want = crossget.config(model).r
    crossget.patch(model, flops=0.7)
    assert crossget.config(model).r == want
    for bad in (True, "0.7", float("nan"), 0, 1.5, np.float64(-0.2)):
        with pytest.raises(ValueError, match=r"flops must be a ratio in \(0, 1\]"):
            crossget.patch(model, flops=bad)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_flops_one_is_the_stock_computation(method, images):
    model = make_clip()
    ids, mask = make_texts((6, 9))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits_per_image
        crossget.patch(model, flops=1.0, method=method)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits_per_image
    assert all(r == 0 for sched in crossget.config(model).r.values() for r in sched)
    assert torch.allclose(got, want, atol=1e-5)
    llava = make_llava()
    crossget.patch(llava, flops=1.0, method=method)
    assert crossget.image_tokens(llava) == crossget.config(llava).keep == 64


@pytest.mark.parametrize("text_len", [-5, 0, 2.5, True])
def test_bad_text_lengths_are_refused(text_len):
    with pytest.raises(ValueError, match="text_len must be a positive int"):
        crossget.patch(make_clip(), flops=0.7, text_len=text_len)


def test_unpatch_clears_a_tower_patched_on_its_own():
    llava = make_llava()
    crossget.patch(llava.model.vision_tower, r=2)
    assert crossget.is_patched(llava.model.vision_tower)
    crossget.unpatch(llava)
    assert not crossget.is_patched(llava.model.vision_tower)
    assert not any(hasattr(m, "_crossget") for m in llava.modules())
