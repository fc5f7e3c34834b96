"""One patch config for every family: ``patch_from_config(config(m))`` round-trips over the
whole grid of families x methods x budgets (and through JSON), a replayed config gives the
same outputs, and a keyword a family does not take is an error that names the family."""

import copy
import json

import pytest
import torch
from conftest import make_clip, make_texts
from test_blip import make_blip, make_blip2
from test_dual_encoder import make_dual, make_text
from test_dual_encoder import run_dual as run_dual_encoder
from test_dual_encoder import run_text as run_bert
from test_llava import make_llava, make_prompts
from test_llava_next import WIDE, make_next
from test_llava_next import inputs as next_inputs
from test_llava_onevision import WIDE as OV_WIDE
from test_llava_onevision import inputs as ov_inputs
from test_llava_onevision import make_ov
from test_qwen3_vl import WIDE as QWEN3_WIDE
from test_qwen3_vl import inputs as qwen3_inputs
from test_qwen3_vl import make_qwen3
from test_qwen_vl import WIDE as QWEN_WIDE
from test_qwen_vl import inputs as qwen_inputs
from test_qwen_vl import make_qwen
from test_siglip import both as siglip_inputs
from test_siglip import make as make_siglip
from test_vit import make, make_head
from transformers import (
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    CLIPTextModel,
    CLIPVisionModel,
)

import crossget
from crossget.config import DEFAULT_GUIDANCE, GUIDANCE, GUIDANCE_SCALES, METHODS, PatchConfig
from crossget.families.registry import FAMILIES, family_of

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def clip_model():
    return make_clip()


def clip_vision():
    torch.manual_seed(0)
    return CLIPVisionModel(make_clip().config.vision_config).eval()


def clip_text():
    torch.manual_seed(0)
    return CLIPTextModel(make_clip().config.text_config).eval()


def run_clip(m):
    ids, mask = make_texts((6, 9))
    return m(input_ids=ids, attention_mask=mask, pixel_values=PIXELS).logits_per_image


def run_vision(m):
    return m(pixel_values=PIXELS).pooler_output


def run_text(m):
    ids, mask = make_texts((6, 9))
    return m(input_ids=ids, attention_mask=mask).pooler_output


def run_blip_itm(m):
    ids = torch.tensor([[52, 5, 6, 7], [52, 8, 9, 0]])
    mask = (ids != 0).long()
    return m(input_ids=ids, attention_mask=mask, pixel_values=PIXELS).itm_score


def run_blip_caption(m):
    ids = torch.tensor([[50, 5, 6, 7], [50, 8, 9, 10]])
    return m(input_ids=ids, pixel_values=PIXELS).logits


def run_blip2(m):
    ids = torch.tensor([[59] * 4 + [1, 5, 6], [59] * 4 + [1, 8, 9]])
    return m(input_ids=ids, pixel_values=PIXELS).logits


def run_llava(m):
    ids, mask = make_prompts(crossget.image_tokens(m), lengths=(5, 3))
    return m(input_ids=ids, attention_mask=mask, pixel_values=PIXELS).logits


# (name, build, run, [(method, budget keywords), ...])
ENCODER = [("none", {}), ("tome", {"r": 2}), ("tome", {"flops": 0.7}), ("crossget", {"r": [3, 2, 1]}),
           ("crossget", {"flops": 0.7}), ("crossget", {"r": 2, "importance": "none"})]
