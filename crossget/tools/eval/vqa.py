"""VQAv2 with BLIP: generate answers, score them with the official VQA accuracy.

    model, processor = load_blip("models/blip-vqa-base", BlipForQuestionAnswering)
    data = load_vqa("vqa/v2_OpenEnded_mscoco_val2014_questions.json",
                    "vqa/v2_mscoco_val2014_annotations.json", image_root="coco/val2014")
    result = evaluate_vqa(model, processor, data)      # accuracy, per answer type, gflops, questions_per_s

Files (official VQAv2 field names):
    questions    {"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}, ...]}
    annotations  {"annotations": [{"question_id", "image_id", "question_type", "answer_type",
                                   "multiple_choice_answer", "answers": [{"answer", "answer_id", ...} x 10]}]}
    results      [{"question_id": 1, "answer": "2"}, ...]          (what the evaluation server takes)
Images are ``image_root / "COCO_{data_subtype}_{image_id:012d}.jpg"`` as in the official tools
(``image_pattern`` changes the name). Without annotations (test-dev) only the results are made.

Accuracy is the official one (``vqaEval.py`` of the VQA evaluation tools): the prediction is
normalised (punctuation, number words to digits, articles dropped, contractions restored); for
each of the 10 human answers, the other 9 are compared with it and give ``min(#matches / 3, 1)``;
the 10 values are averaged. Human answers get the punctuation step only, and only when they
disagree, as in the official script.

Answers are generated (``BlipForQuestionAnswering.generate``, greedy, at most 10 new tokens), as
BLIP's ``inference="generate"`` mode does; BLIP's paper numbers rank a fixed answer list instead.
Questions are batched by tokenised length, so no question is padded: the Hugging Face answer
decoder attends to every question token, padding included (transformers 5.x passes an all-ones
question mask), and unpadded batches give the same answers as one question at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BlipForQuestionAnswering

from crossget.tools.common import ModelClock, device_dtype, read_json
from crossget.tools.eval.blip_common import check_images, check_model, gflops_of, malformed, open_rgb, require_fields
from crossget.tools.eval.runner import run_task

QUESTIONS = "VQA question file"
ANNOTATIONS = "VQA annotation file"
IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"

# --------------------------------------------------------------------------- official normalisation
# Tables and rules of the official VQA evaluation script (vqaEval.py), unchanged.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic): a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a punctuation mark next to a space (or any mark, when
    the text has a digit-comma-digit) is deleted, otherwise replaced by a space; periods not
    followed by a digit are deleted."""
    out = text
    glued = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (32) as the count: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles dropped,
    contractions given their apostrophes back."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy in [0, 1] of one prediction against the (10) human answers: the mean
    over leaving each human answer out of ``min(#other humans who gave the prediction / 3, 1)``."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    accs = []
    for i in range(len(humans)):
        matches = sum(1 for j, a in enumerate(humans) if j != i and a == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- data
@dataclass
class VQASet:
    """Questions in file order, their image files, and (with annotations) the human answers."""

    question_ids: list[Any]
    questions: list[str]
    image_paths: list[Path]
    answers: dict[Any, list[str]] | None = None
    answer_types: dict[Any, str] = field(default_factory=dict)
    question_types: dict[Any, str] = field(default_factory=dict)
    multiple_choice: dict[Any, str] = field(default_factory=dict)  # the consensus answer (training target)
    source: str = ""

    def __len__(self) -> int:
        return len(self.question_ids)


def load_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    image_pattern: str = IMAGE_PATTERN,
    limit: int | None = None,
    check: bool = True,
) -> VQASet:
    """Read official VQAv2 question (and annotation) files.

    ``image_pattern`` is formatted with ``image_id`` and ``data_subtype`` (from the question file);
    images are looked up under ``image_root`` (default: the question file's folder).

    Raises:
        FileNotFoundError: a file or (with ``check``) images are missing.
        ValueError: malformed JSON or fields; a question without an annotation.
    """
    qpath = Path(questions)
    qdata = read_json(qpath, QUESTIONS)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise malformed(qpath, QUESTIONS, 'expected an object with a "questions" list')
    entries = qdata["questions"][:limit]
    if not entries:
        raise malformed(qpath, QUESTIONS, "no questions")
    root = Path(image_root) if image_root is not None else qpath.parent
    subtype = qdata.get("data_subtype")
    if subtype is None and "{data_subtype" in image_pattern:
        raise malformed(qpath, QUESTIONS, 'no "data_subtype" to name the images by; give an image_pattern without it')
    qids, texts, paths = [], [], []
    for n, q in enumerate(entries):
        require_fields(q, ("question_id", "image_id", "question"), qpath, QUESTIONS, f"questions[{n}]")
        try:
            name = image_pattern.format(image_id=q["image_id"], data_subtype=subtype)
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"image_pattern {image_pattern!r} does not fit image_id {q['image_id']!r} of "
                             f"{qpath}: {err!r}") from None
        qids.append(q["question_id"])
        texts.append(str(q["question"]))
        paths.append(root / name)
    data = VQASet(qids, texts, paths, source=str(qpath))
    if annotations is not None:
        _add_annotations(data, Path(annotations))
    if check:
        check_images(sorted(set(paths)), qpath)
    return data


