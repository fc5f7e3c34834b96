"""The crossget command line: help, tiny bench and demo runs, clear errors."""

import json
import subprocess
import sys

import pytest

from crossget.tools.cli import COMMANDS, main
from crossget.tools.zoo import load_model

FAST = ["--rounds", "1", "--warmup", "0", "--threads", "1", "--batch", "2"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd.name in out


@pytest.mark.parametrize("command, option", [("bench", "--flops"), ("bench", "--tower"), ("demo", "--flops")])
def test_subcommand_help(capsys, command, option):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert option in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "crossget.tools.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--methods" in out.stdout


def test_tiny_bench_writes_results(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", "clip-tiny", "--methods", "tome,crossget", "--r", "1,2", "--out", str(out), *FAST]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in doc["summary"]]
    assert names == ["baseline", "tome r=1", "tome r=2", "crossget r=1", "crossget r=2"]
    assert doc["meta"]["tower"] == "vision" and doc["meta"]["batch"] == 2
    assert (out / "results.md").read_text() in capsys.readouterr().out


def test_bench_in_bfloat16(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "clip-tiny", "--r", "2", "--dtype", "bfloat16", "--out", str(out), *FAST]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["dtype"] == "bfloat16" and "bfloat16" in (out / "results.md").read_text()
    assert [r["name"] for r in doc["summary"]] == ["baseline", "tome r=2", "crossget r=2"]


def test_bench_of_a_local_model_both_towers(tmp_path):
    model_dir = tmp_path / "clip"
    load_model("clip-tiny", "both").save_pretrained(model_dir)
    out = tmp_path / "bench"
    args = ["bench", "--model", str(model_dir), "--tower", "both", "--reduce", "vision,text",
            "--methods", "tome", "--r", "1", "--no-latency", "--out", str(out), *FAST]
    assert main(args) == 0
    row = json.loads((out / "results.json").read_text())["summary"][1]
    assert set(row["tokens_per_layer"]) == {"vision", "text"}
    assert row["gflops_ratio"] < 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--r", "-1"], "non-negative integers"),
        (["--r", "2", "--methods", "tome,magic"], "'magic' is not one of tome, crossget"),
        (["--r", "2", "--model", "/no/such/model"], "neither a named architecture"),
        (["--flops", "1.5"], "not in (0, 1]"),
        (["--r", "2", "--batch", "0"], "--batch"),
        ([], "give --r and/or --flops"),
        (["--flops", "0.01"], "0.01"),  # raised by the schedule solver, shown cleanly
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "clip-tiny", "--out", str(tmp_path), *args, *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "crossget bench: error:" in err and message in err
    assert not (tmp_path / "results.json").exists()


def test_data_knobs_reach_the_generator(tmp_path):
    out = tmp_path / "d"
    assert main(["data", "--out", str(out), "--train", "3", "--val", "0", "--test", "0", "--image-size", "48",
                 "--entities", "3-3", "--object-scale", "1.2", "--clutter", "5"]) == 0
    images = json.loads((out / "dataset_shapes.json").read_text())["images"]
    assert len(images) == 3 and {len(im["objects"]) for im in images} == {3}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--entities", "two"], "MIN-MAX integers"),
        (["--entities", "3-5"], "n_entities"),
        (["--object-scale", "2"], "object_scale"),
        (["--clutter", "-2"], "--clutter"),
    ],
)
def test_bad_data_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["data", "--out", str(tmp_path / "d"), "--train", "1", "--val", "0", "--test", "0", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "crossget data: error:" in err and message in err
