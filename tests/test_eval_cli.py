"""End to end on a tiny saved model and tiny generated data: train cross tokens, eval, sweep, demo."""

import json

import pytest
from conftest import save_shapes_clip

from crossget.tools.cli import main


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    # the vision tower dominates the FLOPs, as in the default model
    return save_shapes_clip(tmp_path_factory.mktemp("tiny"), 24, 12, image_size=64, vision_width=32,
                            vision_layers=4, projection_dim=16)


def test_train_eval_sweep_demo(tiny_setup, tmp_path):
    root, ann = tiny_setup
    common = ["--model", str(root / "model"), "--data", str(ann), "--threads", "1", "--batch", "8"]
    assert main(["train", *common, "--split", "train", "--flops", "0.7", "--steps", "3",
                 "--out", str(tmp_path / "cross")]) == 0
    tokens = tmp_path / "cross" / "cross_tokens.safetensors"
    assert tokens.exists()
    log = json.loads((tmp_path / "cross" / "training.json").read_text())
    assert log["command"].startswith("crossget ") and log["threads"] == 1 and log["train_seconds"] > 0
    assert main(["eval", "retrieval", *common, "--method", "crossget", "--flops", "0.7", "--cross-tokens", str(tokens),
                 "--json", str(tmp_path / "one.json")]) == 0
    result = json.loads((tmp_path / "one.json").read_text())["results"][0]
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "gflops", "gflops_ratio",
                "images_per_s", "fidelity"):
        assert key in result
    assert 0.5 < result["gflops_ratio"] < 0.85 and 0 < result["fidelity"] <= 1.0
    assert main(["eval", "sweep", *common, "--levels", "0.8,0.6", "--cross-tokens", str(tokens),
                 "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert len(rows) == 1 + 2 * 3 and (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert rows[0]["gflops_ratio"] == 1.0 and rows[0]["fidelity"] == pytest.approx(1.0)
    # generated data: every row carries hard-negative twin accuracy, also in the table
    assert all(0 <= r["twin_mean"] <= 100 for r in rows)
    assert "twin acc." in (tmp_path / "sweep" / "sweep.md").read_text()
    assert main(["demo", *common, "--json", str(tmp_path / "demo.json")]) == 0


def test_sweep_with_calibrated_schedules(tiny_setup, tmp_path):
    root, ann = tiny_setup
    common = ["--model", str(root / "model"), "--data", str(ann), "--threads", "1", "--batch", "8"]
    assert main(["eval", "sweep", *common, "--levels", "0.7", "--variants", "tome,scaled-0.1",
                 "--calibrated", "tome", "--calibration", "6", "--calibration-evals", "6",
                 "--out", str(tmp_path / "sweep")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]}
    cal, const = rows["tome+calibrated flops=0.7"], rows["tome flops=0.7"]
    # searched under the same estimate as the constant schedule: at most its measured GFLOPs (+ rounding)
    assert cal["variant"] == "tome+calibrated" and cal["gflops_ratio"] <= const["gflops_ratio"] + 0.01
    assert len(cal["schedule"]["vision"]) == 4 and sum(cal["schedule"]["vision"]) > 0


def test_train_all_weights_then_eval_the_fine_tuned_model(tiny_setup, tmp_path):
    root, ann = tiny_setup
    common = ["--data", str(ann), "--threads", "1", "--batch", "8"]
    out = tmp_path / "ft"
    assert main(["train", "--model", str(root / "model"), *common, "--split", "train", "--flops", "0.7", "--steps", "2",
                 "--all-weights", "--weights-lr", "1e-3", "--out", str(out)]) == 0
    assert json.loads((out / "training.json").read_text())["weights_lr"] == 1e-3
    # the fine-tuned model folder is complete (weights + processor) and evaluates with its cross tokens
    assert main(["eval", "retrieval", "--model", str(out / "model"), *common, "--method", "crossget", "--flops", "0.7",
                 "--cross-tokens", str(out / "cross_tokens.safetensors"), "--json", str(tmp_path / "ft.json")]) == 0
    assert json.loads((tmp_path / "ft.json").read_text())["results"][0]["gflops_ratio"] < 0.85


def test_eval_errors_name_the_problem(tiny_setup, tmp_path, capsys):
    root, ann = tiny_setup
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--model", str(tmp_path / "nowhere"), "--data", str(ann), "--method", "none"])
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--model", str(root / "model"), "--data", str(tmp_path / "missing.json"),
              "--method", "none"])
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--model", str(root / "model"), "--data", str(ann), "--method", "tome"])
    assert "--r or --flops" in capsys.readouterr().err
    for bad, words in (("gpu0", "not a torch device"), ("cuda:99", "CUDA devices")):
        with pytest.raises(SystemExit):
            main(["eval", "retrieval", "--model", str(root / "model"), "--data", str(ann), "--method", "none",
                  "--device", bad])
        assert words in capsys.readouterr().err
