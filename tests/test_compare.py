"""crossget compare: every method x budget x task once (stock once per task), the summary files,
resuming without rerunning, reruns on changed settings (or refusal), no half-written run files,
and errors that name what is wrong."""

import json

import numpy as np
import pytest
from PIL import Image

import crossget.tools.compare as cmp
from crossget.tools.cli import main
from crossget.tools.compare import (
    LLAVA_LAYOUT,
    TaskSpec,
    compare,
    llava_layout_tasks,
    parse_keeps,
    parse_methods,
    parse_task,
    run_path,
)
from crossget.tools.eval.llava import evaluate_llava, generate_answers, load_llava, load_vqa_questions
from crossget.tools.llava_small import build_llava_small

QUESTIONS = ["what colour is the object?", "what shape is in the top left?", "how many shapes are there?",
             "is there a red circle?"]
METHODS, KEEPS = ["crossget", "fastv"], [36, 72]
FAST = dict(batch_size=2, max_new_tokens=1, progress=False)


class Counter:
    """evaluate_llava, counting its calls (and failing on call ``fail_at`` when set)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs.get("model_id"))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return evaluate_llava(*args, **kwargs)


def counted(fail_at=None):
    spy = Counter(fail_at)
    mp = pytest.MonkeyPatch()
    mp.setattr(cmp, "evaluate_llava", spy)
    return spy, mp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA (shipped CLIP tower: 144 visual tokens; random 3 x 16 Llama), four images and
    questions whose ground truth is the stock model's own one-word answer (stock scores 100)."""
    root = tmp_path_factory.mktemp("compare")
    model, processor = build_llava_small(QUESTIONS + ["red blue circle square one two yes no"], lm_width=16,
                                         lm_layers=3, lm_heads=2, lm_intermediate=32)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
    q = root / "questions.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": f"img{i}.png", "text": t}) + "\n"
                         for i, t in enumerate(QUESTIONS)))
    model, processor = load_llava(root / "model")
    said = generate_answers(model, processor, load_vqa_questions(q).samples, root / "images", max_new_tokens=1,
                            progress=False).texts
    (root / "annotations.json").write_text(json.dumps([{"question_id": i, "answer": a} for i, a in enumerate(said)]))
    return root


def task(root, name="tiny"):
    return parse_task(f"{name}=vqa:{root / 'questions.jsonl'}:{root / 'images'}:{root / 'annotations.json'}")


@pytest.fixture(scope="module")
def first(setup):
    spy, mp = counted()
    lines = []
    try:
        results = compare(setup / "model", [task(setup)], METHODS, KEEPS, setup / "out", log=lines.append, **FAST)
    finally:
        mp.undo()
    return results, spy.calls, lines


def test_every_method_and_budget_runs_once_with_stock_once(setup, first):
    results, calls, lines = first
    assert sorted(calls) == sorted(["out/none"] + [f"out/{m}-{k}" for m in METHODS for k in KEEPS])
    spec = task(setup)
    for m, k in [("none", None)] + [(m, k) for m in METHODS for k in KEEPS]:
        stored = json.loads(run_path(setup / "out", cmp.Run(spec, m, k)).read_text())
        assert stored["settings"]["method"] == m and stored["settings"]["keep"] == k
        assert stored["result"]["n"] == 4 and stored["result"]["score"]["metric"] == "exact"
    assert len(lines) == 5 and all("task=tiny" in line and "GFLOPs" in line for line in lines)
    assert not list((setup / "out").rglob("*.tmp"))


