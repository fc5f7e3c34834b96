"""What merging does to real pretrained features: every method and guidance variant at the
same FLOPs levels, on a vision tower over real images (``crossget eval features``).

One pass over the images per config gives, against the unreduced tower on the same images:

- **pooled fidelity**: mean cosine of the pooled embedding (``pooler_output``) to the unreduced one;
- **patch fidelity**: mean cosine of every input patch's output feature, read through the merge
  sources (the token that covers it), to the unreduced patch feature;
- **k-NN accuracy**: leave-one-out 10-nearest-neighbour classification of the images' labels
  (cosine on the pooled embedding, majority vote, ties to the nearest);
- **10-NN retention**: how many of each image's 10 nearest neighbours under the unreduced tower
  are still among its 10 nearest under the reduced one (both sides reduced);
- with a ``VisionTextDualEncoderModel`` whose vision tower this is: image-text retrieval
  Recall@1/5/10 both ways (captions encoded once, unreduced: only the vision tower is reduced).

Every metric is also computed on two disjoint halves of the images (even / odd index), each a
complete evaluation of its own: the difference between the halves is the run-to-run spread the
comparisons are read against. FLOPs are counted by :func:`crossget.flops.count_flops` on one
image per config; a config is patched per batch (``crossget.io.apply``), so the methods run
interleaved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from crossget.api import states
from crossget.flops import count_flops
from crossget.io import apply
from crossget.tools.calibration import calibrated_settings
from crossget.tools.common import save_figure, write_json
from crossget.tools.data.karpathy import load_karpathy
from crossget.tools.eval.retrieval import retrieval_metrics

LEVELS = (0.8, 0.7, 0.58, 0.5, 0.4)
# name -> patch settings; "unreduced" is always evaluated first
VARIANTS: dict[str, dict[str, Any]] = {
    "tome": {"method": "tome"},
    "unguided": {"method": "crossget", "importance": "none"},
    "reference": {"method": "crossget", "guidance": "reference"},
    "scaled-0.1": {"method": "crossget", "guidance": "scaled", "guidance_scale": 0.1},
    "scaled-0.3": {"method": "crossget", "guidance": "scaled", "guidance_scale": 0.3},
    "standardised-0.25": {"method": "crossget", "guidance": "standardised", "guidance_scale": 0.25},
    "standardised-0.5": {"method": "crossget", "guidance": "standardised", "guidance_scale": 0.5},
    "rank-0.25": {"method": "crossget", "guidance": "rank", "guidance_scale": 0.25},
    "ensemble": {"method": "crossget", "guidance": "ensemble"},
    "attention": {"method": "crossget", "importance": "attention", "guidance": "reference"},
    "attention-standardised-0.25": {"method": "crossget", "importance": "attention", "guidance": "standardised",
                                    "guidance_scale": 0.25},
}
K = 10


@dataclass
class FeatureSet:
    """The images of a split with labels (and, with a dual encoder, its captions)."""

    paths: list[Path]
    labels: torch.Tensor  # [I] long
    txt2img: torch.Tensor | None = None  # [T]
    img2txts: list[list[int]] | None = None
    captions: list[str] | None = None


def load_feature_set(data: str | os.PathLike, classes: str | os.PathLike, split: str = "test",
                     limit: int | None = None, skip: int = 0) -> FeatureSet:
    """A Karpathy ``split`` of ``data`` (``limit`` images after the first ``skip``) with each
    image's label from the classification file ``classes`` (``crossget data-real`` writes both;
    images are matched by path).

    Raises:
        ValueError: an image of the split has no label.
    """
    from crossget.tools.data.real_images import load_classification

    pairs = load_karpathy(data, split=split, captions_per_image=None, limit=limit, skip=skip)
    paths, labels, _ = load_classification(classes)
    label_of = {Path(p).resolve(): lab for p, lab in zip(paths, labels)}
    missing = [p for p in pairs.image_paths if Path(p).resolve() not in label_of]
    if missing:
        raise ValueError(f"{len(missing)} images of {data} have no label in {classes}, e.g. {missing[0]}")
    return FeatureSet(list(pairs.image_paths), torch.tensor([label_of[Path(p).resolve()] for p in pairs.image_paths]),
                      pairs.txt2img, pairs.img2txts, pairs.captions)


# ------------------------------------------------------------------------------ metrics (pure)
def knn_accuracy(emb: torch.Tensor, labels: torch.Tensor, k: int = K) -> float:
    """Leave-one-out k-NN accuracy (%) of ``labels`` ``[I]`` from embeddings ``[I, D]`` (cosine,
    majority vote; a tied vote goes to the label of the nearest tied neighbour)."""
    e = nn.functional.normalize(emb.float(), dim=-1)
    sim = (e @ e.T).fill_diagonal_(-torch.inf)
    nn_idx = sim.topk(min(k, len(e) - 1), dim=-1).indices  # [I, k], nearest first
    votes = labels[nn_idx]
    n_labels = int(labels.max()) + 1
    counts = torch.zeros(len(labels), n_labels).scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float))
    best = counts.max(-1, keepdim=True).values
    tied = counts.gather(1, votes) == best  # [I, k]: neighbour's label has the top count
    pred = votes.gather(1, tied.float().argmax(-1, keepdim=True)).squeeze(1)
    return float((pred == labels).float().mean() * 100)


def neighbours(emb: torch.Tensor, k: int = K) -> torch.Tensor:
    """``[I, k]`` indices of each image's ``k`` nearest other images (cosine)."""
    e = nn.functional.normalize(emb.float(), dim=-1)
    return (e @ e.T).fill_diagonal_(-torch.inf).topk(min(k, len(e) - 1), dim=-1).indices


