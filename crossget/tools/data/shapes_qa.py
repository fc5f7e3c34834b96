"""Question-answer pairs and caption files for the generated shapes scenes (:mod:`crossget.tools.data.shapes`).

The questions ask about what token merging averages away and what it keeps, all with one-word answers:

- ``colour``: "what colour is the object in the top left?" -> "red" (kept: the mean colour of a cell)
- ``shape``: "what shape is in the center?" -> "circle" (outline, partly kept)
- ``count``: "how many small red circles are there?" -> "three" (1-4: lost when a cluster's tokens merge)
- ``texture``: "is there a striped blue square?" -> "yes" / "no", half each (textures keep the mean colour,
  so merged tokens cannot tell plain from striped or dotted)
- ``relation``: "what shape is above the green triangles?" -> "square", or "what colour is ...?"
  (positions: kept only where merged tokens stay in place)

One question of each type that applies is drawn per image, from a generator seeded with ``(seed,
imgid)``: the same annotation file gives the same questions, whatever the other images. Relation
questions are only asked when exactly one entity stands in that relation (the strict sense the captions
use: "above" = same column, higher row).

:func:`write_qa` writes, per split, the official formats the evaluations read:

- ``questions.json`` / ``annotations.json``: VQAv2 (``crossget eval vqa``, and ``eval llava-vqa``'s
  annotations). The 10 human answers are the answer in the official evaluation's normal form, which has
  numbers as digits ("3"); the predicted answer "three" is normalised to "3" by the metric, so both forms
  score. Images: ``--images <data>/images --image-pattern 'shapes_{image_id:06d}.png'``.
- ``captions.json``: COCO captions (``crossget eval caption``), the Karpathy sentences as references.
- ``llava_questions.jsonl``: LLaVA's question file (``crossget eval llava-vqa``).
- ``llava_conversations.json``: LLaVA's training format, one single-turn conversation per question with
  LLaVA-1.5's short-answer instruction and the answer as a word.

    crossget data-qa --data data/shapes/dataset_shapes.json --out data/shapes-qa
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossget.tools.data.shapes import IMAGE_PATTERN, NUMBERS, PLURAL, RELATIONS, SPLITS, TEXTURES, Entity, noun, relation
from crossget.tools.eval.llava.data import SHORT_ANSWER  # LLaVA-1.5's VQA instruction

QUESTION_TYPES = ("colour", "shape", "count", "texture", "relation")
CELLS = {
    (0, 0): "in the top left", (0, 1): "in the top middle", (0, 2): "in the top right",
    (1, 0): "in the middle left", (1, 1): "in the center", (1, 2): "in the middle right",
    (2, 0): "in the bottom left", (2, 1): "in the bottom middle", (2, 2): "in the bottom right",
}
COUNT_WORDS = {1: "one", **NUMBERS}
ANSWER_TYPES = {"colour": "other", "shape": "other", "count": "number", "texture": "yes/no", "relation": "other"}


@dataclass(frozen=True)
class QA:
    """One question about image ``image_id``; ``answer`` is a single lower-case word."""

    question_id: int
    image_id: int
    question: str
    answer: str
    qtype: str


def candidates(scene: Sequence[Entity]) -> dict[str, list[tuple[str, str]]]:
    """Every ``(question, answer)`` of each type that ``scene`` supports (texture: both the yes and no forms,
    as ``[yes, no, no]`` per large entity). Entities have distinct cells and (colour, shape) pairs."""
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    for e in scene:
        where = CELLS[(e.row, e.col)]
        out["colour"].append((f"what colour is the object {where}?", e.colour))
        out["shape"].append((f"what shape is {where}?", e.shape))
        if e.size == "small":
            plural = PLURAL.get(e.shape, e.shape + "s")
            out["count"].append((f"how many small {e.colour} {plural} are there?", COUNT_WORDS[e.count]))
        else:
            for t in [e.texture, *(t for t in TEXTURES if t != e.texture)]:
                out["texture"].append((f"is there a {t} {e.colour} {e.shape}?", "yes" if t == e.texture else "no"))
    for b in scene:
        for a in scene:
            if a is b:
                continue
            rel = relation(a, b)
            if sum(relation(x, b) == rel for x in scene if x is not b) != 1:
                continue  # more than one entity in that relation: no single answer
            phrase = f"{RELATIONS[rel][0]} the {b.colour} {noun(b)}"
            verb = "are" if a.count > 1 else "is"
            out["relation"].append((f"what shape {verb} {phrase}?", a.shape))
            out["relation"].append((f"what colour {verb} {phrase}?", a.colour))
    return out


def image_questions(scene: Sequence[Entity], image_id: int, seed: int = 0) -> list[QA]:
    """One question of each type that applies, drawn with a generator seeded by ``(seed, image_id)``.
    Texture questions are yes or no with probability 1/2; question ids are ``100 * image_id + k``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, image_id]))
    out = []
    for qtype, options in candidates(scene).items():
        if not options:
            continue
        if qtype == "texture":
            entity = int(rng.integers(len(options) // 3))
            yes = rng.random() < 0.5
            q, a = options[3 * entity + (0 if yes else 1 + int(rng.integers(2)))]
        else:
            q, a = options[int(rng.integers(len(options)))]
        out.append(QA(100 * image_id + len(out), image_id, q, a, qtype))
    return out


def scene_of(record: dict) -> tuple[Entity, ...]:
    """The scene of a Karpathy image record of the generated data (its ``objects``)."""
    if "objects" not in record:
        raise ValueError(f"image {record.get('filename')!r} has no 'objects': not generated shapes data")
    return tuple(Entity(**o) for o in record["objects"])


def build_qa(images: Sequence[dict], seed: int = 0) -> list[QA]:
    """The questions of Karpathy image records (``imgid`` and ``objects``), in image order."""
    return [qa for im in images for qa in image_questions(scene_of(im), int(im["imgid"]), seed)]


def vqa_answer(answer: str) -> str:
    """An answer as VQAv2 stores human answers (the official normal form: numbers as digits)."""
    from crossget.tools.eval.vqa import normalize_answer

    return normalize_answer(answer)


def vqa_files(qas: Sequence[QA], split: str) -> tuple[dict, dict]:
    """``(questions, annotations)`` objects in the official VQAv2 layout, 10 identical human answers each."""
    questions = {"info": {"description": "generated shapes QA", "image_pattern": IMAGE_PATTERN},
                 "task_type": "Open-Ended", "data_type": "shapes", "data_subtype": split,
                 "questions": [{"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in qas]}

    def annotation(q: QA) -> dict:
        answer = vqa_answer(q.answer)
        return {"question_id": q.question_id, "image_id": q.image_id, "question_type": q.qtype,
                "answer_type": ANSWER_TYPES[q.qtype], "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}

    annotations = {"info": questions["info"], "data_type": "shapes", "data_subtype": split,
                   "annotations": [annotation(q) for q in qas]}
    return questions, annotations


def coco_captions(images: Sequence[dict]) -> dict:
    """COCO-caption annotation object of Karpathy image records (their sentences as references)."""
    return {
        "images": [{"id": int(im["imgid"]), "file_name": str(im["filename"])} for im in images],
        "annotations": [{"image_id": int(im["imgid"]), "id": int(s.get("sentid", n)), "caption": str(s["raw"])}
                        for n, im in enumerate(images) for s in im["sentences"]],
    }


def llava_questions(qas: Sequence[QA]) -> list[dict]:
    """LLaVA question-file records (``crossget eval llava-vqa`` adds the short-answer instruction)."""
    return [{"question_id": q.question_id, "image": IMAGE_PATTERN.format(image_id=q.image_id), "text": q.question,
             "category": q.qtype} for q in qas]


def llava_conversations(qas: Sequence[QA]) -> list[dict]:
    """LLaVA training records: ``<image>``, the question and LLaVA-1.5's instruction; the answer word."""
    return [{"id": str(q.question_id), "image": IMAGE_PATTERN.format(image_id=q.image_id), "conversations": [
        {"from": "human", "value": f"<image>\n{q.question}\n{SHORT_ANSWER}"},
        {"from": "gpt", "value": q.answer}]} for q in qas]


def write_qa(annotation: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
             splits: Sequence[str] = SPLITS) -> dict[str, dict[str, Any]]:
    """Write every format for each split present in the shapes Karpathy JSON to ``out_dir/<split>/``.

    Returns ``{split: {"questions": n, "images": n, "files": [...]}}``.

    Raises:
        ValueError: records without ``objects``, or image names that do not follow :data:`IMAGE_PATTERN`.
    """
    from crossget.tools.data.karpathy import read_annotation

    entries = read_annotation(Path(annotation))
    summary: dict[str, dict[str, Any]] = {}
    for split in splits:
        images = [e for e in entries if e["split"] == split]
        if not images:
            continue
        bad = [e["filename"] for e in images if e["filename"] != IMAGE_PATTERN.format(image_id=int(e["imgid"]))]
        if bad:
            raise ValueError(f"{annotation}: image {bad[0]!r} is not named {IMAGE_PATTERN!r} after its imgid")
        qas = build_qa(images, seed)
        out = Path(out_dir) / split
        out.mkdir(parents=True, exist_ok=True)
        questions, annotations = vqa_files(qas, split)
        files = {"questions.json": questions, "annotations.json": annotations, "captions.json": coco_captions(images),
                 "llava_conversations.json": llava_conversations(qas)}
        for name, payload in files.items():
            (out / name).write_text(json.dumps(payload))
        (out / "llava_questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava_questions(qas)))
        summary[split] = {"questions": len(qas), "images": len(images),
                          "files": [str(out / n) for n in [*files, "llava_questions.jsonl"]]}
    if not summary:
        raise ValueError(f"{annotation} has none of the splits {list(splits)}")
    return summary


__all__ = ["QA", "QUESTION_TYPES", "IMAGE_PATTERN", "build_qa", "candidates", "coco_captions",
           "image_questions", "llava_conversations", "llava_questions", "vqa_files", "write_qa"]
