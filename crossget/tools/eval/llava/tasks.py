"""The three LLaVA evaluation tasks end to end: read the files, answer, score, report cost.

    from crossget.tools.eval.llava import evaluate_llava
    result = evaluate_llava("vqa", model, processor, "llava_gqa_testdev_balanced.jsonl", "gqa/images",
                            "testdev_balanced_questions.json", answers_path="answers/gqa.jsonl")
    result["score"]["accuracy"], result["gflops"], result["samples_per_s"]

Scores are percentages, as LLaVA-1.5's paper reports them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.api import config, is_patched
from crossget.config import PatchConfig
from crossget.families.llava import FAMILY as LLAVA
from crossget.families.llava import adapt_processor
from crossget.io import apply
from crossget.tools.common import write_json
from crossget.tools.eval.llava.data import (
    SHORT_ANSWER,
    QuestionSet,
    Sample,
    VQAAnnotations,
    load_mmbench,
    load_pope,
    load_science_qa,
    load_vqa_annotations,
    load_vqa_questions,
)
from crossget.tools.eval.llava.generate import generate_answers, write_answers
from crossget.tools.eval.llava.metrics import (
    LETTERS,
    gqa_normalize,
    mean_by,
    parse_choice,
    pope_metrics,
    pope_yes_no,
    textvqa_accuracy,
    vqa_accuracy,
)

__all__ = ["METHODS", "TASKS", "evaluate_llava", "load_llava", "load_task", "patch_llava", "run_llava_eval",
           "score_mc", "score_pope", "score_vqa"]

TASKS = ("vqa", "mc", "pope")
METHODS = LLAVA.methods
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VQA_METRICS = ("vqa", "textvqa", "exact")


def _check_lengths(samples: Sequence[Sample], texts: Sequence[str]) -> None:
    if len(samples) != len(texts):
        raise ValueError(f"{len(texts)} answers for {len(samples)} questions")


def load_llava(path: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[nn.Module, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` from a local folder, in eval mode.

    Raises:
        FileNotFoundError: no model folder (``config.json``) at ``path``.
        TypeError: the folder holds another kind of model.
        ValueError: unknown ``dtype``.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json, weights and the processor files)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    kind = AutoConfig.from_pretrained(path).model_type
    if kind != "llava":
        raise TypeError(f"{path} holds a {kind!r} model; these evaluations need LLaVA (model_type 'llava')")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def patch_llava(
    model: nn.Module, processor: Any, method: str = "none", keep: int | None = None, r: int | None = None,
    flops: float | None = None,
) -> Any:
    """Patch ``model`` for one method and budget (``crossget.patch``) and return the processor
    adapted to the visual-token count that now reaches the language model
    (``crossget.adapt_processor``); ``"none"`` leaves both stock.

    Raises:
        ValueError: unknown method, a budget for ``"none"``, or no budget / several for a method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    budget = {k: v for k, v in (("keep", keep), ("r", r), ("flops", flops)) if v is not None}
    if method == "none":
        if budget:
            raise ValueError(f"method 'none' is the stock model and takes no budget, got {budget}")
        apply(model, None)
        return processor
    if len(budget) != 1:
        raise ValueError(f"give exactly one of keep, r or flops for method {method!r}, got {budget or 'none'}")
    apply(model, PatchConfig(method=method, **budget))
    return adapt_processor(processor, model) or processor


def score_vqa(
    samples: Sequence[Sample], texts: Sequence[str], annotations: VQAAnnotations, metric: str | None = None
) -> dict[str, Any]:
    """Short-answer accuracy in percent: ``"vqa"`` (VQAv2's official accuracy over the human
    answers), ``"textvqa"`` (TextVQA's, as LLaVA scores it) or ``"exact"`` (GQA: the answer,
    trailing period dropped and lower-cased, equals the ground truth). ``metric=None`` takes the
    annotation format's.

    Raises:
        ValueError: unknown metric, or questions the annotations do not cover (names a few).
    """
    _check_lengths(samples, texts)
    metric = metric or annotations.metric
    if metric not in VQA_METRICS:
        raise ValueError(f"metric must be one of {VQA_METRICS}, got {metric!r}")
    scores, missing = [], []
    for s, text in zip(samples, texts):
        answers = annotations.answers_for(s)
        if answers is None:
            missing.append(s.question_id)
        elif metric == "vqa":
            scores.append(vqa_accuracy(text, answers))
        elif metric == "textvqa":
            scores.append(textvqa_accuracy(text, answers))
        else:
            scores.append(float(gqa_normalize(text) in {a.strip().lower() for a in answers}))
    if missing:
        raise ValueError(
            f"{annotations.path} has no answers for {len(missing)} of {len(samples)} questions, e.g. {missing[:5]}"
        )
    return {"metric": metric, "accuracy": 100 * sum(scores) / len(scores), "n": len(scores)}


