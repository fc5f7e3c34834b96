"""Every method at every budget on every task, in one process: ``crossget compare``.

    from crossget.tools.compare import compare, llava_layout_tasks, parse_task
    tasks = llava_layout_tasks("playground/data/eval", ["gqa", "pope"])      # LLaVA's eval folder
    tasks += [parse_task("shapes=vqa:questions.jsonl:images:annotations.json")]  # any other set
    results = compare("llava-1.5-7b-hf", tasks, methods=["tome", "fastv"], keeps=[64, 128], out="runs/compare")

The model is loaded once (only if some run is not done yet) and put in each method's state by
the harness's :func:`~crossget.tools.eval.llava.patch_llava` (``crossget.apply``: from the stock
model up, so nothing carries over between runs). The stock model runs once per task.

Each (task, method, budget) is one JSON file, ``OUT/runs/<task>/<method>-<keep>.json``
(``none.json`` for the stock model), holding the settings the result depends on and the
harness's result row. A rerun skips a run whose file holds the same settings and recomputes
(or, with ``on_change="refuse"``, refuses) one whose settings differ, naming them. Files are
written to a temporary name and renamed, so an interrupted run leaves none half-written.

The summary goes through :func:`crossget.tools.common.write_benchmark`: ``OUT/results.json``
(every run), ``OUT/results.md`` (rows method x budget; per task the score, its share of the
stock score, prefill GFLOPs and their ratio to stock, questions/s) and ``OUT/tradeoff.png``
(score against prefill GFLOPs, one line per method, one panel per task).

``crossget`` here is CrossGET without trained cross tokens: their parameters start at zero,
so it is training-free, and the table names it so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from crossget.api import config, is_patched
from crossget.families.base import CROSS_PARAM, Family
from crossget.families.llava import FAMILY as LLAVA
from crossget.tools.common import read_json, save_figure, write_benchmark
from crossget.tools.eval.llava import TASKS, evaluate_llava, load_llava, patch_llava
from crossget.tools.eval.llava.models import folder_family

__all__ = [
    "LLAVA_LAYOUT",
    "METHOD_LABELS",
    "Run",
    "TaskSpec",
    "compare",
    "compare_markdown",
    "describe_tasks",
    "llava_layout_tasks",
    "model_id",
    "parse_keeps",
    "parse_methods",
    "parse_task",
    "plot_compare",
    "primary_score",
    "run_path",
    "summarize",
]

RESULT_VERSION = 1  # bumped when a run file's layout changes (an older file is then recomputed)
METHOD_LABELS = {
    "none": "stock",
    "tome": "ToMe",
    "crossget": "CrossGET (training-free)",
    "fastv": "FastV",
    "visionzip": "VisionZip",
    "divprune": "DivPrune",
    "dart": "DART",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # task names become folder names


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation set: the harness's task ``kind`` (``vqa`` / ``mc`` / ``pope`` ...) and its files.

    ``options`` go to :func:`~crossget.tools.eval.llava.evaluate_llava` (e.g. ``{"circular": True}``).
    """

    name: str
    kind: str
    questions: Path
    images: Path | None = None
    annotations: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "questions": str(self.questions),
                "images": None if self.images is None else str(self.images),
                "annotations": None if self.annotations is None else str(self.annotations),
                "options": dict(self.options)}