GRID = [
    ("CLIPModel", clip_model, run_clip, ENCODER + [("crossget", {"r": {"vision": 2, "text": 1},
                                                                  "towers": ("vision", "text")})]),
    ("CLIPVisionModel", clip_vision, run_vision, ENCODER),
    ("CLIPTextModel", clip_text, run_text, [("tome", {"r": 1}), ("crossget", {"r": 1})]),
    ("BlipForImageTextRetrieval", lambda: make_blip(BlipForImageTextRetrieval), run_blip_itm,
     [c for c in ENCODER if "flops" not in c[1]] + [("crossget", {"flops": 0.8}),
                                                     ("crossget", {"r": 1, "towers": ("vision", "text")})]),
    ("BlipForConditionalGeneration", lambda: make_blip(BlipForConditionalGeneration), run_blip_caption,
     [("none", {}), ("tome", {"r": 2}), ("crossget", {"flops": 0.8})]),
    ("Blip2ForConditionalGeneration", lambda: make_blip2(Blip2ForConditionalGeneration), run_blip2,
     [("none", {}), ("tome", {"r": 2}), ("crossget", {"r": 2}), ("crossget", {"flops": 0.8})]),
    ("LlavaForConditionalGeneration", make_llava, run_llava,
     [("none", {}), ("tome", {"r": 8}), ("tome", {"keep": 30}), ("crossget", {"keep": 30}),
      ("crossget", {"flops": 0.7, "text_len": 8}), ("crossget", {"r": 8, "importance": "none"}),
      ("fastv", {"keep": 20}), ("fastv", {"keep": 20, "fastv_layer": 1}), ("fastv", {"flops": 0.7, "text_len": 8}),
      ("visionzip", {"keep": 20}), ("visionzip", {"keep": 20, "contextual": 4}), ("visionzip", {"r": 8}),
      ("divprune", {"keep": 20}), ("divprune", {"flops": 0.8, "text_len": 8}), ("dart", {"keep": 20}),
      ("dart", {"keep": 20, "fastv_layer": 1}), ("dart", {"flops": 0.9, "text_len": 8})]),
    ("LlavaNextForConditionalGeneration", make_next, lambda m: m(**next_inputs(m, (WIDE, WIDE))).logits,
     [("none", {}), ("tome", {"keep": 20}), ("crossget", {"keep": 20}),
      ("crossget", {"flops": 0.5, "text_len": 8}), ("fastv", {"keep": 20}), ("divprune", {"keep": 20}),
      ("dart", {"keep": 20}), ("visionzip", {"keep": 12}), ("tome", {"keep": 10, "site": "tower"}),
      ("crossget", {"r": 4, "site": "tower"}), ("crossget", {"flops": 0.7, "text_len": 8, "site": "tower"})]),
    ("LlavaOnevisionForConditionalGeneration", make_ov, lambda m: m(**ov_inputs(m, (OV_WIDE, OV_WIDE))).logits,
     [("none", {}), ("tome", {"keep": 12}), ("crossget", {"keep": 12}), ("crossget", {"flops": 0.5, "text_len": 8}),
      ("fastv", {"keep": 12, "fastv_layer": 1}), ("divprune", {"keep": 12}), ("dart", {"keep": 12, "fastv_layer": 1}),
      ("tome", {"keep": 6, "site": "tower"}), ("crossget", {"r": [4, 2], "site": "tower"}),
      ("crossget", {"flops": 0.7, "text_len": 8, "site": "tower"})]),
    ("Qwen2_5_VLForConditionalGeneration", make_qwen, lambda m: m(**qwen_inputs(m, (QWEN_WIDE, QWEN_WIDE))).logits,
     [("none", {}), ("tome", {"keep": 7}), ("crossget", {"keep": 7}),
      ("tome", {"flops": 0.75, "image_size": 64, "text_len": 8}), ("fastv", {"keep": 7, "fastv_layer": 1}),
      ("divprune", {"keep": 7}), ("dart", {"keep": 7, "fastv_layer": 1})]),
    ("Qwen3VLForConditionalGeneration", make_qwen3, lambda m: m(**qwen3_inputs(m, (QWEN3_WIDE, QWEN3_WIDE))).logits,
     [("none", {}), ("tome", {"keep": 7}), ("crossget", {"keep": 7}), ("fastv", {"keep": 7, "fastv_layer": 2}),
      ("divprune", {"keep": 7}), ("dart", {"keep": 7, "fastv_layer": 2})]),
    ("ViTModel", lambda: make("vit"), run_vision, ENCODER),
    ("DeiTForImageClassificationWithTeacher", lambda: make_head("DeiTForImageClassificationWithTeacher"),
     lambda m: m(pixel_values=PIXELS).logits, [("none", {}), ("tome", {"r": 2}), ("crossget", {"flops": 0.7})]),
    ("Dinov2Model", lambda: make("dinov2"), run_vision, [("tome", {"flops": 0.7}), ("crossget", {"r": [3, 2, 1]})]),
    ("Dinov2WithRegistersForImageClassification", lambda: make_head("Dinov2WithRegistersForImageClassification"),
     lambda m: m(pixel_values=PIXELS).logits,
     [("none", {}), ("tome", {"r": 2}), ("crossget", {"flops": 0.7}), ("crossget", {"r": 2, "importance": "none"})]),
    ("SiglipModel", lambda: make_siglip("SiglipModel"), lambda m: m(**siglip_inputs(False)).logits_per_image,
     ENCODER + [("crossget", {"r": {"vision": 2, "text": 1}, "towers": ("vision", "text")})]),
    ("SiglipVisionModel", lambda: make_siglip("SiglipVisionModel"), run_vision,
     [("none", {}), ("tome", {"r": 2}), ("crossget", {"flops": 0.7})]),
    ("Siglip2Model", lambda: make_siglip("Siglip2Model"), lambda m: m(**siglip_inputs(True)).logits_per_image,
     [("none", {}), ("tome", {"r": 2}), ("tome", {"flops": 0.7}), ("crossget", {"r": [3, 2, 1]}),
      ("crossget", {"flops": 0.7}), ("crossget", {"r": 2, "towers": ("vision", "text")})]),
    ("VisionTextDualEncoderModel", make_dual, lambda m: run_dual_encoder(m).logits_per_image,
     ENCODER + [("crossget", {"r": {"vision": 2, "text": 1}, "towers": ("vision", "text")}),
                ("tome", {"flops": 0.8, "towers": ("vision", "text")})]),
    ("BertModel", make_text, lambda m: run_bert(m).pooler_output,
     [("none", {}), ("tome", {"r": 1}), ("tome", {"flops": 0.8}), ("crossget", {"r": [2, 1]}),
      ("crossget", {"flops": 0.8})]),
]
CASES = [(name, build, run, method, kw) for name, build, run, cases in GRID for method, kw in cases]


