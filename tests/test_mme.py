"""MME in the LLaVA harness: the official folder layouts, LLaVA's MME prompt, the answer parsing
and the scores of MME's official calculation.py (against a naive reference of it and numbers
worked out by hand), and ``crossget eval llava-mme`` end to end on a tiny LLaVA-NeXT."""

import json
from pathlib import Path

import numpy as np
import pytest
import test_llava_next as next_tests
from PIL import Image
from test_eval_mllm import full_vocab

from crossget.tools.cli import main
from crossget.tools.eval.llava import (
    MME_COGNITION,
    MME_PERCEPTION,
    SHORT_ANSWER,
    load_mme,
    mme_scores,
    mme_yes_no,
    score_mme,
)

# subtask: (layout, {image stem: ((question, answer), (question, answer))})
MME = {
    "existence": ("flat", {"000": (("Is there a cat in this image? Please answer yes or no.", "Yes"),
                                   ("Is there a dog in this image? Please answer yes or no.", "No")),
                           "001": (("Is there a car in this image? Please answer yes or no.", "yes"),
                                   ("Is there a bus in this image?  Please answer yes or no.", "no"))}),
    "count": ("flat", {"010": (("Are there two apples? Please answer yes or no.", "yes"),
                               ("Are there three apples? Please answer yes or no.", "no"))}),
    "artwork": ("yn", {"7": (("Is this artwork by Monet? Please answer yes or no.", "yes"),
                             ("Is this artwork by Dali? Please answer yes or no.", "no"))}),
    "code_reasoning": ("flat", {"0020": (("Does the code print 3? Please answer yes or no.", "yes"),
                                         ("Does the code print 4? Please answer yes or no.", "no"))}),
}


