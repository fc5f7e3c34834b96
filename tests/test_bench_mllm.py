"""`crossget bench` for LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL (crossget/tools/bench_mllm.py),
on tiny configs of crossget.tools.zoo (no absolute times are checked)."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from crossget.families.visual_site import site_and_lm_flops
from crossget.tools import bench_mllm
from crossget.tools.cli import main

TINY = ("llava-next-tiny", "llava-onevision-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny")
KEEPS = (4, 8, 12)
FLOPS_TOL = 1e-9  # relative: analytic and counted LM FLOPs are the same matmul products


@pytest.mark.parametrize("name", TINY)
def test_flops_table_has_every_method_and_keep_and_ratios_fall_with_keep(name):
    spec = bench_mllm.SPECS[name]
    rows = bench_mllm.flops_rows(bench_mllm.meta_model(name), spec, spec.flops_image, keeps=KEEPS, text_len=5)
    assert rows[0]["name"] == "baseline" and rows[0]["ratio"] == 1.0
    # the tower-site rows of the tiny NeXT / OneVision: tiles too small for these budgets (left out)
    assert {(r["method"], r["keep"]) for r in rows[1:]} == {(m, k) for m in bench_mllm.METHODS for k in KEEPS}
    for m in bench_mllm.METHODS:
        ratios = [r["ratio"] for k in KEEPS for r in rows if r["method"] == m and r["keep"] == k]
        assert len(ratios) == len(KEEPS) and 0 < ratios[0] and ratios[-1] < 1
        assert all(a < b for a, b in zip(ratios, ratios[1:]))  # fewer tokens, fewer FLOPs
    for r in rows:  # the LM part counted by FlopCounterMode on the meta device
        assert r["lm_rel_diff"] == pytest.approx(0, abs=FLOPS_TOL)


@pytest.mark.parametrize("name", TINY)
def test_analytic_lm_flops_are_what_the_real_language_model_does(name):
    """The analytic LM part against FlopCounterMode on the family's own (tiny, random) language
    model class, eager attention: the Llama stand-in of the meta count has the same products."""
    model = bench_mllm.scaled_model(name, lm_layers=3)
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"
    n, text_len = 20, 5
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        lm(inputs_embeds=torch.randn(1, n + text_len, lm.config.hidden_size))
    analytic = site_and_lm_flops(lm.config, "none", n, n, text_len, 2)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=FLOPS_TOL)
    counted = bench_mllm.counted_lm_flops(lm.config, [(3, n + text_len)])
    assert counted == pytest.approx(analytic, rel=FLOPS_TOL)


@pytest.mark.parametrize("name", ["llava-next-tiny", "llava-onevision-tiny"])
def test_vision_side_counted_on_meta_is_the_analytic_one(name):
    spec = bench_mllm.SPECS[name]
    model = bench_mllm.meta_model(name)
    rows = bench_mllm.flops_rows(model, spec, spec.flops_image, keeps=(4,), text_len=5, counted=False)
    counted = bench_mllm.counted_vision_flops(model, spec, spec.flops_image)
    assert counted / 1e9 == pytest.approx(rows[0]["vision_gflops"], rel=FLOPS_TOL)


def test_timing_loop_runs_a_round_and_writes_the_three_files(tmp_path):
    out = tmp_path / "bench"
    bench_mllm.run_mllm_benchmark("llava-next-tiny", keeps=KEEPS, time_keeps=(40, 60), text_len=5, new_tokens=3,
                                  rounds=1, threads=1, out_dir=out, progress=False, time_image=(112, 112))
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "tradeoff.png"]
    saved = json.loads((out / "results.json").read_text())
    t = saved["timing"]
    takes = bench_mllm.methods_of(bench_mllm.SPECS["llava-next-tiny"])
    assert takes[-3:] == ("tome@tower", "crossget@tower", "visionzip")
    assert [r["name"] for r in t["rows"]] == ["baseline"] + [f"{m} keep={k}" for k in (40, 60) for m in bench_mllm.METHODS] \
        + [f"{m} keep={k}" for k in (40, 60) for m in takes[-3:]]
    for r in t["rows"]:
        assert len(r["times"]) == 1 and r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["ttft_speedup"] > 0
        assert 0 < r["flops_ratio"] <= 1
    assert t["rows"][0]["ttft_speedup"] == 1.0
    md = (out / "results.md").read_text()
    assert "fastv keep=60" in md and "1st token ms" in md and "tome@tower keep=40" in md


@pytest.mark.parametrize("name", ["llava-onevision-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_timing_runs_the_other_families(name, tmp_path):
    res = bench_mllm.run_mllm_benchmark(name, keeps=(4,), time_keeps=(4,), text_len=5, new_tokens=2, rounds=1,
                                        threads=1, out_dir=tmp_path, progress=False)
    assert len(res["timing"]["rows"]) == 1 + len(bench_mllm.METHODS)  # keep 4: too few per tile for the tower site


def test_cli_flops_only_for_a_real_size_model(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["bench", "--model", "qwen2.5-vl-7b", "--keep", "64", "--no-latency", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert "timing" not in saved and saved["meta"]["stock_visual_tokens"] == 1024
    assert [r["name"] for r in saved["flops"]] == ["baseline"] + [f"{m} keep=64" for m in bench_mllm.METHODS]
    assert bench_mllm.METHODS == ("tome", "crossget", "divprune", "fastv", "dart")
    assert (out / "tradeoff.png").exists()


@pytest.mark.parametrize("name", ["llava-next-7b", "llava-onevision-7b"])
def test_tower_site_rows_keep_per_tile_and_save_the_tower(name):
    """``@tower`` / VisionZip rows: every tile keeps ``keep // tiles`` tokens, the LM gets tiles x that
    (counted LM = analytic), and merging in the tower costs less than the same image budget at the
    projector site, whose tower runs unreduced."""
    spec = bench_mllm.SPECS[name]
    model = bench_mllm.meta_model(name)
    rows = bench_mllm.flops_rows(model, spec, spec.flops_image, keeps=(128,), text_len=8)
    tiles = spec.family.FAMILY.tiles(model, spec.flops_image)
    by = {r["method"]: r for r in rows}
    assert ("visionzip" in by) == (name == "llava-next-7b")  # SigLIP has no CLS for VisionZip
    for m in ("tome", "crossget"):
        tower = by[f"{m}@tower"]
        assert tower["tile_keep"] == 128 // tiles and tower["lm_visual_tokens"] == tiles * (128 // tiles)
        assert tower["lm_rel_diff"] == pytest.approx(0, abs=FLOPS_TOL)
        assert tower["vision_gflops"] < by[m]["vision_gflops"] and tower["ratio"] < by[m]["ratio"]


def test_lm_pruning_rows_keep_the_stock_prompt_and_count_the_lm_after_k():
    """FastV and DART: the stock count enters the LM, ``keep`` after layer K; Qwen3-VL's K is its
    deep-stack levels (3), and the counted LM agrees with the analytic one there too."""
    spec = bench_mllm.SPECS["qwen3-vl-8b"]
    assert spec.fastv_layer == 3
    rows = bench_mllm.flops_rows(bench_mllm.meta_model("qwen3-vl-8b"), spec, spec.flops_image, keeps=(64,), text_len=8)
    by = {r["method"]: r for r in rows}
    for m in ("fastv", "dart"):
        assert by[m]["visual_tokens"] == 1024 and by[m]["lm_visual_tokens"] == 64
        assert by[m]["lm_rel_diff"] == pytest.approx(0, abs=FLOPS_TOL)
    for m in ("tome", "crossget", "divprune"):
        assert by[m]["visual_tokens"] == by[m]["lm_visual_tokens"] == 64
    assert by["dart"]["matching_gflops"] > 0 == by["fastv"]["matching_gflops"]  # DART's pivot similarities
    assert by["fastv"]["ratio"] > by["tome"]["ratio"]  # K layers on the full prompt


@pytest.mark.parametrize("args, match", [
    (["--methods", "tome,visionzip", "--model", "qwen2.5-vl-7b"], "--methods among"),
    (["--r", "4"], "--keep"),
])
def test_cli_refuses_what_these_families_do_not_take(args, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "llava-next-7b", "--out", str(tmp_path), "--no-latency", *args])
    assert match in capsys.readouterr().err


def test_cli_refuses_mllm_options_elsewhere(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "clip-tiny", "--r", "2", "--vision-layers", "2", "--out", str(tmp_path)])
    assert "--vision-layers" in capsys.readouterr().err