def _add_annotations(data: VQASet, path: Path) -> None:
    adata = read_json(path, ANNOTATIONS)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise malformed(path, ANNOTATIONS, 'expected an object with an "annotations" list')
    by_id = {}
    for n, a in enumerate(adata["annotations"]):
        require_fields(a, ("question_id", "answers"), path, ANNOTATIONS, f"annotations[{n}]")
        if not isinstance(a["answers"], list) or not a["answers"]:
            raise malformed(path, ANNOTATIONS, f'annotations[{n}]["answers"] must be a non-empty list')
        for m, ans in enumerate(a["answers"]):
            require_fields(ans, ("answer",), path, ANNOTATIONS, f'annotations[{n}]["answers"][{m}]')
        by_id[a["question_id"]] = a
    missing = [q for q in data.question_ids if q not in by_id]
    if missing:
        raise malformed(path, ANNOTATIONS, f"no annotation for {len(missing)} questions, e.g. question_id {missing[0]!r}")
    data.answers = {q: [str(a["answer"]) for a in by_id[q]["answers"]] for q in data.question_ids}
    data.answer_types = {q: str(by_id[q].get("answer_type", "")) for q in data.question_ids}
    data.question_types = {q: str(by_id[q].get("question_type", "")) for q in data.question_ids}
    data.multiple_choice = {q: str(by_id[q].get("multiple_choice_answer") or data.answers[q][0])
                            for q in data.question_ids}


def vqa_scores(predictions: Mapping[Any, str], data: VQASet) -> dict[str, Any]:
    """Official accuracy (percent) over all questions of ``data``, and per answer type."""
    if data.answers is None:
        raise ValueError(f"{data.source} has no annotations to score against")
    missing = [q for q in data.question_ids if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions, e.g. question_id {missing[0]!r}")
    per_q = {q: vqa_accuracy(predictions[q], data.answers[q]) for q in data.question_ids}
    by_type: dict[str, list[float]] = {}
    for q, acc in per_q.items():
        by_type.setdefault(data.answer_types.get(q, ""), []).append(acc)
    return {
        "accuracy": 100 * sum(per_q.values()) / len(per_q),
        "accuracy_per_answer_type": {t: 100 * sum(v) / len(v) for t, v in sorted(by_type.items())},
    }


# --------------------------------------------------------------------------- generation
def vqa_inputs(model: nn.Module, processor: Any, images: list, questions: list[str]) -> dict[str, torch.Tensor]:
    """Processor tensors of a batch (``input_ids``/``attention_mask`` ``[B, L]``, ``pixel_values``), on the model's
    device; questions of equal tokenised length, so nothing is padded."""
    device, dtype = device_dtype(model)
    inputs = processor(images=images, text=questions, return_tensors="pt", padding=True)
    return {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device),
            "pixel_values": inputs["pixel_values"].to(device, dtype)}