def write_mme(root: Path) -> Path:
    """A tiny MME release folder: both official layouts, images of different sizes."""
    for k, (task, (layout, images)) in enumerate(MME.items()):
        folder = root / task
        texts = folder / "questions_answers_YN" if layout == "yn" else folder
        pictures = folder / "images" if layout == "yn" else folder
        texts.mkdir(parents=True)
        pictures.mkdir(parents=True, exist_ok=True)
        for i, (stem, qa) in enumerate(images.items()):
            size = (24 + 8 * i + 4 * k, 40 - 4 * k)
            pixels = (np.random.default_rng(10 * k + i).random((size[1], size[0], 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(pictures / f"{stem}{'.jpg' if layout == 'yn' else '.png'}")
            (texts / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))
    return root


def calculation_py(lines):
    """A naive reference of MME's eval_tool/calculation.py on its result lines
    (``image\\tquestion\\tgt\\tanswer`` per subtask, two consecutive lines per image)."""
    def parse(pred):
        if pred in ["yes", "no"]:
            return pred
        return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"

    out = {}
    for task, rows in lines.items():
        right, plus = 0, 0
        for i in range(0, len(rows), 2):
            ok = [parse(r.split("\t")[3].lower()) == r.split("\t")[2].lower() for r in rows[i : i + 2]]
            right += sum(ok)
            plus += all(ok)
        out[task] = 100 * right / len(rows) + 100 * plus / (len(rows) // 2)
    return out


def test_official_answer_parsing():
    cases = {"Yes": "yes", "no": "no", "yes.": "yes", "No, it is not.": "no", "The answer is yes": "other",
             "y": "other", "Not sure": "no", "nothing": "no", "": "other", "NO": "no", "Yes, a cat": "yes"}
    assert {text: mme_yes_no(text) for text in cases} == cases


def test_scores_by_hand():
    answers = [  # (subtask, image, truth, answer)
        ("existence", "000.png", "yes", "Yes"), ("existence", "000.png", "no", "No."),      # both right
        ("existence", "001.png", "yes", "yes"), ("existence", "001.png", "no", "There is"),  # other: wrong
        ("count", "010.png", "yes", "no"), ("count", "010.png", "no", "nope"),                # one right
        ("code_reasoning", "0020.png", "yes", "yes"), ("code_reasoning", "0020.png", "no", "no"),
    ]
    got = mme_scores(answers, MME_PERCEPTION, MME_COGNITION)
    existence, count = got["subtasks"]["existence"], got["subtasks"]["count"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert existence["other"] == 1 and existence["images"] == 2 and existence["questions"] == 4
    assert (count["acc"], count["acc_plus"], count["score"]) == (50.0, 0.0, 50.0)
    assert got["perception"] == 175.0 and got["cognition"] == 200.0
    assert got["perception_missing"] == [t for t in MME_PERCEPTION if t not in ("existence", "count")]
    assert got["cognition_missing"] == ["commonsense_reasoning", "numerical_calculation", "text_translation"]
    lines = {}
    for task, image, truth, text in answers:
        lines.setdefault(task, []).append(f"{image}\tq\t{truth}\t{text}")
    assert {t: s["score"] for t, s in got["subtasks"].items()} == calculation_py(lines)
    with pytest.raises(ValueError, match="yes or no"):
        mme_scores([("count", "1.png", "maybe", "yes")], MME_PERCEPTION, MME_COGNITION)


def test_both_folder_layouts_and_llava_prompt(tmp_path):
    qs = load_mme(write_mme(tmp_path / "MME"))
    assert qs.kind == "mme" and len(qs.samples) == 10
    first = qs.samples[0]  # subtasks in MME's order: existence, count, artwork, code_reasoning
    assert [s.category for s in qs.samples[::2]] == ["existence", "existence", "count", "artwork", "code_reasoning"]
    assert first.question == f"Is there a cat in this image?\n{SHORT_ANSWER}" and first.answer == "yes"
    assert first.prompt == "Is there a cat in this image? Please answer yes or no."  # MME's own question
    assert first.question_id == "existence/000.png" and first.image == "existence/000.png"
    assert qs.samples[3].question == f"Is there a bus in this image?\n{SHORT_ANSWER}"  # two spaces before "Please"
    art = qs.samples[6]
    assert art.image == "artwork/images/7.jpg" and art.question_id == "artwork/7.jpg"
    assert load_mme(tmp_path / "MME", suffix=None).samples[0].question == "Is there a cat in this image?"
    (tmp_path / "MME" / "count" / "010.txt").write_text("Are there two? Please answer yes or no.\tyes\n")
    with pytest.raises(ValueError, match="010.txt: 1 questions; MME has two per image"):
        load_mme(tmp_path / "MME")
    (tmp_path / "MME" / "count" / "010.txt").write_text("a\tyes\nb\tmaybe\n")
    with pytest.raises(ValueError, match=r"010.txt:2: expected 'question<TAB>yes\|no'"):
        load_mme(tmp_path / "MME")
    (tmp_path / "MME" / "count" / "010.png").unlink()
    with pytest.raises(FileNotFoundError, match="no image 010"):
        load_mme(tmp_path / "MME")
    with pytest.raises(ValueError, match="no MME subtask folders"):
        load_mme(tmp_path)


def test_llava_mme_end_to_end(tmp_path):
    root = write_mme(tmp_path / "MME")
    model = next_tests.make_next()
    model.generation_config.suppress_tokens = next_tests.GEN["suppress_tokens"]
    model.save_pretrained(tmp_path / "model")
    # every word starts with yes or no: the random model's answers parse to both, by the first token's parity
    word = lambda i: ("yes" if i % 2 else "no") + str(i)  # noqa: E731
    full_vocab(next_tests.tiny_processor(), 100, word).save_pretrained(tmp_path / "model")
    out, results = tmp_path / "mme.json", tmp_path / "mme_results"
    assert main(["eval", "llava-mme", "--model", str(tmp_path / "model"), "--questions", str(root), "--batch", "4",
                 "--max-new-tokens", "2", "--threads", "1", "--mme-results", str(results), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    answers = [json.loads(x) for x in Path(result["answers"]).read_text().splitlines()]
    assert len(answers) == 10 and answers[0]["question_id"] == "existence/000.png"
    assert {mme_yes_no(a["text"]) for a in answers} <= {"yes", "no"}
    # MME's result files, scored by the naive calculation.py, give the harness's scores
    lines = {t: (results / f"{t}.txt").read_text().splitlines() for t in MME}
    assert lines["existence"][0].split("\t")[:3] == ["000.png", MME["existence"][1]["000"][0][0], "yes"]
    want = calculation_py(lines)
    score = result["score"]
    assert {t: s["score"] for t, s in score["subtasks"].items()} == pytest.approx(want)
    assert score["perception"] == pytest.approx(want["existence"] + want["count"] + want["artwork"])
    assert score["cognition"] == pytest.approx(want["code_reasoning"])
    proto = result["protocol"]
    assert proto["task"] == "mme" and proto["scoring"].startswith("MME") and proto["prompt"]["suffix"] == SHORT_ANSWER
    assert proto["budget"]["method"] == "none" and result["dataset"] == "mme"
    # --limit keeps whole images (3 questions: the first two images)
    short = tmp_path / "short.json"
    assert main(["eval", "llava-mme", "--model", str(tmp_path / "model"), "--questions", str(root), "--limit", "3",
                 "--max-new-tokens", "1", "--threads", "1", "--json", str(short)]) == 0
    kept = json.loads(short.read_text())["results"]
    assert kept["n"] == 4 and kept["score"]["subtasks"]["existence"]["questions"] == 4
    # the scorer on the samples and texts agrees with the run
    samples = load_mme(root).samples
    assert score_mme(samples, [a["text"] for a in answers]) == score