def test_summary_rows_shares_and_ratios(setup, first):
    results, _, _ = first
    rows = {(r["method"], r["keep"]): r["tasks"]["tiny"] for r in results["rows"]}
    assert list(rows) == [("none", None)] + [(m, k) for m in METHODS for k in KEEPS]
    stock = rows[("none", None)]
    assert stock["score"] == 100.0 and stock["share"] == 100.0 and stock["prefill_ratio"] == 1.0
    assert stock["visual_tokens"] == 144 and rows[("crossget", 36)]["visual_tokens"] == 36
    for (m, k), c in rows.items():
        assert c["share"] == pytest.approx(c["score"]), (m, k)  # stock is 100
        assert c["prefill_ratio"] == pytest.approx(c["gflops_prefill"] / stock["gflops_prefill"])
    assert rows[("crossget", 36)]["prefill_ratio"] < rows[("crossget", 72)]["prefill_ratio"] < 1
    assert rows[("crossget", 36)]["cross_tokens"] == "zero (training-free)"
    on_disk = json.loads((setup / "out" / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
    md = (setup / "out" / "results.md").read_text()
    assert "| CrossGET (training-free) | 36 |" in md and "| stock | all | 100.0" in md and "| FastV | 72 |" in md
    assert "training-free" in md.split("\n\n", 1)[1]  # the note says what the row is
    assert (setup / "out" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_what_is_done(setup, first):
    spy, mp = counted()
    try:
        again = compare(setup / "model", [task(setup)], METHODS, KEEPS, setup / "out", log=lambda _: None, **FAST)
    finally:
        mp.undo()
    assert spy.calls == []
    assert again["rows"] == first[0]["rows"]


def test_changed_setting_reruns_or_refuses(setup, first):
    spy, mp = counted()
    try:
        with pytest.raises(ValueError, match=r"none\.json: batch_size: 2 -> 1\n.*crossget-36\.json: batch_size: 2 -> 1"):
            compare(setup / "model", [task(setup)], ["crossget"], [36], setup / "out",
                    on_change="refuse", **{**FAST, "batch_size": 1})
        assert spy.calls == []
        lines = []
        compare(setup / "model", [task(setup)], ["crossget"], [36], setup / "out", log=lines.append,
                **{**FAST, "batch_size": 1})
    finally:
        mp.undo()
    assert sorted(spy.calls) == ["out/crossget-36", "out/none"]
    assert any("batch_size: 2 -> 1" in line and "recomputing" in line for line in lines)
    stored = json.loads(run_path(setup / "out", cmp.Run(task(setup), "fastv", 72)).read_text())
    assert stored["settings"]["batch_size"] == 2  # runs not asked for are left alone


def test_interrupted_run_leaves_no_partial_file(setup):
    out = setup / "interrupted"
    spy, mp = counted(fail_at=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            compare(setup / "model", [task(setup)], ["tome"], [36], out, log=lambda _: None, **FAST)
        assert sorted(p.name for p in (out / "runs" / "tiny").iterdir()) == ["none.answers.jsonl", "none.json"]
        spy.calls.clear()
        spy.fail_at = None
        compare(setup / "model", [task(setup)], ["tome"], [36], out, log=lambda _: None, **FAST)
    finally:
        mp.undo()
    assert spy.calls == ["interrupted/tome-36"]  # the stock run was kept


def test_cli_runs_and_resumes(setup, capsys):
    args = ["compare", "--model", str(setup / "model"), "--methods", "none", "--keep", "36",
            "--task", f"tiny=vqa:{setup / 'questions.jsonl'}:{setup / 'images'}:{setup / 'annotations.json'}",
            "--out", str(setup / "out-cli"), "--batch", "2", "--max-new-tokens", "1", "--threads", "1"]
    spy, mp = counted()
    try:
        assert main(args) == 0
        assert spy.calls == ["out-cli/none"]  # only the stock model asked for
        assert main(args) == 0
    finally:
        mp.undo()
    assert len(spy.calls) == 1
    out = capsys.readouterr()
    assert "stock keep=all task=tiny: exact 100.00" in out.out + out.err and "1 of 1 runs already" in out.out + out.err
    meta = json.loads((setup / "out-cli" / "results.json").read_text())["meta"]
    assert meta["command"].startswith("crossget ") and meta["threads"] == 1


# --------------------------------------------------------------------------- errors
def test_task_specs_name_what_is_wrong(setup, tmp_path):
    with pytest.raises(ValueError, match="no 'NAME='"):
        parse_task("vqa:q.jsonl:images")
    with pytest.raises(ValueError, match="got 2 ':'-separated fields"):
        parse_task("x=vqa:q.jsonl")
    with pytest.raises(ValueError, match="unknown task kind 'caption'"):
        parse_task(f"x=caption:{setup / 'questions.jsonl'}:")
    with pytest.raises(ValueError, match="must be letters"):
        parse_task(f"a/b=vqa:{setup / 'questions.jsonl'}:")
    with pytest.raises(FileNotFoundError, match=r"questions .*nope\.jsonl.*images folder .*nodir"):
        parse_task(f"x=vqa:{tmp_path / 'nope.jsonl'}:{tmp_path / 'nodir'}")
    assert parse_task(f"mmb=mc:{setup / 'questions.jsonl'}:").images is None
    # LLaVA's layout: names checked, then every missing file named
    with pytest.raises(ValueError, match="unknown LLaVA eval task.*mme2.*known: gqa"):
        llava_layout_tasks(tmp_path, ["gqa", "mme2"])
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"gqa/data/images.*testdev_balanced_questions\.json"):
        llava_layout_tasks(tmp_path, ["gqa"])
    (tmp_path / "gqa" / "data" / "images").mkdir(parents=True)
    (tmp_path / "gqa" / "data" / "testdev_balanced_questions.json").write_text("{}")
    (spec,) = llava_layout_tasks(tmp_path, ["gqa"])
    assert (spec.kind, spec.questions.name) == ("vqa", "llava_gqa_testdev_balanced.jsonl")
    assert set(LLAVA_LAYOUT) >= {"gqa", "textvqa", "pope", "sqa", "mmbench"}


def test_budgets_methods_and_tasks_are_checked(setup):
    assert parse_keeps("72, 36,72") == [36, 72] and parse_methods("all")[0] == "tome" and "dart" in parse_methods("all")
    assert parse_methods("none,fastv,fastv") == ["fastv"]
    for bad, match in [("0", ">= 1"), ("a", "not an integer"), ("", "no budgets"), ([2.5], "whole number")]:
        with pytest.raises(ValueError, match=match):
            parse_keeps(bad)
    with pytest.raises(ValueError, match="unknown method.*fastvv.*LLaVA has tome"):
        parse_methods("tome,fastvv")
    spec = task(setup)
    with pytest.raises(ValueError, match="budget 200 is above the 144 visual tokens"):
        compare(setup / "model", [spec], ["tome"], [36, 200], setup / "never", **FAST)
    with pytest.raises(ValueError, match="repeated: tiny"):
        compare(setup / "model", [spec, spec], ["tome"], [36], setup / "never", **FAST)
    with pytest.raises(ValueError, match="no tasks"):
        compare(setup / "model", [], ["tome"], [36], setup / "never", **FAST)
    assert not (setup / "never").exists()
    assert isinstance(spec, TaskSpec)


def test_unsupported_model_folder_is_named(setup, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TypeError, match="'bert' model; these evaluations support model_type llava"):
        compare(tmp_path, [task(setup)], ["tome"], [36], tmp_path / "out", **FAST)


def test_cli_errors(setup, capsys):
    base = ["compare", "--model", str(setup / "model"), "--out", str(setup / "never")]
    for extra, message in [([], "no tasks"), (["--data", str(setup)], "go together"),
                           (["--task", "x=vqa:none.jsonl:"], "none.jsonl"),
                           (["--task", f"x=vqa:{setup / 'questions.jsonl'}:", "--methods", "magic"], "magic"),
                           (["--task", f"x=vqa:{setup / 'questions.jsonl'}:", "--keep", "-3"], ">= 1")]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err, extra


def test_standard_error_counts_the_questions_scored(tmp_path):
    """Circular MMBench asks each question in every rotation (the row's n) but scores it once
    (the score's n): the binomial SE is over the questions scored."""
    spec = TaskSpec("mmb", "mc", tmp_path / "mmbench.tsv", options={"circular": True})
    runs = [cmp.Run(spec, "none", None), cmp.Run(spec, "tome", 36)]
    for run, accuracy in zip(runs, (50.0, 40.0)):
        row = {"n": 400, "score": {"accuracy": accuracy, "n": 100, "circular_accuracy": accuracy / 2},
               "gflops_prefill": 2.0, "gflops": 3.0, "samples_per_s": 1.0, "visual_tokens": 144}
        path = run_path(tmp_path, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": {}, "result": row}))
    cell = cmp.summarize(tmp_path, runs, 144, None)["rows"][1]["tasks"]["mmb"]
    assert cell["n"] == 100 and cell["se"] == pytest.approx(100 * (0.4 * 0.6 / 100) ** 0.5)


def test_changed_mme_files_rerun(setup, tmp_path):
    """MME's questions are a folder of subtask folders: a changed question file there is a changed
    setting (the run is recomputed), an unchanged folder is skipped."""
    root = tmp_path / "MME"
    (root / "color").mkdir(parents=True)
    Image.open(setup / "images" / "img0.png").save(root / "color" / "a.png")
    qa = root / "color" / "a.txt"
    qa.write_text("Is it red? Please answer yes or no.\tyes\nIs it blue? Please answer yes or no.\tno\n")
    spec = parse_task(f"mme=mme:{root}:{root}")
    spy, mp = counted()
    try:
        compare(setup / "model", [spec], [], [36], tmp_path / "out", log=lambda _: None, **FAST)
        compare(setup / "model", [spec], [], [36], tmp_path / "out", log=lambda _: None, **FAST)
        assert spy.calls == ["out/none"]
        qa.write_text("Is it red? Please answer yes or no.\tno\nIs it blue? Please answer yes or no.\tno\n")
        with pytest.raises(ValueError, match="task_files"):
            compare(setup / "model", [spec], [], [36], tmp_path / "out", on_change="refuse", **FAST)
    finally:
        mp.undo()