@torch.inference_mode()
def generate_answers(
    model: nn.Module, tokenizer: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int = 10, num_beams: int = 1
) -> list[str]:
    """Generated answers of a batch made by :func:`vqa_inputs`."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [a.strip() for a in tokenizer.batch_decode(out, skip_special_tokens=True)]


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by equal length (in order of first appearance of each length), chunks of ``batch_size``."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            yield idx[s : s + batch_size]


def vqa_gflops(model: nn.Module, processor: Any, image, question: str, max_new_tokens: int = 10,
               num_beams: int = 1) -> float:
    """GFLOPs of answering one question, forced to ``max_new_tokens`` answer tokens."""
    inputs = vqa_inputs(model, processor, [image], [question])
    return gflops_of(model.generate, **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                     num_beams=num_beams)


def evaluate_vqa(
    model: nn.Module,
    processor: Any,
    data: VQASet,
    batch_size: int = 16,
    max_new_tokens: int = 10,
    num_beams: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question; official accuracy when ``data`` has annotations; GFLOPs and questions/s.

    Returns ``accuracy`` (percent), ``accuracy_per_answer_type``, ``gflops`` (:func:`vqa_gflops`, first
    question), ``questions_per_s`` (model time: vision, question encoder, answer decoder; not image decoding) and
    ``results`` (``[{"question_id", "answer"}]``, the official results format, in file order).
    """
    check_model(model, BlipForQuestionAnswering)
    device, _ = device_dtype(model)
    clock = ModelClock(device)
    lengths = [len(ids) for ids in processor.tokenizer(data.questions)["input_ids"]]
    answers: dict[int, str] = {}
    bar = tqdm(total=len(data), desc="questions", disable=not progress)
    for idx in length_batches(lengths, batch_size):
        inputs = vqa_inputs(model, processor, [open_rgb(data.image_paths[i]) for i in idx],
                            [data.questions[i] for i in idx])
        with clock:
            out = generate_answers(model, processor.tokenizer, inputs, max_new_tokens, num_beams)
        answers.update(zip(idx, out))
        bar.update(len(idx))
    bar.close()
    predictions = {data.question_ids[i]: answers[i] for i in range(len(data))}
    result: dict[str, Any] = vqa_scores(predictions, data) if data.answers is not None else {"accuracy": None}
    result |= {
        "gflops": vqa_gflops(model, processor, open_rgb(data.image_paths[0]), data.questions[0], max_new_tokens,
                             num_beams),
        "questions_per_s": clock.rate(len(data)),
        "seconds": clock.seconds,
        "questions": len(data),
        "generation": {"max_new_tokens": max_new_tokens, "num_beams": num_beams},
        "results": [{"question_id": q, "answer": a} for q, a in predictions.items()],
    }
    return result


@dataclass(frozen=True)
class VQATask:
    """VQAv2 as a :class:`~crossget.tools.eval.runner.BlipTask`: the question file's
    ``annotations`` (None: answers only) and ``image_pattern`` (see :func:`load_vqa`); ``options``
    are :func:`evaluate_vqa`'s (``batch_size``, ``max_new_tokens``, ``num_beams``)."""

    annotations: str | os.PathLike | None = None
    image_pattern: str = IMAGE_PATTERN

    name = "vqa"
    model_class = BlipForQuestionAnswering
    result_keys = ("accuracy", "questions_per_s")
    results_file = True  # the answers in the official results format

    def load(self, path: str | os.PathLike, image_root: str | os.PathLike | None, limit: int | None) -> VQASet:
        return load_vqa(path, self.annotations, image_root, self.image_pattern, limit)

    def describe(self) -> dict[str, Any]:
        return {"annotations": str(self.annotations) if self.annotations else None}

    def sample_gflops(self, model: nn.Module, processor: Any, data: VQASet, options: Mapping[str, Any]) -> float:
        gen = {k: options[k] for k in ("max_new_tokens", "num_beams") if k in options}
        return vqa_gflops(model, processor, open_rgb(data.image_paths[0]), data.questions[0], **gen)

    def evaluate(self, model: nn.Module, processor: Any, data: VQASet, progress: bool,
                 options: Mapping[str, Any]) -> dict[str, Any]:
        return evaluate_vqa(model, processor, data, progress=progress, **options)


def run_vqa(
    model_dir: str | os.PathLike,
    questions: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    image_pattern: str = IMAGE_PATTERN,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a local ``BlipForQuestionAnswering`` and VQAv2 files, evaluate one config
    (:func:`~crossget.tools.eval.runner.run_task`: ``image_root``, ``limit``, ``method``, ...; the
    rest go to :func:`evaluate_vqa`). With ``json_path`` the metrics go there and the answers to
    ``<stem>_results.json`` beside it."""
    return run_task(VQATask(annotations, image_pattern), model_dir, questions, **kwargs)
