"""Retrieval evaluation of merging configs side by side: accuracy, fidelity, GFLOPs, speed.

One run encodes the split with the unreduced model first (the reference for GFLOPs
ratios, fidelity and speedups), then with every config, each patched in turn. On generated
data the rows also carry hard-negative twin accuracy (which detail each method keeps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.api import config, unpatch
from crossget.flops import count_flops
from crossget.io import apply
from crossget.tools.data.karpathy import RetrievalSplit
from crossget.tools.default import load_retrieval
from crossget.tools.eval.retrieval import encode, fidelity, retrieval_metrics, twin_accuracy

RESULT_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1",
    "gflops", "gflops_ratio", "images_per_s", "speedup", "fidelity",
)


def apply_config(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Patch ``model`` for one evaluation config: ``method`` (none | tome | crossget), ``r`` or
    ``flops``, optional ``towers``, ``importance``, ``guidance``, ``guidance_scale`` and
    ``cross_tokens`` (a trained safetensors file: theta is one vector per layer, so it fits any
    schedule)."""
    keys = ("method", "r", "flops", "towers", "importance", "guidance", "guidance_scale")
    settings = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    apply(model, settings, cross_tokens=cfg.get("cross_tokens") or None)


def pair_gflops(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> float:
    """GFLOPs of encoding one image and one caption (as padded for the evaluation)."""
    with torch.inference_mode():
        img = count_flops(model.get_image_features, pixel_values=inputs["pixel_values"][:1])
        txt = count_flops(
            model.get_text_features, input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1]
        )
    return (img + txt) / 1e9


def evaluate_configs(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    split: RetrievalSplit,
    configs: Sequence[Mapping[str, Any]],
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One result row per config (the unreduced model first, added if missing); ``inputs`` are
    ``split`` preprocessed."""
    configs = list(configs)
    if not configs or configs[0]["method"] != "none":
        configs.insert(0, {"name": "unreduced", "method": "none"})
    rows, ref = [], None
    for cfg in configs:
        apply_config(model, cfg)
        emb = encode(model, inputs, batch_size, progress)
        sim = emb["image"] @ emb["text"].T
        metrics = retrieval_metrics(sim, split.txt2img, split.img2txts) | twin_accuracy(sim, split)
        gflops = pair_gflops(model, inputs)
        ips = inputs["pixel_values"].shape[0] / emb["image_seconds"]
        if ref is None:
            ref = {"emb": emb, "gflops": gflops, "ips": ips}
        row = {
            "name": cfg.get("name") or _name(cfg),
            "variant": cfg.get("variant"),
            "method": cfg["method"],
            "r": cfg.get("r"),
            "flops_target": cfg.get("flops"),
            "cross_tokens": cfg.get("cross_tokens"),
            "importance": cfg.get("importance"),
            "guidance": cfg.get("guidance"),
            "guidance_scale": cfg.get("guidance_scale"),
            **metrics,
            "gflops": gflops,
            "gflops_ratio": gflops / ref["gflops"],
            "images_per_s": ips,
            "speedup": ips / ref["ips"],
            "fidelity": (fidelity(emb["image"], ref["emb"]["image"]) + fidelity(emb["text"], ref["emb"]["text"])) / 2,
            "fidelity_image": fidelity(emb["image"], ref["emb"]["image"]),
            "schedule": config(model).to_dict()["r"] if cfg["method"] != "none" else {},
        }
        rows.append(row)
    unpatch(model)
    return rows


def _name(cfg: Mapping[str, Any]) -> str:
    if cfg["method"] == "none":
        return "unreduced"
    level = f"flops={cfg['flops']:g}" if cfg.get("flops") is not None else f"r={cfg.get('r')}"
    variant = " trained" if cfg.get("cross_tokens") else " unguided" if cfg.get("importance") == "none" else ""
    return f"{cfg['method']}{variant} {level}"


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of evaluation rows (with a hard-negative twin column when rows have one)."""
    twins = all("twin_mean" in r for r in rows)
    head = ("| config | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mean R@1 "
            + ("| twin acc. " if twins else "") + "| fidelity | GFLOPs/pair | GFLOPs ratio | images/s | speedup |\n|---|"
            + "---:|" * (12 + twins) + "\n")
    body = "".join(
        f"| {r['name']} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} | {r['t2i_r1']:.1f} "
        f"| {r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | {r['mean_r1']:.1f} "
        + (f"| {r['twin_mean']:.1f} " if twins else "")
        + f"| {r['fidelity']:.4f} | {r['gflops']:.3f} | {r['gflops_ratio']:.3f} | {r['images_per_s']:.1f} "
        f"| {r['speedup']:.2f}x |\n"
        for r in rows
    )
    return head + body


def write_results(rows: Sequence[Mapping[str, Any]], json_path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write rows (+ meta) as JSON and the markdown table next to it (``.md``)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": dict(meta), "results": list(rows)}, indent=2))
    path.with_suffix(".md").write_text(results_table(rows))
    return path


# --------------------------------------------------------------------------- one retrieval job
def evaluate_retrieval(
    model: str,
    data: str,
    configs: Sequence[Mapping[str, Any]],
    *,
    split: str = "test",
    limit: int | None = None,
    skip: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    json_path: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
    write_reference: bool = True,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Path | None]:
    """Load (:func:`load_retrieval`: ``limit`` images of ``split`` after the first ``skip``),
    evaluate ``configs`` against the unreduced model (:func:`evaluate_configs`) and, with
    ``json_path``, write the rows (all, or without the
    unreduced reference row unless ``write_reference``) with ``meta``. Returns the rows and the
    JSON path written (or None)."""
    job = load_retrieval(model, data, split, limit, device, skip=skip)
    if progress:
        print(f"{len(job.split)} {split} images, {len(job.split.captions)} captions, {torch.get_num_threads()} threads")
    rows = evaluate_configs(job.model, job.inputs, job.split, configs, batch_size, progress)
    if json_path is None:
        return rows, None
    written = rows if write_reference else rows[1:]
    return rows, write_results(written, json_path, meta or {})
