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


def test_schedules_follow_the_image_size_they_are_planned_for(images):
    """A model whose config says 64 px but runs at 32 px (interpolate_pos_encoding): flops=
    plans for image_size= and tokens_per_layer reports what that forward then has."""
    model = make_clip(image_size=64)
    crossget.patch(model, flops=0.8, towers=("vision",))
    planned_64 = crossget.config(model).r["vision"]
    crossget.patch(model, flops=0.8, towers=("vision",), image_size=32)
    cfg = crossget.config(model)
    assert cfg.image_size == 32 and sum(cfg.r["vision"]) < sum(planned_64)
    with torch.no_grad():
        model.get_image_features(pixel_values=images[:1], interpolate_pos_encoding=True)
    assert crossget.states(model)["vision"].tokens == crossget.tokens_per_layer(model)["vision"]
    assert crossget.tokens_per_layer(model, image_size=64)["vision"][0] == 1 + 16**2 - cfg.r["vision"][0]
    crossget.patch_from_config(model, cfg.to_dict())
    assert crossget.config(model) == cfg
    for bad in (0, -32, 32.5):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            crossget.patch(model, flops=0.8, image_size=bad)
    with pytest.raises(ValueError, match="image_size= is not an option of the LLaVA family"):
        crossget.patch(make_llava(), keep=20, image_size=32)