@pytest.mark.parametrize("name, build, run, method, kw", CASES,
                         ids=[f"{c[0]}-{c[3]}-{'-'.join(map(str, c[4]))}" for c in CASES])
def test_patch_from_config_round_trips(name, build, run, method, kw):
    model = build()
    crossget.patch(model, method=method, **kw)
    cfg = crossget.config(model)
    assert isinstance(cfg, PatchConfig) and cfg.method == method
    # through JSON, as saved beside cross tokens and in every result file
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert PatchConfig.from_dict(saved) == cfg
    with torch.no_grad():
        want = run(model)

    fresh = build()
    crossget.patch_from_config(fresh, saved)
    assert crossget.config(fresh) == cfg
    with torch.no_grad():
        got = run(fresh)
    assert torch.allclose(got, want, atol=1e-6)

    # again on the patched model itself, and through apply()
    crossget.patch_from_config(model, crossget.config(model))
    assert crossget.config(model) == cfg
    crossget.apply(fresh, None)
    assert not crossget.is_patched(fresh)
    crossget.apply(fresh, cfg)
    if method == "none":  # apply() gives the stock model for method="none"
        assert not crossget.is_patched(fresh)
    else:
        assert crossget.config(fresh) == cfg


def test_the_grid_covers_every_family_and_method():
    seen = {(family_of(build()).name, method) for _, build, _, cases in GRID for method, _ in cases}
    want = {(fam.name, m) for fam in FAMILIES for m in fam.methods}
    assert want <= seen
    assert set(METHODS) == {m for _, m in want}


@pytest.mark.parametrize(
    "build, kw, match",
    [
        (clip_model, {"r": 2, "keep": 30}, "keep= is not an option of the CLIP family"),
        (clip_model, {"r": 2, "fastv_layer": 1}, "fastv_layer= is not an option of the CLIP family"),
        (clip_model, {"r": 2, "method": "fastv"}, "for CLIP models"),
        (lambda: make_blip(BlipForImageTextRetrieval), {"r": 2, "contextual": 3}, "of the BLIP family"),
        (lambda: make_blip2(Blip2ForConditionalGeneration), {"keep": 30}, "of the BLIP-2 family"),
        (clip_model, {"r": 2, "importance": "received"}, "importance must be one of"),
        (clip_model, {"r": 2, "method": "bogus"}, "method must be one of"),
        (clip_model, {"r": 2, "towers": "vision"}, "sequence of tower names"),
    ],
)
def test_a_keyword_the_family_does_not_take_is_an_error(build, kw, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **{"method": "crossget", **kw})
    assert not crossget.is_patched(model)


def test_llava_takes_every_keyword_it_documents():
    """``fastv_layer`` and ``contextual`` go through crossget.patch (they used to raise TypeError)."""
    model = make_llava()
    crossget.patch(model, method="fastv", keep=20, fastv_layer=1)
    assert crossget.config(model).fastv_layer == 1
    crossget.patch(model, method="visionzip", keep=20, contextual=4)
    assert crossget.config(model).contextual == 4


