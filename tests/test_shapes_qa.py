"""Question-answer files for the generated shapes scenes: answers on hand-made scenes, determinism, balance,
and the written files read back through the evaluations' own loaders (VQAv2, COCO captions, LLaVA)."""

import json

import numpy as np
import pytest

from crossget.tools.cli import main
from crossget.tools.data import shapes_qa
from crossget.tools.data.shapes import Entity, generate_dataset, sample_scene
from crossget.tools.eval import caption, vqa
from crossget.tools.eval.llava.data import load_vqa_annotations, load_vqa_questions

CIRCLES = Entity("circle", "red", "small", 3, "plain", 0, 0)  # three small red circles, top left
SQUARE = Entity("square", "blue", "large", 1, "striped", 1, 1)  # striped blue square, center
TRIANGLE = Entity("triangle", "green", "large", 1, "plain", 2, 1)  # plain green triangle, bottom middle


def test_answers_on_a_hand_made_scene():
    c = {t: dict(qa) for t, qa in shapes_qa.candidates((CIRCLES, SQUARE, TRIANGLE)).items()}
    assert c["colour"] == {"what colour is the object in the top left?": "red",
                           "what colour is the object in the center?": "blue",
                           "what colour is the object in the bottom middle?": "green"}
    assert c["shape"]["what shape is in the center?"] == "square"
    assert c["count"] == {"how many small red circles are there?": "three"}
    assert c["texture"] == {"is there a striped blue square?": "yes", "is there a plain blue square?": "no",
                            "is there a dotted blue square?": "no", "is there a plain green triangle?": "yes",
                            "is there a striped green triangle?": "no", "is there a dotted green triangle?": "no"}
    rel = c["relation"]
    assert rel["what shape is below the blue square?"] == "triangle"
    assert rel["what colour are above and to the left of the blue square?"] == "red"
    assert rel["what shape is above the green triangle?"] == "square"
    # the square and the triangle are both below and to the right of the circles: not asked
    assert not any("below and to the right of the red circles" in q for q in rel)
    assert all(len(a.split()) == 1 for qa in c.values() for a in qa.values())


def test_relations_with_two_answers_are_not_asked():
    top, middle = Entity("circle", "red", "large", 1, "plain", 0, 1), Entity("cross", "cyan", "large", 1, "plain", 1, 1)
    bottom = Entity("square", "blue", "small", 2, "plain", 2, 1)
    rel = dict(shapes_qa.candidates((top, middle, bottom))["relation"])
    assert not any("above the blue squares" in q for q in rel)  # red circle and cyan cross are both above
    assert rel["what shape are below the cyan cross?"] == "square"  # two squares: "are"
    assert rel["what shape is above the cyan cross?"] == "circle"


def test_questions_are_deterministic_and_balanced():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(600)]
    qas = [q for i, s in enumerate(scenes) for q in shapes_qa.image_questions(s, i, seed=3)]
    again = [q for i, s in enumerate(scenes) for q in shapes_qa.image_questions(s, i, seed=3)]
    assert qas == again
    assert shapes_qa.image_questions(scenes[5], 5, seed=3) == [q for q in qas if q.image_id == 5]  # per image
    assert len({q.question_id for q in qas}) == len(qas)
    yes = [q.answer == "yes" for q in qas if q.qtype == "texture"]
    assert 0.42 < np.mean(yes) < 0.58
    counts = {q.answer for q in qas if q.qtype == "count"}
    assert counts == {"one", "two", "three", "four"}
    # every answer is correct against the scene it is about
    for q in qas:
        scene = scenes[q.image_id]
        if q.qtype == "count":
            e = next(e for e in scene if f" {e.colour} " in q.question and e.size == "small" and e.shape[:4] in q.question)
            assert q.answer == shapes_qa.COUNT_WORDS[e.count]
        if q.qtype == "colour":
            e = next(e for e in scene if q.question.endswith(shapes_qa.CELLS[(e.row, e.col)] + "?"))
            assert q.answer == e.colour


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    annotation = generate_dataset(root / "shapes", 6, 0, 3, image_size=48, seed=0)
    out = root / "qa"
    assert main(["data-qa", "--data", str(annotation), "--out", str(out)]) == 0
    return annotation, out


def test_files_round_trip_through_the_loaders(qa_dir):
    annotation, out = qa_dir
    images = annotation.parent / "images"
    karpathy = json.loads(annotation.read_text())["images"]
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    test = [im for im in karpathy if im["split"] == "test"]
    expected = shapes_qa.build_qa(test)
    # VQAv2, as crossget eval vqa reads it; the answer word scores 1 under the official metric
    data = vqa.load_vqa(out / "test" / "questions.json", out / "test" / "annotations.json", image_root=images,
                        image_pattern=shapes_qa.IMAGE_PATTERN)
    assert data.question_ids == [q.question_id for q in expected] and data.questions == [q.question for q in expected]
    assert all(vqa.vqa_accuracy(q.answer, data.answers[q.question_id]) == 1.0 for q in expected)
    assert {data.answer_types[q.question_id] for q in expected if q.qtype == "count"} == {"number"}
    assert data.image_paths[0] == images / test[0]["filename"]
    # COCO captions, as crossget eval caption reads them
    caps = caption.load_coco_captions(out / "test" / "captions.json", image_root=images)
    assert caps.image_ids == [im["imgid"] for im in test]
    assert caps.references[test[0]["imgid"]] == [s["raw"] for s in test[0]["sentences"]]
    # LLaVA question file + the VQAv2 annotations, as crossget eval llava-vqa reads them
    qs = load_vqa_questions(out / "test" / "llava_questions.jsonl")
    ann = load_vqa_annotations(out / "test" / "annotations.json")
    assert [s.question_id for s in qs.samples] == [q.question_id for q in expected]
    assert qs.samples[0].question.endswith("\n" + shapes_qa.SHORT_ANSWER) and (images / qs.samples[0].image).is_file()
    assert all(vqa.vqa_accuracy(q.answer, ann.answers_for(s)) == 1.0 for q, s in zip(expected, qs.samples))
    # LLaVA training conversations
    conv = json.loads((out / "train" / "llava_conversations.json").read_text())
    first = shapes_qa.build_qa([im for im in karpathy if im["split"] == "train"])[0]
    assert conv[0] == {"id": str(first.question_id), "image": karpathy[0]["filename"], "conversations": [
        {"from": "human", "value": f"<image>\n{first.question}\n{shapes_qa.SHORT_ANSWER}"},
        {"from": "gpt", "value": first.answer}]}


def test_files_are_deterministic(qa_dir, tmp_path):
    annotation, out = qa_dir
    shapes_qa.write_qa(annotation, tmp_path)
    for name in ("questions.json", "annotations.json", "captions.json", "llava_questions.jsonl",
                 "llava_conversations.json"):
        assert (tmp_path / "train" / name).read_bytes() == (out / "train" / name).read_bytes()


def test_needs_generated_data(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": [{"filename": "shapes_000000.png", "imgid": 0, "split": "test",
                                            "sentences": [{"raw": "a dog"}]}]}))
    with pytest.raises(ValueError, match="no 'objects'"):
        shapes_qa.write_qa(path, tmp_path / "out")
