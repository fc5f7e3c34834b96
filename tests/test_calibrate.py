"""crossget.calibrate: a per-layer schedule searched on calibration data at a FLOPs target, on
tiny random ViT / DINOv2 towers and a CLIPModel: it meets the target under the cost model the
constant schedule is solved with, never ends worse than the constant schedule it starts from,
is deterministic, is recorded as ``schedule="calibrated"`` and replays exactly; errors; the
``crossget calibrate`` command on a saved tiny model."""

import argparse
import json

import pytest
import torch
from conftest import make_clip
from test_vit import make

import crossget
from crossget.calibration import default_embed, move, search_schedule
from crossget.config import PatchConfig
from crossget.families.registry import family_of

TARGET = 0.6


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and the machine is shared)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calib():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def embed_of(model, pixels):
    with torch.no_grad():
        return default_embed(model, {"pixel_values": pixels}).float()


def cosine(model, pixels, ref):
    return torch.nn.functional.cosine_similarity(embed_of(model, pixels), ref, dim=-1).mean().item()


MODELS = {
    "vit": lambda: make("vit", layers=4),
    "dinov2": lambda: make("dinov2", layers=4),
    "clip": lambda: make_clip(layers=4),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_meets_the_target_and_is_no_worse_than_constant(name, calib):
    model = MODELS[name]()
    ref = embed_of(model, calib)
    res = search_schedule(model, calib, TARGET, max_evals=30)
    cfg = crossget.config(model)
    assert cfg.schedule == "calibrated" and cfg.flops == TARGET
    assert cfg.r == {"vision": tuple(res.schedule["vision"])}
    assert cfg.flops_estimate == pytest.approx(res.estimate) and res.estimate <= TARGET
    # the estimate is the cost model patch(flops=...) solves with: recomputed from the family's plan
    plan = family_of(model).flops_plan(model, cfg)
    assert plan.ratio(res.schedule) == pytest.approx(res.estimate)
    assert res.objective >= res.constant_objective
    assert 3 <= res.evaluations <= 30
    # the reported objective is what the patched model gives
    assert cosine(model, calib, ref) == pytest.approx(res.objective, abs=1e-5)
    # the start is the constant schedule of patch(flops=...), at the same estimate
    const = MODELS[name]()
    crossget.patch(const, flops=TARGET)
    assert crossget.config(const).r == {"vision": tuple(res.constant["vision"])}
    assert crossget.config(const).flops_estimate == pytest.approx(res.constant_estimate)
    assert cosine(const, calib, ref) == pytest.approx(res.constant_objective, abs=1e-5)


def test_deterministic(calib):
    a, b = make("dinov2", layers=4), make("dinov2", layers=4)
    crossget.calibrate(a, calib, TARGET, max_evals=20)
    crossget.calibrate(b, calib, TARGET, max_evals=20)
    assert crossget.config(a) == crossget.config(b)


def test_config_round_trips_and_replays_without_data(calib):
    model = make("vit", layers=4)
    crossget.calibrate(model, {"pixel_values": calib}, TARGET, max_evals=20)
    cfg = crossget.config(model)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert PatchConfig.from_dict(saved) == cfg
    fresh = make("vit", layers=4)
    crossget.patch_from_config(fresh, saved)
    assert crossget.config(fresh) == cfg
    torch.testing.assert_close(embed_of(fresh, calib), embed_of(model, calib))


def test_patch_with_schedule_calibrated(calib):
    a, b = make("dinov2", layers=4), make("dinov2", layers=4)
    crossget.patch(a, flops=TARGET, schedule="calibrated", calibration=calib, method="tome")
    crossget.calibrate(b, calib, TARGET, method="tome")
    assert crossget.config(a) == crossget.config(b)
    assert crossget.config(a).method == "tome" and crossget.config(a).schedule == "calibrated"


def test_keeps_trained_cross_tokens_and_other_settings(calib):
    model = make_clip(layers=4)
    crossget.patch(model, r=2)
    theta = crossget.states(model)["vision"].cross_tokens
    with torch.no_grad():
        theta.normal_()
    crossget.calibrate(model, calib, TARGET, max_evals=10, guidance="scaled", guidance_scale=0.5)
    cfg = crossget.config(model)
    assert (cfg.guidance, cfg.guidance_scale) == ("scaled", 0.5)
    assert crossget.states(model)["vision"].cross_tokens is theta


def test_move_stays_within_the_target():
    model = make("vit", layers=4)
    plan = family_of(model).flops_plan(model, PatchConfig(flops=TARGET))
    start, _ = plan.solve(TARGET)
    cand = move(start, ("vision", 1), ("vision", 0), 4, plan, TARGET)  # layer 0 takes 4 tokens of layer 1's r
    assert cand is not None and plan.ratio(cand) <= TARGET
    assert cand["vision"][1] == start["vision"][1] - 4 and cand["vision"][0] > start["vision"][0]
    # a later layer cannot make up for 4 tokens fewer in the first: the clamp r <= (N - P) // 2
    assert move(start, ("vision", 0), ("vision", 3), 4, plan, TARGET) is None
    assert move({"vision": [0, 0, 0, 0]}, ("vision", 0), ("vision", 1), 1, plan, TARGET) is None


@pytest.mark.parametrize(
    "call, error, match",
    [(lambda m, x: crossget.patch(m, flops=TARGET, schedule="calibrated"), ValueError, "needs calibration"),
     (lambda m, x: crossget.patch(m, r=4, schedule="calibrated", calibration=x), ValueError, "not r="),
     (lambda m, x: crossget.patch(m, schedule="calibrated", calibration=x), ValueError, "needs flops="),
     (lambda m, x: crossget.patch(m, flops=TARGET, schedule="learned", calibration=x), ValueError,
      "schedule must be one of"),
     (lambda m, x: crossget.patch(m, flops=TARGET, calibration=x), ValueError, "is for schedule='calibrated'"),
     (lambda m, x: crossget.patch_from_config(m, {"flops": TARGET, "schedule": "calibrated"}), ValueError,
      "needs its per-layer r"),
     (lambda m, x: crossget.calibrate(m, x, TARGET, method="none"), ValueError, "merging method"),
     (lambda m, x: crossget.calibrate(m, x, TARGET, r=4), ValueError, "r= is not"),
     (lambda m, x: crossget.calibrate(m, x, TARGET, max_evals=1), ValueError, "max_evals"),
     (lambda m, x: crossget.calibrate(m, x, 0.01), ValueError, "out of reach"),
     (lambda m, x: crossget.calibrate(m, [x], TARGET), TypeError, "calibration must be"),
     (lambda m, x: crossget.calibrate(m, {"flag": True}, TARGET), ValueError, "no tensor")],
)
def test_errors_leave_the_model_as_it_was(call, error, match, calib):
    model = make("vit", layers=2)
    with pytest.raises(error, match=match):
        call(model, calib)
    assert not crossget.is_patched(model)


def test_cli_writes_a_replayable_schedule(tmp_path, capsys):
    from PIL import Image
    from transformers import ViTImageProcessor

    from crossget.tools.cli.calibrate import calibrate, calibrate_arguments

    model = make("vit", layers=3)
    model.save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "images").mkdir()
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    parser = argparse.ArgumentParser()
    calibrate_arguments(parser)
    out = tmp_path / "schedule.json"
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"),
                              "--flops", "0.7", "--n", "4", "--max-evals", "12", "--out", str(out), "--quiet",
                              "--threads", "1"])
    assert calibrate(args) == 0
    payload = json.loads(out.read_text())
    assert payload["n"] == 4 and payload["evaluations"] <= 12
    assert payload["calibrated"]["objective"] >= payload["constant"]["objective"]
    assert payload["calibrated"]["flops_estimate"] <= 0.7 and payload["constant"]["flops_estimate"] <= 0.7
    assert payload["config"]["schedule"] == "calibrated"
    printed = capsys.readouterr().out
    assert "| calibrated |" in printed and "| constant |" in printed
    fresh = make("vit", layers=3)
    crossget.patch_from_config(fresh, payload["config"])
    assert crossget.config(fresh).r == {"vision": tuple(payload["calibrated"]["r"]["vision"])}


@pytest.mark.parametrize("patched", [False, True])
def test_an_error_mid_search_puts_the_model_back(patched, calib):
    model = make_clip(layers=4)
    if patched:
        crossget.patch(model, flops=0.8, method="tome")
    before = crossget.config(model) if patched else None
    calls = []

    def failing(m, inputs):
        calls.append(1)
        if len(calls) > 2:  # the reference and the start ran: the model is patched for a candidate
            raise RuntimeError("boom")
        return default_embed(m, inputs)

    with pytest.raises(RuntimeError, match="boom"):
        crossget.calibrate(model, calib, TARGET, embed=failing)
    assert crossget.is_patched(model) == patched
    if patched:
        assert crossget.config(model) == before
    assert model.training is False
