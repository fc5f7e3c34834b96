"""LLaVA-1.5's local evaluation files: questions, ground truth, images.

- Short-answer VQA (VQAv2, GQA, TextVQA): LLaVA's question JSONL, one
  ``{"question_id", "image", "text", "category"?}`` per line; ground truth from the data set's
  own annotation file (:func:`load_vqa_annotations`).
- ScienceQA-IMG: ``llava_test_CQM-A.json``-style records (``{"id", "image", "conversations"}``)
  or plain ``{"id", "image", "question", "choices", "answer", "hint"?}`` records (JSON or JSONL);
  ground truth from the record or from ScienceQA's ``problems.json``.
- MMBench: the TSV (``index, question, hint, A..D, answer, category, image`` as base64).
- POPE: LLaVA's question JSONL plus the ``coco_pope_<category>.json`` label files.
- MME: the official release folder (one folder per subtask; ``question\tanswer`` text files).

Every loader returns :class:`Sample` records; errors name the offending file (and line).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossget.tools.common import read_json
from crossget.tools.eval.llava.metrics import LETTERS, parse_choice

__all__ = [
    "MC_PROMPT",
    "SHORT_ANSWER",
    "QuestionSet",
    "Sample",
    "VQAAnnotations",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "MME_YES_NO",
    "load_image",
    "load_mmbench",
    "load_mme",
    "load_pope",
    "load_science_qa",
    "load_vqa_annotations",
    "load_vqa_questions",
]

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question as the model gets it.

    ``question`` is the user turn's text as sent (the chat template adds the image token);
    ``prompt`` is what LLaVA's answer files record as ``"prompt"``.
    """

    question_id: Any
    question: str
    prompt: str
    image: str | None = None  # file name under the images folder
    image_b64: str | None = None  # MMBench: the image itself
    answer: str | None = None  # ground truth: option letter (MC), "yes"/"no" (POPE)
    options: list[str] | None = None
    category: str | None = None
    round_id: int | None = None  # MMBench circular evaluation: rotation of the options
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuestionSet:
    """Samples read from ``path``; ``skipped`` counts records left out (e.g. text-only ScienceQA)."""

    samples: list[Sample]
    path: Path
    kind: str
    skipped: int = 0


# --------------------------------------------------------------------------- files
def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line."""
    path = _require_file(path, what)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a valid {what} line (invalid JSON: {err})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: a {what} line must be a JSON object, got {type(obj).__name__}")
            yield n, obj


def _read_records(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """``(where, object)`` records of a JSON list or a JSONL file."""
    path = _require_file(path, what)
    if path.suffix != ".jsonl":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = None  # maybe JSON lines under another suffix
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a valid {what} ({err})") from None
        if data is not None:
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise ValueError(f"{path}: a {what} must be a JSON list of objects (or JSON lines)")
            return [(f"{path} item {i}", d) for i, d in enumerate(data)]
    return [(f"{path}:{n}", d) for n, d in _read_jsonl(path, what)]


def _need(obj: Mapping, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _with_suffix(text: str, suffix: str | None) -> str:
    """``text`` ending in ``suffix`` on its own line (LLaVA's files often have it already)."""
    text = text.strip()
    if not suffix or text.endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def _without_suffix(text: str, suffix: str | None) -> str:
    text = text.strip()
    return text[: -len(suffix)].strip() if suffix and text.endswith(suffix) else text


# --------------------------------------------------------------------------- images
def load_image(sample: Sample, images: str | Path | None):
    """The sample's image as a PIL RGB image.

    Raises:
        FileNotFoundError: the image file is missing (names the path and the question).
        ValueError: not an image, or bad base64.
    """
    from PIL import Image, UnidentifiedImageError

    if sample.image_b64 is not None:
        try:
            raw = base64.b64decode(sample.image_b64, validate=False)
            with Image.open(io.BytesIO(raw)) as im:
                return im.convert("RGB")
        except (binascii.Error, UnidentifiedImageError, OSError) as err:
            src = sample.meta.get("source", "the question file")
            raise ValueError(f"{src}: question {sample.question_id}: image is not a base64 image ({err})") from None
    if sample.image is None:
        raise ValueError(f"question {sample.question_id} has no image")
    if images is None:
        raise ValueError(f"question {sample.question_id} names image {sample.image!r}: give the images folder")
    path = Path(images) / sample.image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path} (question {sample.question_id})") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"not a readable image: {path} (question {sample.question_id}: {err})") from None