@pytest.mark.parametrize("kw, match", [(dict(method="tome", keep=20, fastv_layer=1), "fastv_layer= is FastV's"),
                                       (dict(method="crossget", keep=20, contextual=4), "contextual= is VisionZip's")])
def test_llava_refuses_a_keyword_its_method_does_not_read(kw, match):
    model = make_llava()
    with pytest.raises(ValueError, match=match):
        crossget.patch(model, **kw)
    assert not crossget.is_patched(model)


def test_config_is_frozen_and_unknown_keys_are_refused():
    cfg = PatchConfig(method="tome", r=[1, 2])
    assert cfg.r == (1, 2)
    with pytest.raises(AttributeError):
        cfg.r = 3
    with pytest.raises(ValueError, match="unknown patch config keys"):
        PatchConfig.from_dict({"method": "tome", "bogus": 1})
    # files written before the config type stored importance=None for methods without one
    assert PatchConfig.from_dict({"method": "fastv", "keep": 20, "importance": None}).importance == "cross"


def test_an_unpatched_model_has_no_config():
    with pytest.raises(ValueError, match="not patched"):
        crossget.config(make_clip())


def test_a_patched_model_deep_copies_with_its_config():
    model = make_clip()
    crossget.patch(model, r=2)
    twin = copy.deepcopy(model)
    assert crossget.config(twin) == crossget.config(model)


@pytest.mark.parametrize(
    "kw, match",
    [({"guidance": "bogus"}, "guidance must be one of"),
     ({"guidance": "scaled", "guidance_scale": -1}, "guidance_scale must be"),
     ({"guidance": "scaled", "guidance_scale": float("nan")}, "guidance_scale must be"),
     ({"guidance": "reference", "guidance_scale": 0.5}, "takes no scale"),
     ({"schedule": "learned"}, "schedule must be one of")],
)
def test_guidance_and_schedule_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        PatchConfig(r=2, **kw)


def test_guidance_round_trips_and_reaches_the_tower():
    model = clip_model()
    crossget.patch(model, r=2, guidance="standardised", guidance_scale=0.5)
    cfg = crossget.config(model)
    assert (cfg.guidance, cfg.guidance_scale) == ("standardised", 0.5)
    assert PatchConfig.from_dict(cfg.to_dict()) == cfg
    settings = crossget.states(model)["vision"].settings
    assert (settings.guidance, settings.guidance_scale) == ("standardised", 0.5)


def test_guidance_defaults_come_from_the_rule_and_the_family():
    assert (PatchConfig().guidance, PatchConfig().guidance_scale) == (None, None)
    assert [PatchConfig(guidance=g).guidance_scale for g in GUIDANCE] == [GUIDANCE_SCALES[g] for g in GUIDANCE]
    assert GUIDANCE_SCALES["scaled"] == 0.1 and GUIDANCE_SCALES["rank"] == 0.25  # the measured settings
    model = clip_model()
    crossget.patch(model, r=2)
    cfg = crossget.config(model)
    assert (cfg.guidance, cfg.guidance_scale) == (DEFAULT_GUIDANCE, GUIDANCE_SCALES[DEFAULT_GUIDANCE])
    assert crossget.states(model)["vision"].settings.guidance == DEFAULT_GUIDANCE
    # LLaVA's attention importance was not measured under the other rules: the authors' rule
    llava = make_llava()
    crossget.patch(llava, keep=32)
    assert (crossget.config(llava).guidance, crossget.config(llava).guidance_scale) == ("reference", 1.0)
    # a replayed config runs the rule it reports, whatever today's default
    assert crossget.config(crossget.patch_from_config(clip_model(), cfg)) == cfg


def test_configs_saved_before_guidance_existed_read_as_the_reference_rule():
    old = {k: v for k, v in PatchConfig(r=2).to_dict().items() if k not in ("guidance", "guidance_scale", "schedule")}
    assert PatchConfig.from_dict(old).guidance == "reference"
    # a dict written by hand is not an old file: it takes the family's default rule
    assert PatchConfig.from_dict({"method": "crossget", "r": 2}).guidance is None
    model = clip_model()
    crossget.apply(model, {"method": "crossget", "r": 2})
    assert crossget.config(model).guidance == DEFAULT_GUIDANCE