def retention(emb: torch.Tensor, ref: torch.Tensor, k: int = K) -> float:
    """Mean share of each image's ``k`` nearest neighbours under ``ref`` kept under ``emb``."""
    a, b = neighbours(emb, k), neighbours(ref, k)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(-1).sum(-1).float()
    return float((shared / a.shape[1]).mean())


def metrics_of(out: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], fs: FeatureSet,
               rows: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, float]:
    """Every metric on the images ``rows`` ``[I']`` of the set (kNN and retrieval within them)."""
    pooled, ref_pooled = out["pooled"][rows], ref["pooled"][rows]
    cos = nn.functional.cosine_similarity(pooled, ref_pooled, dim=-1)
    m = {
        "pooled_fidelity": float(cos.mean()),
        "pooled_fidelity_se": float(cos.std() / len(cos) ** 0.5),
        "patch_fidelity": float(out["patch"][rows].mean()),
        "knn_acc": knn_accuracy(pooled, fs.labels[rows]),
        "nn10_retention": retention(pooled, ref_pooled),
    }
    if text_emb is not None and "image" in out:
        keep = {int(i): j for j, i in enumerate(rows.tolist())}
        texts = [t for t, i in enumerate(fs.txt2img.tolist()) if i in keep]
        txt2img = torch.tensor([keep[int(fs.txt2img[t])] for t in texts])
        img2txts = [[] for _ in rows]
        for j in range(len(texts)):
            img2txts[int(txt2img[j])].append(j)
        sim = out["image"][rows] @ text_emb[texts].T
        r = retrieval_metrics(sim, txt2img, img2txts)
        m |= {k: r[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1")}
    return m


# ------------------------------------------------------------------------------ the sweep
def _vision(model: nn.Module) -> nn.Module:
    return model.vision_model if hasattr(model, "vision_model") else model


@torch.no_grad()
def _encode(model: nn.Module, pixels: torch.Tensor, ref_patch: torch.Tensor | None, reduced: bool
            ) -> dict[str, torch.Tensor]:
    """Pooled ``[B, C]``, per-image patch fidelity ``[B]`` (patches read through the sources) and,
    for a dual encoder, the normalised projected image embedding ``[B, P]``."""
    vision = _vision(model)
    out = vision(pixel_values=pixels)
    hidden = out.last_hidden_state  # [B, N_out, C]
    if reduced:
        token_map = states(vision)["vision"].token_map  # [B, N0]: output token covering each input token
        per_input = hidden.gather(1, token_map.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    else:
        per_input = hidden
    res = {"pooled": out.pooler_output, "hidden": per_input}
    if ref_patch is not None:
        res["patch"] = nn.functional.cosine_similarity(per_input[:, 1:], ref_patch[:, 1:], dim=-1).mean(-1)
    if vision is not model:
        res["image"] = nn.functional.normalize(model.visual_projection(out.pooler_output), dim=-1)
    return res


def feature_sweep(
    model: nn.Module, processor: Any, fs: FeatureSet, *, levels: Sequence[float] = LEVELS,
    variants: Sequence[str] = tuple(VARIANTS), tokenizer: Any = None, image_size: int = 224, batch_size: int = 32,
    calibrated: Sequence[str] = (), calibration: Sequence[Path] = (), calibration_evals: int = 24,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every variant at every FLOPs level over ``fs`` (see the module docstring).

    ``model``: a vision tower (``Dinov2Model``, ``ViTModel``, ...) or a
    ``VisionTextDualEncoderModel`` (then ``tokenizer`` encodes the captions for retrieval).
    ``calibrated``: variants also run with a schedule calibrated per level
    (:func:`crossget.calibrate`, ``calibration_evals`` evaluations) on the ``calibration``
    images, named ``<variant>+calibrated``. Returns ``{"meta", "results": [row, ...]}``; each
    row has ``name``, ``variant``, ``level``, ``settings``, ``gflops``, ``gflops_ratio``, the
    metrics on all images and on each half (``half_a``, ``half_b``).
    """
    unknown = sorted((set(variants) | set(calibrated)) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if calibrated and not calibration:
        raise ValueError("calibrated variants need calibration images")
    t0 = time.perf_counter()
    model.eval()
    vision = _vision(model)
    text_emb = None
    if vision is not model and tokenizer is not None and fs.captions is not None:
        with torch.no_grad():
            chunks = []
            for i in range(0, len(fs.captions), 256):
                enc = tokenizer(fs.captions[i:i + 256], padding=True, truncation=True, max_length=64,
                                return_tensors="pt")
                # what crossget train-dual trained the projection on
                pooled = model.text_model(**enc).pooler_output
                chunks.append(nn.functional.normalize(model.text_projection(pooled), dim=-1))
            text_emb = torch.cat(chunks)
    configs = [("unreduced", None, None)] + [(v, lvl, {**VARIANTS[v], "flops": lvl, "image_size": image_size,
                                                      "trace_sources": True})
                                             for lvl in levels for v in variants]
    if calibrated:
        cal = processor(images=[Image.open(p).convert("RGB") for p in calibration], return_tensors="pt")["pixel_values"]
        for lvl in tqdm(levels, desc="calibrating", disable=not progress, mininterval=10):
            configs += [(f"{v}+calibrated", lvl, {**calibrated_settings(vision, cal, lvl, VARIANTS[v], calibration_evals,
                                                                   image_size=image_size), "trace_sources": True})
                        for v in calibrated]
    store: dict[str, dict[str, list[torch.Tensor]]] = {name_of(v, lvl): {} for v, lvl, _ in configs}
    bar = tqdm(total=len(fs.paths) * len(configs), desc="feature sweep", unit="img", disable=not progress,
               mininterval=10)
    for start in range(0, len(fs.paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in fs.paths[start:start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        ref_hidden = None
        for v, lvl, settings in configs:
            apply(vision, settings)
            res = _encode(model, pixels, ref_hidden, settings is not None)
            if settings is None:
                ref_hidden = res["hidden"]
                res["patch"] = torch.ones(len(pixels))
            for key, val in res.items():
                if key != "hidden":
                    store[name_of(v, lvl)].setdefault(key, []).append(val)
            bar.update(len(pixels))
    bar.close()
    apply(vision, None)
    outs = {name: {k: torch.cat(vs) for k, vs in d.items()} for name, d in store.items()}
    ref = outs["unreduced"]
    n = len(fs.paths)
    halves = {"all": torch.arange(n), "half_a": torch.arange(0, n, 2), "half_b": torch.arange(1, n, 2)}
    one = processor(images=[Image.open(fs.paths[0]).convert("RGB")], return_tensors="pt")["pixel_values"]
    rows, ref_gflops = [], None
    for v, lvl, settings in configs:
        apply(vision, settings)
        with torch.inference_mode():
            gflops = count_flops(vision, pixel_values=one) / 1e9
        ref_gflops = ref_gflops or gflops
        name = name_of(v, lvl)
        row = {"name": name, "variant": v, "level": lvl, "settings": settings, "gflops": gflops,
               "gflops_ratio": gflops / ref_gflops}
        for part, idx in halves.items():
            m = metrics_of(outs[name], ref, fs, idx, text_emb)
            if part == "all":
                row |= m
            else:
                row[part] = m
        rows.append(row)
    apply(vision, None)
    meta = {"images": n, "image_size": image_size, "levels": list(levels),
            "variants": list(variants) + [f"{v}+calibrated" for v in calibrated],
            "calibration_images": len(calibration), "calibration_evals": calibration_evals,
            "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t0, "retrieval": text_emb is not None}
    return {"meta": meta, "results": rows}


def name_of(variant: str, level: float | None) -> str:
    return variant if level is None else f"{variant} flops={level:g}"


# ------------------------------------------------------------------------------ outputs
METRIC_COLUMNS = (("pooled_fidelity", "pooled fid.", 4), ("patch_fidelity", "patch fid.", 4),
                  ("knn_acc", "10-NN acc. %", 1), ("nn10_retention", "10-NN kept", 3))
RETRIEVAL_COLUMNS = (("i2t_r1", "i2t R@1", 1), ("i2t_r5", "i2t R@5", 1), ("i2t_r10", "i2t R@10", 1),
                     ("t2i_r1", "t2i R@1", 1), ("t2i_r5", "t2i R@5", 1), ("t2i_r10", "t2i R@10", 1))


def sweep_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per config, the metrics on all images, then the halves' retention."""
    rows = result["results"]
    cols = list(METRIC_COLUMNS) + (list(RETRIEVAL_COLUMNS) if result["meta"].get("retrieval") else [])
    head = "| config | GFLOPs ratio | " + " | ".join(c[1] for c in cols) + " | 10-NN kept (half A / B) |\n"
    head += "|---|" + "---:|" * (len(cols) + 2) + "\n"
    body = ""
    for r in rows:
        vals = " | ".join(f"{r[k]:.{d}f}" for k, _, d in cols)
        body += (f"| {r['name']} | {r['gflops_ratio']:.3f} | {vals} | "
                 f"{r['half_a']['nn10_retention']:.3f} / {r['half_b']['nn10_retention']:.3f} |\n")
    return head + body


def difference_table(result: Mapping[str, Any], metric: str = "nn10_retention", baseline: str = "tome",
                     scale: float = 100.0) -> str:
    """Markdown: every variant minus ``baseline`` on ``metric`` (x ``scale``) at every level, on all
    images and on each half (``all (A / B)``): the halves' disagreement is the spread a difference
    is read against."""
    rows = result["results"]
    levels = result["meta"]["levels"]
    at = {(r["variant"], r["level"]): r for r in rows}
    head = f"| {metric} minus {baseline} (x{scale:g}) | " + " | ".join(f"{lvl:g}" for lvl in levels) + " |\n"
    head += "|---|" + "---:|" * len(levels) + "\n"
    body = ""
    for v in result["meta"]["variants"]:
        if v == baseline:
            continue
        cells = []
        for lvl in levels:
            r, b = at[(v, lvl)], at[(baseline, lvl)]
            d = [scale * (x[metric] - y[metric]) for x, y in ((r, b), (r["half_a"], b["half_a"]), (r["half_b"], b["half_b"]))]
            cells.append(f"{d[0]:+.1f} ({d[1]:+.1f} / {d[2]:+.1f})")
        body += f"| {v} | " + " | ".join(cells) + " |\n"
    return head + body


def plot_features(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Pooled fidelity, 10-NN retention, k-NN accuracy (and mean R@1) against the GFLOPs ratio,
    one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    panels = [("pooled_fidelity", "pooled fidelity"), ("nn10_retention", "10-NN retention"),
              ("knn_acc", "10-NN accuracy (%)")]
    if result["meta"].get("retrieval"):
        panels.append(("mean_r1", "mean Recall@1 (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for v in result["meta"]["variants"]:
            rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["gflops_ratio"])
            bold = v in ("tome", "reference", "unguided")
            ax.plot([r["gflops_ratio"] for r in rs], [r[key] for r in rs], marker="o", label=v,
                    linewidth=2 if bold else 1, alpha=1 if bold else 0.7)
        ref = next(r for r in rows if r["variant"] == "unreduced")
        ax.axhline(ref[key], color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("GFLOPs ratio")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def write_sweep(result: Mapping[str, Any], out_dir: str | os.PathLike, stem: str = "features") -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = write_json(out / f"{stem}.json", result)
    md = out / f"{stem}.md"
    keys = ["pooled_fidelity", "nn10_retention", "knn_acc"] + (["mean_r1"] if result["meta"].get("retrieval") else [])
    scales = {"pooled_fidelity": 1000.0, "nn10_retention": 100.0, "knn_acc": 1.0, "mean_r1": 1.0}
    md.write_text(sweep_table(result) + "".join("\n" + difference_table(result, k, scale=scales[k]) for k in keys))
    return [js, md, plot_features(result, out / f"{stem}.png")]


__all__ = ["LEVELS", "VARIANTS", "FeatureSet", "difference_table", "feature_sweep", "knn_accuracy", "load_feature_set",
           "metrics_of",
           "plot_features", "retention", "sweep_table", "write_sweep"]