# --------------------------------------------------------------------------- short-answer VQA
def load_vqa_questions(path: str | Path, suffix: str | None = SHORT_ANSWER) -> QuestionSet:
    """LLaVA's question JSONL (``question_id``, ``image``, ``text``, optional ``category``).

    ``suffix`` (LLaVA-1.5's short-answer instruction) is appended on a new line unless the text
    already ends with it, as LLaVA's own VQAv2/GQA/TextVQA files do; ``None`` sends the text as is.
    """
    samples = []
    for n, obj in _read_jsonl(path, "question file"):
        _need(obj, ("question_id", "image", "text"), f"{path}:{n}")
        samples.append(Sample(
            question_id=obj["question_id"], question=_with_suffix(obj["text"], suffix), prompt=obj["text"],
            image=obj["image"], category=obj.get("category"), meta={"line": n, "label": obj.get("label")},
        ))
    if not samples:
        raise ValueError(f"{path}: no questions")
    return QuestionSet(samples, Path(path), "vqa")


@dataclass
class VQAAnnotations:
    """Ground-truth answers by question id (and, for TextVQA, by image id + question).

    ``metric`` is ``"vqa"`` (VQAv2's official accuracy over the human answers), ``"textvqa"``
    (the same with TextVQA's normalisation of both sides) or ``"exact"`` (GQA).
    """

    path: Path
    format: str  # vqav2 | textvqa | gqa | list
    metric: str
    by_id: dict[str, list[str]]
    by_image_question: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def answers_for(self, sample: Sample) -> list[str] | None:
        found = self.by_id.get(str(sample.question_id))
        if found is None and self.by_image_question:
            # LLaVA's TextVQA questions carry the image id as question_id; match on the question too
            found = self.by_image_question.get((str(sample.question_id), textvqa_question(sample.question)))
        return found


def textvqa_question(text: str) -> str:
    """The bare question of a TextVQA prompt (no OCR-token line, no instruction), lower case."""
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith("Reference OCR token") and ln not in (SHORT_ANSWER, MC_PROMPT)]
    return (keep[0] if keep else "").lower()


def _answer_texts(answers: Any, where: str) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    if isinstance(answers, list) and answers:
        out = [a["answer"] if isinstance(a, dict) else a for a in answers]
        if all(isinstance(a, str) for a in out):
            return out
    raise ValueError(f"{where}: answers must be a string, a list of strings or of {{'answer': ...}} objects")


