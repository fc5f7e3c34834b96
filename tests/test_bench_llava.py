"""The LLaVA benchmark: FLOP counts of the real architectures, and a tiny end-to-end run."""

import json

import pytest
from test_llava import make_llava
from torch.utils.flop_counter import FlopCounterMode

import crossget
from crossget.tools import bench_llava
from crossget.tools.eval.llava.arch import llava15_config, llava_flops


def test_lm_flops_match_the_whole_model_count():
    cfg = llava15_config("7b")
    mine = bench_llava.lm_flops(cfg, [(32, 576 + 64)], new_tokens=3)
    ref = llava_flops(cfg, visual_tokens=576, prompt_tokens=64, new_tokens=3, vision=False)
    assert mine["prefill"] == pytest.approx(ref["prefill"], rel=1e-9)
    assert mine["decode"] == pytest.approx(ref["decode"], rel=1e-9)
    assert bench_llava._projector_flops(cfg, 576) == pytest.approx(ref["projector"], rel=1e-9)


def test_lm_flops_split_depth_adds_up():
    """FastV's segments cost what their layers cost on their own sequences (one LM head)."""
    cfg = llava15_config("7b")
    tc = cfg.text_config
    head = 2 * tc.hidden_size * tc.vocab_size / 1e9
    full = bench_llava.lm_flops(cfg, [(32, 640)])["prefill"] - head
    short = bench_llava.lm_flops(cfg, [(32, 352)])["prefill"] - head
    split = bench_llava.lm_flops(cfg, [(2, 640), (30, 352)])["prefill"] - head
    assert split == pytest.approx(full * 2 / 32 + short * 30 / 32, rel=1e-9)
    with pytest.raises(ValueError, match="layers"):
        bench_llava.lm_flops(cfg, [(2, 640)])


def test_budget_configs():
    configs = bench_llava.budget_configs(["crossget", "fastv"], [64], [13])
    assert [c["name"] for c in configs] == ["baseline", "crossget keep=64", "fastv keep=64", "crossget r=13", "fastv r=13"]
    with pytest.raises(ValueError, match="methods"):
        bench_llava.budget_configs(["bogus"], [64], [])


def test_tiny_run_writes_results(tmp_path):
    model = make_llava()
    res = bench_llava.run_llava_benchmark(
        methods=bench_llava.METHODS, keeps=(20,), rs=(8,), sizes=("7b",), prompt_tokens=4, new_tokens=3, rounds=1,
        threads=1, out_dir=tmp_path, progress=False, model=model,
    )
    rows = {r["name"]: r for r in res["rows"]}
    # the composed count (tower run, projector and LM on meta) is what generate() executes
    for name, budget in (("baseline", None), ("fastv keep=20", dict(keep=20, method="fastv")),
                         ("crossget keep=20", dict(keep=20, method="crossget"))):
        if budget:
            crossget.patch(model, **budget)
        counter = FlopCounterMode(display=False)
        with counter:
            bench_llava._generate(model, bench_llava._prompt(model, 4), 3)
        assert counter.get_total_flops() / 1e9 == pytest.approx(rows[name]["scaled_gflops"], rel=1e-6), name
    assert rows["baseline"]["visual_tokens"] == 64 and rows["baseline"]["7b"]["ttft_ratio"] == 1.0
    assert rows["crossget keep=20"]["visual_tokens"] == 20 and rows["visionzip keep=20"]["visual_tokens"] == 20
    assert rows["fastv keep=20"]["visual_tokens"] == 64 and rows["fastv keep=20"]["lm_visual_tokens"] == 20
    assert rows["crossget r=8"]["visual_tokens"] == 65 - 16 - 1
    for name, row in rows.items():
        assert row["ttft_ms"] > 0 and row["decode_tok_s"] > 0 and row["peak_act_mib"] > 0, name
        if name != "baseline":
            assert row["7b"]["ttft_ratio"] < 1, name  # fewer visual tokens, fewer real-model FLOPs
            assert row["scaled_gflops"] < rows["baseline"]["scaled_gflops"], name
    # the tower of a merging method costs less; FastV leaves it alone
    assert rows["tome keep=20"]["vision_gflops"] < rows["baseline"]["vision_gflops"]
    assert rows["fastv keep=20"]["vision_gflops"] == pytest.approx(rows["baseline"]["vision_gflops"])
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["name"] == "baseline"
    md = (tmp_path / "results.md").read_text()
    assert "fastv keep=20 | 64 → 20" in md
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "clip-tiny", "--methods", "fastv", "--r", "1"], "llava-1.5"),
        (["bench", "--model", "clip-tiny", "--keep", "64", "--r", "1"], "llava-1.5"),
        (["bench", "--model", "llava-1.5", "--flops", "0.5"], "--keep"),
        (["bench", "--model", "llava-2", "--keep", "64"], "--model llava-1.5"),
    ],
)
def test_cli_errors(argv, message, capsys):
    from crossget.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_runs_the_llava_benchmark(monkeypatch, capsys, tmp_path):
    """The command hands its options to run_llava_benchmark (the real run is heavy)."""
    from crossget.tools.cli import bench as bench_command
    from crossget.tools.cli import main

    seen = {}

    def fake(**kw):
        seen.update(kw)
        (tmp_path / "results.md").write_text("| table |\n")

    monkeypatch.setattr(bench_command, "run_llava_benchmark", fake)
    argv = ["bench", "--model", "llava-1.5", "--methods", "crossget,fastv", "--keep", "64,128", "--r", "13",
            "--rounds", "3", "--threads", "1", "--max-new-tokens", "8", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert seen["methods"] == ["crossget", "fastv"] and seen["keeps"] == [64, 128] and seen["rs"] == [13]
    assert (seen["rounds"], seen["threads"], seen["new_tokens"], seen["lm_layers"]) == (3, 1, 8, 3)
    assert "| table |" in capsys.readouterr().out
