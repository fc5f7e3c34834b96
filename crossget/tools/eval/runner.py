"""One runner for the BLIP evaluations (``caption``, ``vqa``, ``nlvr2``, ``itm_retrieval``).

    from crossget.tools.eval.caption import CAPTION
    result = run_task(CAPTION, "models/blip-image-captioning-base", "coco/captions_test.json",
                      image_root="coco/val2014", method="tome", r=8, json_path="out/caption.json", batch_size=16)

:func:`run_task` does what every evaluation shares: load the local model (the task's head), load
the task's data, measure the unreduced GFLOPs of one sample, patch for one method config
(:func:`~crossget.tools.eval.blip_common.apply_method`), evaluate, add the config and
``gflops_ratio``, and write the result JSON (:func:`write_results`). A task (:class:`BlipTask`)
only brings its data format, its GFLOPs unit, its scoring (model calls timed with
:class:`~crossget.tools.common.ModelClock`, progress bar) and the keys of its summary line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from crossget.tools.common import write_json
from crossget.tools.eval.blip_common import apply_method, load_blip


class BlipTask(Protocol):
    """One BLIP evaluation as :func:`run_task` drives it.

    Attributes:
        name: the result's ``"task"``.
        model_class: the BLIP head the model folder must hold (``BlipForQuestionAnswering``, ...).
        result_keys: the main numbers of a result, for a summary line.
        results_file: True when the per-item ``results`` go to their own file (an official results
            format) instead of into the result JSON.
    """

    name: str
    model_class: type
    result_keys: tuple[str, ...]
    results_file: bool

    def load(self, path: str | os.PathLike, image_root: str | os.PathLike | None, limit: int | None) -> Any:
        """The data of ``path`` (images under ``image_root``; the first ``limit`` items)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Fields of the result after ``task``, ``model`` and ``data``: what else was read (may be empty)."""
        ...

    def sample_gflops(self, model: nn.Module, processor: Any, data: Any, options: Mapping[str, Any]) -> float:
        """GFLOPs of one sample of ``data`` on ``model`` as it is (``options``: those of :meth:`evaluate`)."""
        ...

    def evaluate(self, model: nn.Module, processor: Any, data: Any, progress: bool,
                 options: Mapping[str, Any]) -> dict[str, Any]:
        """Score ``model`` on ``data``; the result has ``gflops`` (per sample, as :meth:`sample_gflops`)."""
        ...


def write_results(result: dict[str, Any], json_path: str | os.PathLike, results_file: bool) -> None:
    """Write ``result`` as JSON to ``json_path``. With ``results_file`` its ``results`` go to
    ``<stem>_results.json`` beside it instead, and ``result`` gains ``results_file`` (that path)."""
    json_path = Path(json_path)
    if not results_file:
        write_json(json_path, result)
        return
    results_path = json_path.with_name(f"{json_path.stem}_results.json")
    write_json(results_path, result["results"])
    result["results_file"] = str(results_path)
    write_json(json_path, {k: v for k, v in result.items() if k != "results"})


def run_task(
    task: BlipTask,
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
    method: str = "none",
    r: int | None = None,
    flops: float | None = None,
    towers: Sequence[str] | None = None,
    json_path: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate one method config of the local model ``model_dir`` on ``task``'s data file ``data``.

    The GFLOPs of the unreduced model are measured first (one sample), then the model is patched
    for ``method`` (``none``: stock; otherwise ``r`` tokens per layer or a ``flops`` target ratio,
    on ``towers``) and evaluated. ``options`` go to the task's :meth:`~BlipTask.evaluate`
    (``batch_size``, ...). With ``json_path`` the result is written (:func:`write_results`).

    Returns:
        ``task``, ``model``, ``data``, the task's :meth:`~BlipTask.describe` fields, its metrics, the
        config (``method``, ``r``, ``flops_target``, ``schedule``, ...), ``gflops_unreduced`` and
        ``gflops_ratio`` (``gflops / gflops_unreduced``).

    Raises:
        FileNotFoundError, TypeError: no model, or another head, at ``model_dir``.
        ValueError: unknown method, or a reducing method without ``r``/``flops``.
    """
    model, processor = load_blip(model_dir, task.model_class)
    model.to(device)
    loaded = task.load(data, image_root, limit)
    reference = task.sample_gflops(model, processor, loaded, options)  # before patching: the unreduced cost
    described = apply_method(model, method, r, flops, towers)
    result = task.evaluate(model, processor, loaded, progress, options)
    result.update(described)
    result["gflops_unreduced"] = reference
    result["gflops_ratio"] = result["gflops"] / reference if reference else None
    result = {"task": task.name, "model": str(model_dir), "data": str(data), **task.describe(), **result}
    if json_path is not None:
        write_results(result, json_path, task.results_file)
    return result