# LLaVA's playground/data/eval/<task>/ layout, as its scripts/v1_5/eval/*.sh read it:
# (kind, question file, images folder, ground truth, options); paths relative to the eval root
LLAVA_LAYOUT: dict[str, tuple[str, str, str | None, str | None, dict[str, Any]]] = {
    "gqa": ("vqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images",
            "gqa/data/testdev_balanced_questions.json", {}),
    "textvqa": ("vqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
                "textvqa/TextVQA_0.5.1_val.json", {}),
    "pope": ("pope", "pope/llava_pope_test.jsonl", "pope/val2014", "pope/coco", {}),
    "sqa": ("mc", "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test", "scienceqa/problems.json", {}),
    "mmbench": ("mc", "mmbench/mmbench_dev_20230712.tsv", None, None, {}),
    # test splits scored by their servers: answers only (no local ground truth), GFLOPs and speed
    "vqav2": ("vqa", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015", None, {}),
    "vizwiz": ("vqa", "vizwiz/llava_test.jsonl", "vizwiz/test", None, {}),
}
if "mme" in TASKS:  # MME's release folder holds its questions, answers and images
    LLAVA_LAYOUT["mme"] = ("mme", "MME/MME_Benchmark_release_version", "MME/MME_Benchmark_release_version", None, {})


def _check_name(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{where}: task name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    return name


def _check_kind(kind: str, where: str) -> str:
    if kind not in TASKS:
        raise ValueError(f"{where}: unknown task kind {kind!r}; the harness has {', '.join(TASKS)}")
    return kind


def _check_files(spec: TaskSpec, where: str) -> TaskSpec:
    """Every path the spec names exists (all missing ones named)."""
    missing = [f"{what} {p}" for what, p, ok in (
        ("questions", spec.questions, spec.questions.exists()),  # MME: a folder
        ("images folder", spec.images, spec.images is None or spec.images.is_dir()),
        ("annotations", spec.annotations, spec.annotations is None or spec.annotations.exists()),
    ) if not ok]
    if missing:
        raise FileNotFoundError(f"{where}: not found: {'; '.join(missing)}")
    return spec


def llava_layout_tasks(root: str | os.PathLike, names: Sequence[str]) -> list[TaskSpec]:
    """Tasks from LLaVA's eval folder (``playground/data/eval``) by name (:data:`LLAVA_LAYOUT`).

    Raises:
        ValueError: an unknown name (the known ones are listed).
        FileNotFoundError: ``root`` or a file a task needs is missing (each named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LLaVA eval folder not found: {root} (LLaVA's playground/data/eval)")
    unknown = [n for n in names if n not in LLAVA_LAYOUT]
    if unknown:
        raise ValueError(f"unknown LLaVA eval task(s) {', '.join(unknown)}; known: {', '.join(LLAVA_LAYOUT)} "
                         "(other sets: --task NAME=KIND:QUESTIONS:IMAGES[:ANNOTATIONS])")
    out = []
    for name in names:
        kind, questions, images, annotations, options = LLAVA_LAYOUT[name]
        spec = TaskSpec(name, _check_kind(kind, f"task {name}"), root / questions,
                        None if images is None else root / images,
                        None if annotations is None else root / annotations, dict(options))
        out.append(_check_files(spec, f"task {name} (LLaVA layout under {root})"))
    return out


def parse_task(text: str) -> TaskSpec:
    """``NAME=KIND:QUESTIONS:IMAGES[:ANNOTATIONS]`` as a :class:`TaskSpec` (an empty IMAGES:
    images embedded in the questions, as MMBench's TSV).

    Raises:
        ValueError: the text is not of that form, or names an unknown kind (says which part).
        FileNotFoundError: a named file or folder is missing.
    """
    form = "NAME=KIND:QUESTIONS:IMAGES[:ANNOTATIONS]"
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"task {text!r}: expected {form} (no 'NAME=')")
    name = _check_name(name.strip(), f"task {text!r}")
    parts = rest.split(":")
    if not 3 <= len(parts) <= 4:
        raise ValueError(f"task {text!r}: expected {form}, got {len(parts)} ':'-separated fields after '='")
    kind, questions, images, annotations = [p.strip() for p in parts] + [""] * (4 - len(parts))
    if not questions:
        raise ValueError(f"task {text!r}: no QUESTIONS file")
    spec = TaskSpec(name, _check_kind(kind, f"task {text!r}"), Path(questions), Path(images) if images else None,
                    Path(annotations) if annotations else None)
    return _check_files(spec, f"task {name}")


def parse_methods(text: str | Sequence[str], family: Family = LLAVA) -> list[str]:
    """``"all"`` (every method of ``family``, default LLaVA-1.5's) or a comma list, stock
    (``none``) left out: it always runs.

    Raises:
        ValueError: unknown methods (named, with the known ones).
    """
    known = [m for m in family.methods if m != "none"]
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s]
    if items == ["all"]:
        return known
    unknown = [m for m in items if m not in family.methods]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; {family.name} has {', '.join(known)} (or 'all')")
    return list(dict.fromkeys(m for m in items if m != "none"))


def parse_keeps(text: str | Sequence[int]) -> list[int]:
    """Visual tokens per image, ``"64,128"`` or a list; sorted, duplicates dropped.

    Raises:
        ValueError: not integers, or below 1.
    """
    items = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise ValueError("no budgets: give visual tokens per image, e.g. 64,128,192")
    keeps = []
    for k in items:
        try:
            v = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"budget {k!r} is not an integer number of visual tokens") from None
        if isinstance(k, float) and k != v or v < 1:
            raise ValueError(f"budget {k!r} must be a whole number of visual tokens >= 1")
        keeps.append(v)
    return sorted(set(keeps))


def _stock_tokens(model_dir: Path, family: Family) -> int | None:
    """Visual tokens per image of a stock LLaVA-1.5 at ``model_dir``, from its config alone
    (None for the families whose count depends on the image size: patching checks their budgets)."""
    if family is not LLAVA:
        return None
    cfg = read_json(model_dir / "config.json", "model config")
    vision = cfg.get("vision_config") or {}
    try:
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
    except (KeyError, TypeError):
        raise ValueError(f"{model_dir}/config.json has no vision_config image_size / patch_size") from None
    return patches + (cfg.get("vision_feature_select_strategy", "default") == "full")


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One evaluation: a task under one method at one budget (``keep=None``: the stock model)."""

    task: TaskSpec
    method: str
    keep: int | None

    @property
    def label(self) -> str:
        return "none" if self.keep is None else f"{self.method}-{self.keep}"


def run_path(out: str | os.PathLike, run: Run) -> Path:
    """``OUT/runs/<task>/<method>-<keep>.json`` (``none.json`` for stock)."""
    return Path(out) / "runs" / run.task.name / f"{run.label}.json"


def _fingerprint(path: Path | None) -> Any:
    """What identifies a file's content cheaply (size and modification time; a folder: its files')."""
    if path is None:
        return None
    if path.is_dir():
        return {p.name: _fingerprint(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (
            ".json", ".jsonl", ".safetensors", ".bin")}
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _tree_fingerprint(path: Path) -> Any:
    """:func:`_fingerprint`, but a question folder (MME's: subtask folders of ``.txt`` question files)
    by every text file under it, as one digest of their paths, sizes and modification times."""
    if not path.is_dir():
        return _fingerprint(path)
    listing = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".json", ".jsonl", ".tsv"))
    return {"files": len(listing), "sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}


def _settings(run: Run, model_dir: Path, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the run's result depends on: compared on resume."""
    spec = run.task
    return {
        "version": RESULT_VERSION,
        "model": str(model_dir.resolve()),
        "model_files": _fingerprint(model_dir),
        "task": spec.to_dict() | {"name": None},  # renaming a task changes no result
        "task_files": {"questions": _tree_fingerprint(spec.questions), "annotations": _fingerprint(spec.annotations)},
        "method": run.method,
        "keep": run.keep,
        **evaluation,
    }


def _differences(old: Any, new: Mapping[str, Any]) -> list[str]:
    if not isinstance(old, Mapping):
        return ["(no settings stored)"]
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _stored(path: Path) -> dict[str, Any] | None:
    """The run file's content, or None when it cannot be read as a run file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "result" in data else None


def _write_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def primary_score(kind: str, score: Mapping[str, Any] | None) -> tuple[str | None, float | None]:
    """``(metric name, value in percent)`` a table shows for one result's ``score``; ``(None, None)``
    when nothing was scored (answers only). POPE: the F1 averaged over categories, as LLaVA-1.5
    reports it; MME: the perception score (out of 2000, not a percentage)."""
    if not score:
        return None, None
    if kind == "pope":
        return "F1", score.get("f1_mean")
    if kind == "mme":
        return "perception", score.get("perception")
    for key in ("accuracy", "total", "score"):
        if isinstance(score.get(key), (int, float)):
            return score.get("metric", key) if key == "accuracy" else key, float(score[key])
    return None, None


def _binomial_se(value: float | None, n: int | None, metric: str | None) -> float | None:
    """Standard error in points of an accuracy over ``n`` questions, ``sqrt(p (1 - p) / n)``: exact
    for right / wrong answers, an upper bound for VQA's soft per-question scores in [0, 1] (their
    variance is at most ``p (1 - p)``); None for other metrics (F1, MME's scores)."""
    if value is None or not n or metric not in ("exact", "accuracy", "vqa", "textvqa") or not 0 <= value <= 100:
        return None
    p = value / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def _cross_tokens_are_zero(model: Any) -> bool:
    """True when no trained cross token is present (every ``crossget_cross_tokens`` parameter zero)."""
    return all(not p.detach().abs().sum() for n, p in model.named_parameters() if CROSS_PARAM in n)


def compare(
    model_dir: str | os.PathLike,
    tasks: Sequence[TaskSpec],
    methods: Sequence[str] | str = "all",
    keeps: Sequence[int] | str = (64, 128, 192),
    out: str | os.PathLike = "runs/compare",
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    limit: int | None = None,
    pad_square: bool | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    answers: bool = True,
    on_change: str = "rerun",
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the stock model and every method at every budget on every task; write the summary.

    Args:
        model_dir: a local folder of any family :func:`~crossget.tools.eval.llava.load_llava` loads
            (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL).
        tasks: :class:`TaskSpec` s (:func:`llava_layout_tasks`, :func:`parse_task`), distinct names.
        methods: ``"all"`` or names (:func:`parse_methods`); the stock model always runs.
        keeps: visual tokens per image (:func:`parse_keeps`).
        out: run files under ``OUT/runs/``, the summary (``results.json/.md``, ``tradeoff.png``) in ``OUT``.
        answers: also keep LLaVA's answers JSONL beside each run file.
        on_change: a stored run with other settings is ``"rerun"`` or makes the call ``"refuse"``.
        log: one plain line per finished or skipped run (default ``tqdm.write``).

    Returns the summary (``results.json``'s content).

    Raises:
        ValueError: no tasks, repeated task names, unknown methods, bad budgets (a budget above
            the model's visual tokens per image), or stored runs with other settings under
            ``on_change="refuse"`` (each file and setting named).
    """
    model_dir, out = Path(model_dir), Path(out)
    if not tasks:
        raise ValueError("no tasks: give LLaVA eval tasks (--data ROOT --tasks gqa,...) or --task NAME=KIND:...")
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task names must differ; repeated: {', '.join(repeated)}")
    if on_change not in ("rerun", "refuse"):
        raise ValueError(f"on_change must be 'rerun' or 'refuse', got {on_change!r}")
    family = folder_family(model_dir)
    methods = parse_methods(methods, family)
    keeps = parse_keeps(keeps)
    stock = _stock_tokens(model_dir, family)
    if stock is not None and keeps[-1] > stock:
        raise ValueError(f"budget {keeps[-1]} is above the {stock} visual tokens per image of {model_dir}")
    log = log or tqdm.write
    evaluation = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "limit": limit,
                  "pad_square": pad_square, "device": device, "dtype": dtype}
    runs = [Run(t, "none", None) for t in tasks] + [Run(t, m, k) for m in methods for k in keeps for t in tasks]

    todo, changed = [], []
    for run in runs:
        path, settings = run_path(out, run), _settings(run, model_dir, evaluation)
        stored = _stored(path) if path.exists() else None
        if stored is not None and stored.get("settings") == settings:
            continue
        if path.exists():
            changed.append((run, path, _differences(None if stored is None else stored.get("settings"), settings)))
        todo.append(run)
    if changed and on_change == "refuse":
        listed = "\n".join(f"  {path}: {'; '.join(diff)}" for _, path, diff in changed)
        raise ValueError("stored runs have other settings (recompute them with on_change='rerun', "
                         f"or write to another folder):\n{listed}")
    for _, path, diff in changed:
        log(f"{path}: settings changed ({'; '.join(diff)}): recomputing")

    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="compare", unit="run", disable=not progress)
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} of {len(runs)} runs already in {out / 'runs'}: skipped")
    model = processor = None
    try:
        for run in todo:
            if model is None:
                model, processor = load_llava(model_dir, device, dtype)
            row = _evaluate(run, model, processor, out, evaluation, answers, progress)
            _write_atomic(run_path(out, run), {"settings": _settings(run, model_dir, evaluation), "result": row,
                                               "meta": dict(meta or {})})
            bar.update(1)
            metric, value = primary_score(run.task.kind, row["score"])
            log(f"{METHOD_LABELS.get(run.method, run.method)} keep={run.keep or 'all'} task={run.task.name}: "
                + (f"{metric} {value:.2f}" if value is not None else "not scored")
                + f", prefill {row['gflops_prefill']:.3f} GFLOPs, {row['samples_per_s']:.2f} questions/s")
    finally:
        bar.close()
        if model is not None:
            patch_llava(model, processor, "none")
    results = summarize(out, runs, stock, meta)
    write_benchmark(results, out, compare_markdown, plot_compare)
    return results


def _evaluate(run: Run, model: Any, stock_processor: Any, out: Path, evaluation: Mapping[str, Any],
              answers: bool, progress: bool) -> dict[str, Any]:
    """The harness's result row for one run (model patched for it), answers renamed into place."""
    processor = patch_llava(model, stock_processor, run.method, keep=run.keep)  # "none": the stock count again
    spec, path = run.task, run_path(out, run)
    final = path.with_suffix(".answers.jsonl") if answers else None
    tmp = None if final is None else final.with_name(f".{final.name}.{os.getpid()}.tmp")
    start = time.perf_counter()
    try:
        row = evaluate_llava(
            spec.kind, model, processor, spec.questions, spec.images, spec.annotations,
            batch_size=evaluation["batch_size"], max_new_tokens=evaluation["max_new_tokens"],
            limit=evaluation["limit"], pad_square=evaluation["pad_square"], answers_path=tmp,
            model_id=model_id(out, run), progress=progress, **dict(spec.options),
        )
    except BaseException:  # interrupted too: no stray answers file
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        os.replace(tmp, final)
        row["answers"] = str(final)
    row |= {"method": run.method, "keep": run.keep, "wall_seconds": time.perf_counter() - start,
            "patch": config(model).to_dict() if is_patched(model) else None,
            "cross_tokens": ("zero (training-free)" if _cross_tokens_are_zero(model) else "trained")
            if run.method == "crossget" else None}
    return row


def model_id(out: Path, run: Run) -> str:
    """The ``model_id`` of the answers file: the output folder and the run."""
    return f"{out.name}/{run.label}"


# --------------------------------------------------------------------------- summary
def summarize(out: Path, runs: Sequence[Run], stock_tokens: int | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary of the run files: per method x budget row, per task the score, its share of
    stock, GFLOPs (prefill and whole answer) with ratios to stock, questions/s."""
    import torch

    stored = {(r.task.name, r.method, r.keep): _stored(run_path(out, r))["result"] for r in runs}
    tasks = list(dict.fromkeys(r.task.name for r in runs))
    kinds = {r.task.name: r.task.kind for r in runs}
    rows = []
    for method, keep in dict.fromkeys((r.method, r.keep) for r in runs):
        cells = {}
        for t in tasks:
            res, base = stored[(t, method, keep)], stored[(t, "none", None)]
            metric, value = primary_score(kinds[t], res["score"])
            _, base_value = primary_score(kinds[t], base["score"])
            # the questions scored (circular MMBench asks each in every rotation, scores it once)
            n = (res["score"] or {}).get("n", res.get("n"))
            cells[t] = {
                "metric": metric, "score": value, "se": _binomial_se(value, n, metric), "n": n,
                "share": None if value is None or not base_value else 100 * value / base_value,
                "gflops_prefill": res["gflops_prefill"], "prefill_ratio": res["gflops_prefill"] / base["gflops_prefill"],
                "gflops": res["gflops"], "gflops_ratio": res["gflops"] / base["gflops"],
                "samples_per_s": res["samples_per_s"], "visual_tokens": res["visual_tokens"],
                "cross_tokens": res.get("cross_tokens"),
            }
        rows.append({"method": method, "label": METHOD_LABELS.get(method, method), "keep": keep, "tasks": cells})
    return {
        "meta": {**dict(meta or {}), "stock_visual_tokens": stock_tokens, "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "tasks": {r.task.name: r.task.to_dict() for r in runs if r.method == "none"},
        "rows": rows,
        "runs": {f"{t}/{m if k is None else f'{m}-{k}'}": res for (t, m, k), res in stored.items()},
    }


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def compare_markdown(results: Mapping[str, Any]) -> str:
    """The table: rows method x budget; per task score (± binomial SE where it applies), % of
    stock, prefill GFLOPs, their ratio to stock, questions/s."""
    tasks, rows, meta = results["tasks"], results["rows"], results["meta"]
    head = ["method", "keep"]
    for t in tasks:
        metric = next((r["tasks"][t]["metric"] for r in rows if r["tasks"][t]["metric"]), "score")
        head += [f"{t} {metric}", "% of stock", "prefill GFLOPs", "ratio", "q/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * 5 * len(tasks)]
    for r in rows:
        cells = [r["label"], "all" if r["keep"] is None else str(r["keep"])]
        for t in tasks:
            c = r["tasks"][t]
            score = _num(c["score"], ".1f") + (f" ± {c['se']:.1f}" if c["se"] is not None else "")
            cells += [score, _num(c["share"], ".1f"), f"{c['gflops_prefill']:.3g}", f"{c['prefill_ratio']:.3f}",
                      f"{c['samples_per_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stock = meta["stock_visual_tokens"] or "as the image size gives"
    sizes = ", ".join(f"{t} {next(iter(r['tasks'][t]['n'] for r in rows))} questions" for t in tasks)
    notes = [
        "",
        f"keep: visual tokens per image for the language model (stock: {stock}); FastV and "
        "DART keep every placeholder in the prompt and prune inside the LM, so their prefill still holds them "
        "up to layer K. GFLOPs per question, counted with torch.utils.flop_counter on the first batch (the "
        "prompt's forward, vision tower included); ratio: to the stock model's on the same task. q/s: questions "
        "per second over the timed batches.",
        f"± is the binomial standard error of an accuracy over the questions asked ({sizes}; for VQA's soft "
        "accuracy an upper bound); a difference between two rows below about twice that is within noise.",
        "CrossGET (training-free): method crossget with its cross-token parameters at their zero start "
        "(nothing trained for it); every method in this table is training-free.",
    ]
    if meta.get("command"):
        notes.append(f"Command: `{meta['command']}`; {meta.get('date', '')}, torch {meta.get('torch', '')}.")
    return "\n".join(lines + notes) + "\n"


def plot_compare(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Score against prefill GFLOPs: one panel per scored task, one line per method over its
    budgets, the stock model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    tasks = [t for t in results["tasks"] if any(r["tasks"][t]["score"] is not None for r in rows)] or list(
        results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        metric = next((r["tasks"][t]["metric"] for r in rows if r["tasks"][t]["metric"]), "score")
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["tasks"][t]["gflops_prefill"], r["tasks"][t]["score"]) for r in rows
                         if r["method"] == method and r["tasks"][t]["score"] is not None)
            if not pts:
                continue
            label = METHOD_LABELS.get(method, method)
            if method == "none":
                ax.plot(*zip(*pts), "k*", markersize=14, label=label, zorder=3)
            else:
                ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xlabel="prefill GFLOPs per question", ylabel=metric, title=t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def describe_tasks(tasks: Sequence[TaskSpec]) -> str:
    """One line naming each task, its kind and question file."""
    return ", ".join(f"{t.name} ({t.kind}: {t.questions.name})" for t in tasks)