def score_mc(samples: Sequence[Sample], texts: Sequence[str]) -> dict[str, Any]:
    """Multiple-choice accuracy in percent from the option letter each answer names.

    ``accuracy`` is over single passes (round 0); with circular rounds (MMBench),
    ``circular_accuracy`` counts a question right only if every rotation was. ``unparsed`` counts
    answers naming no option. Questions without ground truth (MMBench test) are not scored.
    """
    _check_lengths(samples, texts)
    per_question: dict[Any, list[bool]] = defaultdict(list)
    single, by_category = [], defaultdict(list)
    unparsed = 0
    for s, text in zip(samples, texts):
        if s.answer is None:
            continue
        n = len(s.options or ()) or len(LETTERS)
        choice = parse_choice(text, n, s.options)
        unparsed += choice < 0
        right = choice >= 0 and LETTERS[choice] == s.answer
        per_question[s.question_id].append(right)
        if not s.round_id:
            single.append(right)
            by_category[s.category or "all"].append(float(right))
    if not single:
        return {"accuracy": None, "n": 0, "note": "no ground truth: answers written, nothing scored"}
    out: dict[str, Any] = {"accuracy": 100 * sum(single) / len(single), "n": len(single), "unparsed": unparsed}
    if any(len(v) > 1 for v in per_question.values()):
        out["circular_accuracy"] = 100 * sum(all(v) for v in per_question.values()) / len(per_question)
    if len(by_category) > 1:
        out["per_category"] = {k: 100 * v for k, v in mean_by(by_category).items()}
    return out


def score_pope(samples: Sequence[Sample], texts: Sequence[str]) -> dict[str, Any]:
    """POPE per category and pooled (``"all"``), in percent, plus the mean F1 / accuracy over
    categories (what LLaVA-1.5 reports as POPE)."""
    _check_lengths(samples, texts)
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for s, text in zip(samples, texts):
        for key in {s.category or "all", "all"}:
            groups[key][0].append(pope_yes_no(text))
            groups[key][1].append(s.answer)
    out: dict[str, Any] = {}
    for key, (pred, gold) in sorted(groups.items()):
        m = pope_metrics(pred, gold)
        out[key] = {k: (100 * v if isinstance(v, float) else v) for k, v in m.items()}
    cats = [k for k in out if k != "all"] or ["all"]
    out["f1_mean"] = sum(out[k]["f1"] for k in cats) / len(cats)
    out["accuracy_mean"] = sum(out[k]["accuracy"] for k in cats) / len(cats)
    return out


def _limit(qset: QuestionSet, limit: int | None) -> list[Sample]:
    """The first ``limit`` questions (all rounds of each, for circular MMBench)."""
    if limit is None:
        return qset.samples
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if all(s.round_id is None for s in qset.samples):
        return qset.samples[:limit]
    keep = [s.question_id for s in qset.samples if s.round_id == 0][:limit]
    keep_set = set(keep)
    return [s for s in qset.samples if s.question_id in keep_set]


def _check_images(samples: Sequence[Sample], images: str | Path | None, source: Path) -> None:
    """Fail before any generation if image files are missing (names a few)."""
    named = [s for s in samples if s.image_b64 is None]
    if not named:
        return
    if images is None:
        raise ValueError(f"the questions in {source} name image files: give the images folder")
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {root}")
    missing = [str(root / s.image) for s in named if not (root / s.image).is_file()]
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} images named by {source} are missing: {', '.join(missing[:3])}{more}")