def load_vqa_annotations(path: str | Path) -> VQAAnnotations:
    """Ground truth in any of the formats LLaVA's VQA evaluations use.

    - VQAv2 (``{"annotations": [{"question_id", "answers": [{"answer"}...]}]}``): VQA accuracy.
    - TextVQA (``{"data": [{"question_id", "image_id", "question", "answers"}]}``): TextVQA accuracy.
    - GQA (``{question_id: {"answer", ...}}``, e.g. ``testdev_balanced_questions.json``): exact match.
    - A JSON list / JSONL of ``{"question_id", "answers": [...]}`` (VQA accuracy) or
      ``{"question_id", "answer": str}`` (exact match).
    """
    path = _require_file(path, "annotation file")
    data = read_json(path, "annotation file") if path.suffix != ".jsonl" else None
    by_id: dict[str, list[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for i, ann in enumerate(data["annotations"]):
            where = f"{path} annotations[{i}]"
            _need(ann, ("question_id", "answers"), where)
            by_id[str(ann["question_id"])] = _answer_texts(ann["answers"], where)
        return VQAAnnotations(path, "vqav2", "vqa", by_id)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        by_iq = {}
        for i, ann in enumerate(data["data"]):
            where = f"{path} data[{i}]"
            _need(ann, ("question_id", "answers"), where)
            answers = _answer_texts(ann["answers"], where)
            by_id[str(ann["question_id"])] = answers
            if "image_id" in ann and "question" in ann:
                by_iq[(str(ann["image_id"]), str(ann["question"]).strip().lower())] = answers
        return VQAAnnotations(path, "textvqa", "textvqa", by_id, by_iq)
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        for qid, ann in data.items():
            _need(ann, ("answer",), f"{path} [{qid!r}]")
            by_id[str(qid)] = [str(ann["answer"])]
        return VQAAnnotations(path, "gqa", "exact", by_id)
    records = _read_records(path, "annotation file") if data is None or isinstance(data, list) else None
    if records is None:
        raise ValueError(
            f"{path}: not a known annotation format (VQAv2 'annotations', TextVQA 'data', GQA question dict, "
            "or a list of {question_id, answers|answer})"
        )
    metric = "exact"
    for where, ann in records:
        _need(ann, ("question_id",), where)
        if "answers" in ann:
            by_id[str(ann["question_id"])] = _answer_texts(ann["answers"], where)
            metric = "vqa"
        elif "answer" in ann:
            by_id[str(ann["question_id"])] = _answer_texts(ann["answer"], where)
        else:
            raise ValueError(f"{where}: missing 'answers' or 'answer'")
    return VQAAnnotations(path, "list", metric, by_id)


# --------------------------------------------------------------------------- multiple choice
_LETTER_LINE = re.compile(r"^([A-J])\. (.*)$")
_PAREN_OPTION = re.compile(r"\(([A-J])\) ")


def _options_in_text(text: str) -> list[str]:
    """Options written into a question: ``A. ...`` lines (LLaVA-1.5) or ``Options: (A) x (B) y``."""
    lines = [m.group(2).strip() for ln in text.split("\n") if (m := _LETTER_LINE.match(ln.strip()))]
    if lines:
        return lines
    for ln in text.split("\n"):
        if ln.startswith("Options:"):
            return [p.strip() for p in _PAREN_OPTION.split(ln[len("Options:"):])[2::2]]
    return []


def _format_choices(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """LLaVA-1.5's multiple-choice layout: hint, question, then one ``A. option`` line each."""
    head = f"{hint}\n{question}" if hint else question
    return head + "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def _letter(answer: Any, n_choices: int, options: Sequence[str] | None, where: str) -> str:
    """Ground truth as a letter, from an index, a letter or a sentence naming one."""
    if isinstance(answer, bool):
        raise ValueError(f"{where}: answer must be an option index or letter, got {answer!r}")
    i = answer if isinstance(answer, int) else parse_choice(str(answer), n_choices, options)
    if not 0 <= i < n_choices:
        raise ValueError(f"{where}: answer {answer!r} is not one of the {n_choices} options")
    return LETTERS[i]


def load_science_qa(
    path: str | Path, problems: str | Path | None = None, images_only: bool = True, prompt: str | None = MC_PROMPT
) -> QuestionSet:
    """ScienceQA in LLaVA's format (``llava_test_CQM-A.json``, JSON or JSONL).

    A record is either LLaVA's ``{"id", "image"?, "conversations": [human, gpt]}`` (the human turn
    is the question with its options, ``<image>`` removed; the gpt turn, if any, names the answer)
    or ``{"id"|"question_id", "image"?, "question", "choices"|"options", "answer", "hint"?}``
    (options laid out as ``A. ...`` lines). ``problems`` (ScienceQA's ``problems.json``) supplies
    choices and answers by id. ``images_only`` keeps ScienceQA-IMG (records with an image).
    """
    table = read_json(problems, "ScienceQA problems file") if problems is not None else None
    if table is not None and not isinstance(table, dict):
        raise ValueError(f"{problems}: a ScienceQA problems file maps ids to problems (a JSON object)")
    samples, skipped = [], 0
    for where, rec in _read_records(path, "ScienceQA question file"):
        qid = rec.get("id", rec.get("question_id"))
        if qid is None:
            raise ValueError(f"{where}: missing 'id'")
        if not rec.get("image"):
            skipped += 1
            if images_only:
                continue
        prob = table.get(str(qid)) if table is not None else None
        if table is not None and prob is None:
            raise ValueError(f"{problems}: no problem {qid!r} (asked by {where})")
        if "conversations" in rec:
            turns = rec["conversations"]
            if not isinstance(turns, list) or not turns or "value" not in turns[0]:
                raise ValueError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns")
            text = turns[0]["value"].replace("<image>", "").strip()
            options = list(prob["choices"]) if prob else _options_in_text(text)
            answer = prob["answer"] if prob else (turns[1]["value"] if len(turns) > 1 else None)
        else:
            _need(rec, ("question",), where)
            options = list(rec.get("choices") or rec.get("options") or (prob or {}).get("choices") or [])
            if not options:
                raise ValueError(f"{where}: missing 'choices'")
            text = _format_choices(rec["question"], options, rec.get("hint") or rec.get("context"))
            answer = (prob or {}).get("answer", rec.get("answer"))
        if not 1 <= len(options) <= len(LETTERS):
            raise ValueError(f"{where}: found {len(options)} options; need 1..{len(LETTERS)} ('A. ...' lines)")
        letter = _letter(answer, len(options), options, where) if answer is not None else None
        question = _with_suffix(text, prompt)
        samples.append(Sample(
            question_id=qid, question=question, prompt=("<image>\n" if rec.get("image") else "") + question,
            image=rec.get("image") or None, answer=letter, options=options, meta={"source": where},
        ))
    if not samples:
        raise ValueError(f"{path}: no questions" + (" with images" if images_only and skipped else ""))
    return QuestionSet(samples, Path(path), "scienceqa", skipped)


def _missing(value: Any) -> bool:
    # LLaVA's is_none: pandas reads empty cells as NaN; the TSVs also spell "nan" / "none"
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def load_mmbench(path: str | Path, circular: bool = False, prompt: str | None = MC_PROMPT) -> QuestionSet:
    """MMBench's TSV (``index, question, hint, A, B, C, D, answer, category, image``).

    Options are the letter columns up to the first empty one, laid out as LLaVA's
    ``model_vqa_mmbench.py`` does. ``circular`` adds one round per option with the option texts
    rotated under fixed letters (MMBench's CircularEval; ``round_id`` says which). An image cell
    that holds another row's index refers to that row's image (MMBench v1.1).
    """
    path = _require_file(path, "MMBench TSV")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far longer than csv's 128 KiB cap
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    _need(rows[0], ("index", "question", "image", "A", "B"), f"{path} (header)")
    images = {r["index"]: r["image"] for r in rows}
    samples = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{path}:{n}"
        options = []
        for letter in LETTERS:
            if letter not in row or _missing(row[letter]):
                break
            options.append(row[letter])
        if len(options) < 2:
            raise ValueError(f"{where}: fewer than two options")
        image = row["image"]
        if len(image) <= 64 and image in images:  # a reference to another row's image
            image = images[image]
        if _missing(image):
            raise ValueError(f"{where}: no image")
        truth = None if _missing(row.get("answer")) else _letter(row["answer"].strip(), len(options), None, where)
        hint = None if _missing(row.get("hint")) else row["hint"]
        for k in range(len(options) if circular else 1):
            rotated = options[k:] + options[:k]
            shown = _format_choices(row["question"], rotated, hint)
            samples.append(Sample(
                question_id=_int_or_str(row["index"]), question=_with_suffix(shown, prompt), prompt=shown,
                image_b64=image, options=rotated, category=row.get("category") or None, round_id=k,
                answer=None if truth is None else LETTERS[(LETTERS.index(truth) - k) % len(options)],
                meta={"source": where},
            ))
    return QuestionSet(samples, path, "mmbench")


def _int_or_str(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


# --------------------------------------------------------------------------- POPE
def _loose(text: str) -> str:
    return " ".join(str(text).lower().split())


def _pope_label_files(labels: Path) -> dict[str | None, Path]:
    """``{category: file}`` from a folder of ``coco_pope_<category>.json`` or one file."""
    if labels.is_dir():
        files = sorted(p for p in labels.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"no POPE label files (*.json) in {labels}")
        return {p.stem.removeprefix("coco_pope_"): p for p in files}
    _require_file(labels, "POPE label file")
    return {labels.stem.removeprefix("coco_pope_"): labels}


def load_pope(path: str | Path, labels: str | Path | None = None, suffix: str | None = SHORT_ANSWER) -> QuestionSet:
    """POPE questions (LLaVA's ``llava_pope_test.jsonl``) with their yes/no labels.

    ``labels``: a folder of ``coco_pope_<category>.json`` label files (JSON lines with ``label``)
    or one such file. As in LLaVA's ``eval_pope.py``, the questions of a category are matched to
    its label file in order; the label's ``text``/``image``, when present, must agree with the
    question. Without ``labels``, every question line must carry its own ``label``.
    """
    qs = load_vqa_questions(path, suffix)
    samples = qs.samples
    if labels is None:
        for s in samples:
            if s.meta["label"] is None:
                raise ValueError(f"{path}:{s.meta['line']}: no 'label' (give the POPE label files)")
            s.answer = str(s.meta["label"]).strip().lower()
        return QuestionSet(samples, qs.path, "pope")
    files = _pope_label_files(Path(labels))
    with_category = any(s.category is not None for s in samples)
    for category, file in files.items():
        group = [s for s in samples if s.category == category] if with_category else samples
        lines = list(_read_jsonl(file, "POPE label file"))
        if len(lines) != len(group):
            raise ValueError(
                f"{file}: {len(lines)} labels for {len(group)} questions"
                + (f" of category {category!r}" if with_category else "") + f" in {path}"
            )
        for s, (n, lab) in zip(group, lines):
            _need(lab, ("label",), f"{file}:{n}")
            same_text = "text" not in lab or _loose(_without_suffix(s.prompt, suffix)) == _loose(lab["text"])
            same_image = "image" not in lab or Path(str(s.image)).name == Path(str(lab["image"])).name
            if not (same_text and same_image):
                raise ValueError(
                    f"{file}:{n}: label is for {lab.get('image')!r} / {lab.get('text')!r}, but question "
                    f"{s.question_id} ({path}:{s.meta['line']}) asks {s.image!r} / {s.prompt!r}"
                )
            s.answer = str(lab["label"]).strip().lower()
    unlabelled = [s for s in samples if s.answer is None]
    if unlabelled:
        cats = sorted({str(s.category) for s in unlabelled})
        raise ValueError(f"{len(unlabelled)} questions of {path} (categories {cats}) have no label file in {labels}")
    return QuestionSet(samples, qs.path, "pope")


# --------------------------------------------------------------------------- MME
# MME's subtasks as its official eval_tool/calculation.py groups them
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_YES_NO = " Please answer yes or no."  # MME's own instruction, which LLaVA's MME prompt replaces
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _mme_pairs(folder: Path) -> list[tuple[Path, str]]:
    """``(question file, image path relative to the subtask folder)`` of one MME subtask, in
    either layout: ``images/`` + ``questions_answers_YN/*.txt``, or images next to same-named txts."""
    if (folder / "questions_answers_YN").is_dir():
        texts, images, prefix = folder / "questions_answers_YN", folder / "images", "images/"
    else:
        texts, images, prefix = folder, folder, ""
    pairs = []
    for txt in sorted(texts.glob("*.txt")):
        found = [images / (txt.stem + ext) for ext in _IMAGE_SUFFIXES if (images / (txt.stem + ext)).is_file()]
        if not found:
            raise FileNotFoundError(f"{txt}: no image {txt.stem}.jpg/.png in {images}")
        pairs.append((txt, prefix + found[0].name))
    return pairs


def load_mme(root: str | Path, suffix: str | None = SHORT_ANSWER) -> QuestionSet:
    """The MME benchmark from its release folder (``MME_Benchmark_release_version``).

    Every subfolder named as one of the 14 subtasks (:data:`MME_PERCEPTION`, :data:`MME_COGNITION`)
    is read: each line of an image's text file is ``question<TAB>yes|no`` (two per image). The
    question is sent as LLaVA's MME evaluation sends it: MME's own " Please answer yes or no."
    dropped, ``suffix`` (LLaVA-1.5's short-answer instruction) on a new line; ``prompt`` keeps
    MME's question as is (what MME's result files hold). ``question_id`` is
    ``"<subtask>/<image file>"`` as in LLaVA's ``llava_mme.jsonl``; image paths are relative to ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or an image file is missing.
        ValueError: no subtask folder, a line that is not ``question<TAB>yes|no``, or an image
            without exactly two questions (as the official script asserts).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder not found: {root}")
    subtasks = [name for name in MME_PERCEPTION + MME_COGNITION if (root / name).is_dir()]
    if not subtasks:
        raise ValueError(f"{root}: no MME subtask folders (expected some of {', '.join(MME_PERCEPTION + MME_COGNITION)})")
    samples = []
    for name in subtasks:
        for txt, image in _mme_pairs(root / name):
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if len(lines) != 2:
                raise ValueError(f"{txt}: {len(lines)} questions; MME has two per image")
            for n, line in enumerate(lines, 1):
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{txt}:{n}: expected 'question<TAB>yes|no', got {line!r}")
                question = parts[0].strip()
                sent = question.replace(MME_YES_NO, "").strip()
                samples.append(Sample(
                    question_id=f"{name}/{Path(image).name}", question=_with_suffix(sent, suffix), prompt=question,
                    image=f"{name}/{image}", answer=parts[1].strip().lower(), category=name,
                    meta={"source": f"{txt}:{n}", "image_name": Path(image).name},
                ))
    return QuestionSet(samples, root, "mme")
