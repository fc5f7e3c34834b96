"""The accuracy-versus-cost picture of a sweep (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crossget.tools.common import save_figure


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Mean Recall@1, fidelity and (generated data) twin accuracy against GFLOPs per image-caption
    pair, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: Mapping[str, Any]) -> str:
        if r["method"] == "none":
            return "unreduced"
        if r.get("variant") and not r.get("cross_tokens"):
            return r["variant"]
        if r["method"] == "tome":
            return "ToMe"
        if r.get("importance") == "none":
            return "complete graph, unguided"
        return "CrossGET (trained cross tokens)" if r.get("cross_tokens") else "CrossGET (training-free)"

    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(label(r), []).append(r)
    panels = [("mean_r1", "mean Recall@1 (%)"), ("fidelity", "fidelity (cosine to unreduced)")]
    if all("twin_mean" in r for r in rows):
        panels.append(("twin_mean", "hard-negative twin accuracy (%, chance 50)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["gflops"])
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if name == "unreduced" else {"marker": "o"}
            ax.plot([r["gflops"] for r in rs], [r[key] for r in rs], label=name, **style)
        ax.set_xlabel("GFLOPs per image-caption pair")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return save_figure(fig, path, dpi=120)
    return path
