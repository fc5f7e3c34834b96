"""Scores of LLaVA-1.5's evaluation suites, from generated answer texts.

- Short answers: VQAv2's official accuracy (:mod:`crossget.tools.eval.vqa`), TextVQA's accuracy as
  LLaVA's ``eval_textvqa.py`` computes it, GQA exact match as LLaVA's ``convert_gqa_for_eval.py``
  + GQA's ``eval.py`` compute it.
- Multiple choice: the option letter parsed as LLaVA's ``eval_science_qa.py`` does, plus
  MMBench's exact option-text match.
- Yes/no: POPE as LLaVA's ``eval_pope.py`` (accuracy, precision, recall, F1, yes-ratio); MME as
  its official ``eval_tool/calculation.py`` (acc + acc+ per subtask, perception and cognition).

The official VQA normalisation tables live in :mod:`crossget.tools.eval.vqa` only; TextVQA adds
its evaluator's few extra steps on top (:func:`textvqa_normalize`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# VQAv2's official normalisation and accuracy live in the VQAv2 harness; LLaVA's VQAv2 scores use them as is
from crossget.tools.eval.vqa import normalize_answer, process_digit_article, process_punctuation, vqa_accuracy

__all__ = [
    "LETTERS",
    "gqa_normalize",
    "mme_scores",
    "mme_yes_no",
    "normalize_answer",
    "parse_choice",
    "pope_metrics",
    "pope_yes_no",
    "textvqa_accuracy",
    "textvqa_normalize",
    "vqa_accuracy",
]

# --------------------------------------------------------------------------- VQA normalisation
def textvqa_normalize(text: str) -> str:
    """A TextVQA answer as LLaVA's evaluator (TextVQA's m4c ``EvalAIAnswerProcessor``) compares it:
    lower case, ``,`` and ``?`` dropped, ``'s`` split off, then the official VQA punctuation and
    number/article/contraction rules (:mod:`crossget.tools.eval.vqa`, the one copy of those tables).

    ``"Two Dogs."`` -> ``"2 dogs"``; ``"the cat's toy"`` -> ``"cat 's toy"``.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction (LLaVA's ``eval_textvqa.py``, m4c's evaluator): the VQA
    leave-one-out ``mean_i min(1, #(other humans saying it) / 3)`` with prediction and every human
    answer normalised by :func:`textvqa_normalize`. With 10 answers: 1.0 for an answer at least 4
    humans gave, 0.9 for 3, 0.6 for 2, 0.3 for 1.

    Raises:
        ValueError: no answers.
    """
    if not answers:
        raise ValueError("a question needs at least one human answer")
    pred = textvqa_normalize(prediction)
    gts = [textvqa_normalize(a) for a in answers]
    scores = [min(1.0, sum(1 for j, other in enumerate(gts) if j != i and other == pred) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def gqa_normalize(text: str) -> str:
    """A GQA prediction as LLaVA's ``convert_gqa_for_eval.py`` writes it (then compared with ``==``)."""
    return text.strip().rstrip(".").lower()


# --------------------------------------------------------------------------- multiple choice
LETTERS = "ABCDEFGHIJ"
_LEADING_LETTER = re.compile(r"^(?:\(([A-J])\)|([A-J])[.):](?=\s|$))")
_THE_ANSWER_IS = re.compile(r"The answer is \(?([A-J])\)?")


def parse_choice(text: str, n_choices: int, options: Sequence[str] | None = None) -> int:
    """Index of the option an answer names, or -1.

    In order: the bare letter (``"B"``); a leading letter as ``"B. ..."``, ``"(B) ..."``,
    ``"B) ..."``, ``"B: ..."`` (LLaVA's ScienceQA rule, widened to the usual brackets; never
    ``"A cat"``);
    ``"The answer is B"``; the exact text of one option (MMBench's text match, case-insensitive,
    trailing period ignored). Letters beyond ``n_choices`` count as no answer.

    Raises:
        ValueError: ``n_choices`` outside 1..10.
    """
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices must be in 1..{len(LETTERS)}, got {n_choices}")
    text = text.strip()
    letter = None
    if len(text) == 1 and text in LETTERS:
        letter = text
    elif m := _LEADING_LETTER.match(text):
        letter = m.group(1) or m.group(2)
    elif m := _THE_ANSWER_IS.search(text):
        letter = m.group(1)
    if letter is not None:
        i = LETTERS.index(letter)
        return i if i < n_choices else -1
    if options:
        said = text.rstrip(".").strip().lower()
        hits = [i for i, opt in enumerate(options[:n_choices]) if str(opt).rstrip(".").strip().lower() == said]
        if len(hits) == 1:
            return hits[0]
    return -1


# --------------------------------------------------------------------------- POPE
def pope_yes_no(text: str) -> str:
    """``"yes"`` or ``"no"`` as LLaVA's ``eval_pope.py`` reads an answer: only the first sentence,
    commas dropped, "no" if any word is ``No``, ``no`` or ``not``, otherwise "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 (positive class "yes") and the share of "yes" answers.

    ``predictions`` are ``"yes"``/``"no"`` (see :func:`pope_yes_no`); a label is "no" if it is
    ``"no"`` and "yes" otherwise, as in LLaVA. Precision/recall/F1 with a zero denominator are 0.0
    (LLaVA's script would divide by zero). Returns fractions in [0, 1] and the TP/FP/TN/FN counts.

    Raises:
        ValueError: lengths differ or nothing to score.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no POPE answers to score")
    pred = [p != "no" for p in predictions]
    gold = [lab != "no" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / len(pred),
        "n": len(labels),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def mean_by(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{key: mean}`` of non-empty groups (per-category breakdowns)."""
    return {k: sum(v) / len(v) for k, v in values.items() if v}


# --------------------------------------------------------------------------- MME
def mme_yes_no(text: str) -> str:
    """An answer as MME's official ``calculation.py`` reads it: lower-cased; ``"yes"`` / ``"no"``
    as they are; else ``"yes"`` if its first four characters hold "yes", ``"no"`` if they hold
    "no", otherwise ``"other"`` (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(
    answers: Sequence[tuple[str, str, str, str]], perception: Sequence[str], cognition: Sequence[str]
) -> dict[str, object]:
    """MME's scores from ``(subtask, image, ground truth, answer text)`` per question, as its
    official ``calculation.py``: per subtask ``acc`` (percent of questions right, "other" is
    wrong), ``acc_plus`` (percent of images with every question right) and ``score`` =
    acc + acc+ (out of 200); ``perception`` and ``cognition``: the sums of their subtasks'
    scores (out of 2000 and 800 with every subtask), with the subtasks ``missing`` from them.

    Raises:
        ValueError: no answers, or a ground truth other than yes / no.
    """
    if not answers:
        raise ValueError("no MME answers to score")
    by_task: dict[str, dict[str, list[bool]]] = {}
    other: dict[str, int] = {}
    for task, image, truth, text in answers:
        if truth not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes or no, got {truth!r} ({task}/{image})")
        pred = mme_yes_no(text)
        by_task.setdefault(task, {}).setdefault(image, []).append(pred == truth)
        other[task] = other.get(task, 0) + (pred == "other")
    subtasks = {}
    for task, images in by_task.items():
        right = [r for rs in images.values() for r in rs]
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(all(rs) for rs in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(right),
                          "images": len(images), "other": other[task]}
    out: dict[str, object] = {}
    for group, names in (("perception", perception), ("cognition", cognition)):
        present = [t for t in names if t in subtasks]
        out[group] = sum(subtasks[t]["score"] for t in present) if present else None
        out[f"{group}_missing"] = [t for t in names if t not in subtasks]
    out["subtasks"] = subtasks
    return out
