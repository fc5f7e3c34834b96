"""The LLaVA evaluation tasks end to end, for every multimodal-LLM family: read the files,
answer, score, report cost and the protocol (docs/protocol.md).

    from crossget.tools.eval.llava import evaluate_llava
    result = evaluate_llava("vqa", model, processor, "llava_gqa_testdev_balanced.jsonl", "gqa/images",
                            "testdev_balanced_questions.json", answers_path="answers/gqa.jsonl")
    result["score"]["accuracy"], result["gflops"], result["samples_per_s"], result["protocol"]

Tasks: ``vqa`` (VQAv2 / GQA / TextVQA), ``mc`` (ScienceQA-IMG, MMBench), ``pope``, ``mme``.
Scores are percentages, as LLaVA-1.5's paper reports them (MME: its points).
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
from crossget.families.llava import FAMILY as LLAVA
from crossget.tools.common import write_json
from crossget.tools.eval.llava.data import (
    MC_PROMPT,
    MME_COGNITION,
    MME_PERCEPTION,
    SHORT_ANSWER,
    QuestionSet,
    Sample,
    VQAAnnotations,
    load_mmbench,
    load_mme,
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
    mme_scores,
    parse_choice,
    pope_metrics,
    pope_yes_no,
    textvqa_accuracy,
    vqa_accuracy,
)
from crossget.tools.eval.llava.models import DTYPES, load_mllm, patch_mllm
from crossget.tools.eval.llava.protocol import protocol_block

__all__ = ["DTYPES", "METHODS", "TASKS", "evaluate_llava", "load_llava", "load_task", "patch_llava", "run_llava_eval",
           "score_mc", "score_mme", "score_pope", "score_vqa", "write_mme_results"]

TASKS = ("vqa", "mc", "pope", "mme")
METHODS = LLAVA.methods  # LLaVA-1.5's; each family's: crossget.tools.eval.llava.models.family_methods
VQA_METRICS = ("vqa", "textvqa", "exact")


def _check_lengths(samples: Sequence[Sample], texts: Sequence[str]) -> None:
    if len(samples) != len(texts):
        raise ValueError(f"{len(texts)} answers for {len(samples)} questions")


def load_llava(path: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[nn.Module, Any]:
    """``(model, processor)`` from a local folder, in eval mode: :func:`~crossget.tools.eval.llava.models.load_mllm`
    (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL).

    Raises:
        FileNotFoundError: no model folder (``config.json``) at ``path``.
        TypeError: the folder holds another kind of model.
        ValueError: unknown ``dtype``.
    """
    return load_mllm(path, device, dtype)


def patch_llava(
    model: nn.Module, processor: Any, method: str = "none", keep: int | None = None, r: int | None = None,
    flops: float | None = None,
) -> Any:
    """Patch ``model`` for one method and budget and return the processor adapted to the
    visual-token count that now reaches the language model
    (:func:`~crossget.tools.eval.llava.models.patch_mllm`); ``"none"`` gives the stock model.

    Raises:
        ValueError: a method the model's family does not run, a budget for ``"none"``, or no
            budget / several for a method.
    """
    return patch_mllm(model, processor, method, keep=keep, r=r, flops=flops)


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


def score_mme(samples: Sequence[Sample], texts: Sequence[str]) -> dict[str, Any]:
    """MME's official scores (:func:`~crossget.tools.eval.llava.metrics.mme_scores`): per subtask
    acc, acc+ and their sum; perception (10 subtasks) and cognition (4) reported apart."""
    _check_lengths(samples, texts)
    rows = [(s.category, s.meta.get("image_name", s.image), s.answer, text) for s, text in zip(samples, texts)]
    return mme_scores(rows, MME_PERCEPTION, MME_COGNITION)


def write_mme_results(folder: str | Path, samples: Sequence[Sample], texts: Sequence[str]) -> Path:
    """MME's result files, which its official ``eval_tool/calculation.py --results_dir`` reads:
    ``<subtask>.txt`` with ``image<TAB>question<TAB>ground truth<TAB>answer`` per line, an image's
    two questions together. Line breaks inside an answer become spaces."""
    _check_lengths(samples, texts)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = defaultdict(list)
    for s, text in zip(samples, texts):
        answer = " ".join(text.replace("\t", " ").splitlines())
        lines[s.category].append("\t".join((s.meta.get("image_name", s.image), s.prompt, s.answer, answer)))
    for task, rows in lines.items():
        (folder / f"{task}.txt").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return folder


def _limit(qset: QuestionSet, limit: int | None) -> list[Sample]:
    """The first ``limit`` questions (all rounds of each, for circular MMBench; MME: rounded up to
    whole images, whose two questions are consecutive)."""
    if limit is None:
        return qset.samples
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if qset.kind == "mme":
        return qset.samples[: limit + limit % 2]
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
    ``problems.json``); ``pope`` takes the label files as ``annotations``; ``mme`` reads MME's
    release folder (``questions``; its answers are in it).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "vqa":
        ann = load_vqa_annotations(annotations) if annotations is not None else None
        return load_vqa_questions(questions, suffix), ann
    if task == "pope":
        return load_pope(questions, annotations, suffix), None
    if task == "mme":
        if annotations is not None:
            raise ValueError(f"MME keeps its answers in its folder; no annotations file is read ({annotations})")
        return load_mme(questions, suffix), None
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
    flops_batches: int = 1,
    mme_results: str | Path | None = None,
) -> dict[str, Any]:
    """Answer and score one evaluation file; returns the result row.

    Args:
        task: ``"vqa"`` (VQAv2/GQA/TextVQA), ``"mc"`` (ScienceQA-IMG, MMBench), ``"pope"`` or ``"mme"``.
        model, processor: a multimodal LLM of any family :func:`~crossget.tools.eval.llava.models.load_mllm`
            loads and its processor, patched (and adapted) or not.
        questions: the question file for the task (see :mod:`crossget.tools.eval.llava.data`);
            MME: its release folder.
        images: the images folder (MMBench embeds its images; MME: default ``questions``).
        annotations: ground truth: VQA annotation file, ScienceQA ``problems.json`` (optional) or
            POPE label files; without it a VQA run writes answers and scores nothing.
        metric: VQA only, ``"vqa"``, ``"textvqa"`` or ``"exact"`` (default: the annotation format's).
        answers_path: where LLaVA's answers JSONL goes (default: not written).
        flops_batches: batches counted by ``FlopCounterMode`` (:func:`generate_answers`).
        mme_results: MME only: also write MME's result files here (:func:`write_mme_results`).

    The row holds ``score`` (task metrics, percent; MME: points), GFLOPs per question
    (``gflops`` for the whole generation, ``gflops_prefill`` for the prompt's forward),
    ``visual_tokens`` per image reaching the language model (FastV / DART: from layer K on),
    ``samples_per_s``, ``new_tokens_per_s``, the ``method`` and ``patch`` config the model runs,
    and ``protocol`` (:func:`~crossget.tools.eval.llava.protocol.protocol_block`).
    """
    if metric is not None and task != "vqa":
        raise ValueError(f"metric applies to the vqa task only (got metric={metric!r} for {task!r})")
    if mme_results is not None and task != "mme":
        raise ValueError(f"mme_results applies to the mme task only (got it for {task!r})")
    qset, ann = load_task(task, questions, annotations, circular, suffix)
    if task == "mme" and images is None:
        images = questions
    samples = _limit(qset, limit)
    _check_images(samples, images, qset.path)
    gen = generate_answers(model, processor, samples, images, batch_size, max_new_tokens, pad_square, progress,
                           flops_batches=flops_batches)
    if answers_path is not None:
        write_answers(answers_path, samples, gen.texts, model_id)
    if task == "vqa":
        score = score_vqa(samples, gen.texts, ann, metric) if ann is not None else None
    elif task == "mc":
        score = score_mc(samples, gen.texts)
    elif task == "pope":
        score = score_pope(samples, gen.texts)
    else:
        score = score_mme(samples, gen.texts)
        if mme_results is not None:
            write_mme_results(mme_results, samples, gen.texts)
    patched = is_patched(model) and config(model).method != "none"
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
        "method": config(model).method if patched else "none",
        "patch": config(model).to_dict() if patched else None,
        "protocol": protocol_block(
            task, model, processor, dataset=qset.kind, suffix=MC_PROMPT if task == "mc" else suffix,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size, pad_square=pad_square,
            metric=(metric or ann.metric) if ann is not None else None, circular=circular, flops_batches=flops_batches,
        ),
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
    fastv_layer: int | None = None,
    site: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Load a local multimodal LLM (:func:`~crossget.tools.eval.llava.models.load_mllm`), patch it
    for ``method`` at one budget (:func:`~crossget.tools.eval.llava.models.patch_mllm`), answer and
    score one evaluation file (:func:`evaluate_llava`, which takes ``options``), and with
    ``json_path`` write ``{"meta": meta, "results": row}``; returns the row (with ``method``, the
    resolved ``patch`` config and the ``protocol``)."""
    model, processor = load_mllm(model_dir, device, dtype)
    processor = patch_mllm(model, processor, method, keep=keep, r=r, flops=flops, fastv_layer=fastv_layer, site=site)
    result = evaluate_llava(
        task, model, processor, questions, images, annotations, answers_path=answers_path,
        model_id=os.path.basename(os.path.normpath(str(model_dir))), **options,
    )
    if json_path is not None:
        write_json(json_path, {"meta": {**(meta or {}), "torch": torch.__version__}, "results": result})
    return result
