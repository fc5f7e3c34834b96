"""crossget.tools.bench and crossget.tools.memory on tiny random CLIP models (structure only, never times)."""

import json

import pytest
import torch

import crossget
from crossget.tools.bench import (
    SUMMARY_KEYS,
    build_configs,
    forward_for,
    load_model,
    make_inputs,
    run_benchmark,
)
from crossget.tools.memory import PeakMemory


def _run(model, tower="vision", configs=None, **kw):
    kw = {"rounds": 2, "warmup": 1, "threads": 1, "progress": False, **kw}
    configs = configs if configs is not None else build_configs(["tome", "crossget"], [2])
    return run_benchmark(model, make_inputs(model, tower, batch=2), configs, forward=forward_for(model, tower), **kw)


def test_summary_rows_and_files(tmp_path):
    model = load_model("clip-tiny", "vision")
    rows = _run(model, out_dir=tmp_path, meta={"model": "clip-tiny", "tower": "vision"})

    assert [r["name"] for r in rows] == ["baseline", "tome r=2", "crossget r=2"]
    for row in rows:
        assert tuple(row) == SUMMARY_KEYS
    base, tome, cg = rows
    assert base["method"] == "none" and base["schedule"] == {} and base["tokens_per_layer"] == {}
    assert base["speedup"] == 1.0 and base["gflops_ratio"] == 1.0 and base["latency_speedup"] == 1.0
    assert base["match_share"] == 0.0
    # 17 tokens (16 patches + CLS), 2 layers, r = 2
    assert tome["tokens_per_layer"] == {"vision": [15, 13]} == cg["tokens_per_layer"]
    assert tome["schedule"] == {"vision": [2, 2]}
    assert tome["gflops_ratio"] < 1
    for row in (tome, cg):
        assert 0 < row["match_share"] < 1
        assert row["batch_ms"] > 0 and row["latency_ms"] > 0 and row["peak_act_mib"] > 0
        assert row["samples_per_s"] == pytest.approx(2 / row["batch_ms"] * 1e3)
        assert row["speedup"] == pytest.approx(base["batch_ms"] / row["batch_ms"])

    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc) == {"meta", "configs", "raw", "summary"}
    assert doc["meta"]["model"] == "clip-tiny" and doc["meta"]["threads"] == 1 and doc["meta"]["batch"] == 2
    assert doc["meta"]["rounds"] == 2 and doc["meta"]["torch"] == torch.__version__
    assert [c["name"] for c in doc["configs"]] == [r["name"] for r in rows]
    for name, raw in doc["raw"].items():
        assert len(raw["batch_ms"]) == 2 and len(raw["latency_ms"]) == 2, name
    assert doc["summary"] == json.loads(json.dumps(rows))

    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one row per config
    assert all(f"| {r['name']} |" in md for r in rows)


def test_flops_target_and_both_towers():
    model = load_model("clip-tiny", "both")
    rows = _run(model, "both", [{"method": "tome", "flops": 0.95, "towers": ("vision", "text")}], latency=False)
    row = rows[1]
    assert row["flops_target"] == 0.95 and row["flops_estimate"] <= 0.95
    assert set(row["tokens_per_layer"]) == {"vision", "text"}
    assert row["gflops_ratio"] < 1
    assert row["latency_ms"] is None and rows[0]["latency_speedup"] is None


def test_model_is_given_back_as_it_came():
    model = load_model("clip-tiny", "vision")
    _run(model)
    assert not crossget.is_patched(model)

    crossget.patch(model, r=[1, 3], method="crossget")
    theta = crossget.states(model)["vision"].cross_tokens
    with torch.no_grad():
        theta.normal_()
    saved, before = crossget.config(model), theta.detach().clone()
    _run(model)
    assert crossget.config(model) == saved
    assert torch.equal(crossget.states(model)["vision"].cross_tokens, before)


def test_model_factory_and_explicit_baseline():
    rows = run_benchmark(
        lambda: load_model("clip-tiny", "vision"),
        make_inputs(load_model("clip-tiny", "vision"), "vision", 2),
        [{"method": "tome", "r": 1, "name": "t1"}, {"method": "none", "name": "stock"}],
        rounds=1, warmup=0, threads=1, progress=False,
    )
    assert [r["name"] for r in rows] == ["stock", "t1"]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "tome", "r": -1}, "non-negative"),
        ({"method": "magic", "r": 2}, "method"),
        ({"method": "tome", "rr": 2}, "unknown benchmark config keys"),
        ({"method": "none", "r": 4}, "stock"),
    ],
)
def test_bad_configs_fail_before_timing(config, message):
    model = load_model("clip-tiny", "vision")
    with pytest.raises(ValueError, match=message):
        _run(model, configs=[config], rounds=1000)
    assert not crossget.is_patched(model)


def test_duplicate_names_and_bad_rounds():
    model = load_model("clip-tiny", "vision")
    with pytest.raises(ValueError, match="unique"):
        _run(model, configs=[{"method": "tome", "r": 1}, {"method": "tome", "r": 1}])
    with pytest.raises(ValueError, match="rounds"):
        _run(model, rounds=0)


def test_unknown_model_and_tower():
    with pytest.raises(ValueError, match="neither a named architecture"):
        load_model("no/such/dir")
    with pytest.raises(ValueError, match="tower"):
        load_model("clip-tiny", "audio")


def test_inputs_and_forwards():
    model = load_model("clip-tiny", "both")
    x = make_inputs(model, "both", batch=3)
    assert x["pixel_values"].shape == (3, 3, 32, 32)
    eos = model.config.text_config.eos_token_id
    assert x["input_ids"].shape == (3, 16)
    assert (x["input_ids"][:, -1] == eos).all() and (x["input_ids"][:, :-1] != eos).all()
    with torch.inference_mode():
        image = forward_for(model, "vision")(model, {"pixel_values": x["pixel_values"]})
        text = forward_for(model, "text")(model, {k: x[k] for k in ("input_ids", "attention_mask")})
        both = forward_for(model, "both")(model, x)
    unit = torch.nn.functional.normalize
    assert torch.allclose(unit(image.pooler_output, dim=-1), both.image_embeds, atol=1e-5)
    assert torch.allclose(unit(text.pooler_output, dim=-1), both.text_embeds, atol=1e-5)


def test_peak_memory_counts_new_storages_only():
    a0 = torch.ones(1000)  # from outside: never counted
    with PeakMemory() as mem:
        view = a0[10:]  # a view of an outside storage
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2
        del a
        c = b + 1
        del b, view
    assert mem.peak_bytes == 8000
    assert mem.live_bytes == 4000  # only c is still alive
    del c
    assert mem.live_bytes == 0


def test_peak_memory_grows_with_batch():
    model = load_model("clip-tiny", "vision")
    peaks = []
    for batch in (1, 4):
        x = make_inputs(model, "vision", batch)
        with torch.inference_mode(), PeakMemory() as mem:
            model(**x)
        peaks.append(mem.peak_bytes)
    assert 3 * peaks[0] < peaks[1] <= 4 * peaks[0]