def load_task(
    task: str,
    questions: str | Path,
    annotations: str | Path | None = None,
    circular: bool = False,
    suffix: str | None = SHORT_ANSWER,
) -> tuple[QuestionSet, VQAAnnotations | None]:
    """The questions of ``task`` and, for ``vqa``, the parsed annotations (``None`` without them).

    ``mc`` reads an MMBench TSV (``.tsv``) or ScienceQA JSON/JSONL (``annotations``: ScienceQA's
    ``problems.json``); ``pope`` takes the label files as ``annotations``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "vqa":
        ann = load_vqa_annotations(annotations) if annotations is not None else None
        return load_vqa_questions(questions, suffix), ann
    if task == "pope":
        return load_pope(questions, annotations, suffix), None
    if Path(questions).suffix.lower() == ".tsv":
        if annotations is not None:
            raise ValueError(f"MMBench keeps its answers in the TSV; no annotations file is read ({annotations})")
        return load_mmbench(questions, circular=circular), None
    if circular:
        raise ValueError("circular evaluation is MMBench's (a .tsv question file)")
    return load_science_qa(questions, annotations), None


def evaluate_llava(
    task: str,
    model: nn.Module,
    processor: Any,
    questions: str | Path,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    circular: bool = False,
    metric: str | None = None,
    suffix: str | None = SHORT_ANSWER,
    pad_square: bool | None = None,
    answers_path: str | Path | None = None,
    model_id: str = "llava",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer and score one LLaVA evaluation file; returns the result row.

    Args:
        task: ``"vqa"`` (VQAv2/GQA/TextVQA), ``"mc"`` (ScienceQA-IMG, MMBench) or ``"pope"``.
        model, processor: HF LLaVA and its processor, patched (and adapted) or not.
        questions: LLaVA's question file for the task (see :mod:`crossget.tools.eval.llava.data`).
        images: the images folder (MMBench embeds its images).
        annotations: ground truth: VQA annotation file, ScienceQA ``problems.json`` (optional) or
            POPE label files; without it a VQA run writes answers and scores nothing.
        metric: VQA only, ``"vqa"``, ``"textvqa"`` or ``"exact"`` (default: the annotation format's).
        answers_path: where LLaVA's answers JSONL goes (default: not written).

    The row holds ``score`` (task metrics, percent), GFLOPs per question (``gflops`` for the
    whole generation, ``gflops_prefill`` for the prompt's forward), ``visual_tokens`` reaching
    the language model, ``samples_per_s`` and ``new_tokens_per_s``.
    """
    if metric is not None and task != "vqa":
        raise ValueError(f"metric applies to the vqa task only (got metric={metric!r} for {task!r})")
    qset, ann = load_task(task, questions, annotations, circular, suffix)
    samples = _limit(qset, limit)
    _check_images(samples, images, qset.path)
    gen = generate_answers(model, processor, samples, images, batch_size, max_new_tokens, pad_square, progress)
    if answers_path is not None:
        write_answers(answers_path, samples, gen.texts, model_id)
    if task == "vqa":
        score = score_vqa(samples, gen.texts, ann, metric) if ann is not None else None
    elif task == "mc":
        score = score_mc(samples, gen.texts)
    else:
        score = score_pope(samples, gen.texts)
    return {
        "task": task,
        "dataset": qset.kind,
        "questions": str(qset.path),
        "annotations": None if annotations is None else str(annotations),
        "n": len(samples),
        "skipped": qset.skipped,
        "score": score,
        **gen.summary(),
        "answers": None if answers_path is None else str(answers_path),
    }


def run_llava_eval(
    task: str,
    model_dir: str | Path,
    questions: str | Path,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    *,
    method: str = "none",
    keep: int | None = None,
    r: int | None = None,
    flops: float | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    answers_path: str | Path | None = None,
    json_path: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Load a local LLaVA, patch it for ``method`` at one budget (:func:`patch_llava`), answer and
    score one evaluation file (:func:`evaluate_llava`, which takes ``options``), and with
    ``json_path`` write ``{"meta": meta, "results": row}``; returns the row (with ``method`` and
    the resolved ``patch`` config)."""
    model, processor = load_llava(model_dir, device, dtype)
    processor = patch_llava(model, processor, method, keep=keep, r=r, flops=flops)
    result = evaluate_llava(
        task, model, processor, questions, images, annotations, answers_path=answers_path,
        model_id=os.path.basename(os.path.normpath(str(model_dir))), **options,
    )
    result["method"] = method
    result["patch"] = config(model).to_dict() if is_patched(model) else None
    if json_path is not None:
        write_json(json_path, {"meta": {**(meta or {}), "torch": torch.__version__}, "results": result})
    return result
