"""Helpers every tool shares: reading and writing JSON with errors that name the file,
device synchronisation and a clock for model time, the model's device and dtype, a
benchmark's output files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parsed JSON of ``path``.

    Raises:
        FileNotFoundError: no such file (names the path and what it should be).
        ValueError: not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid {what}: invalid JSON ({err})") from None


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (parent folders made; paths and other values JSON
    lacks as strings); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def sync(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that a wall clock measures it (no-op elsewhere)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class ModelClock:
    """Wall time spent inside ``with clock:`` blocks (the model calls, not file reading or metrics);
    synchronises CUDA so GPU time is counted where it is spent."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> ModelClock:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0

    def __call__(self, *_args) -> ModelClock:
        """The clock itself: a :attr:`crossget.state.TowerState.match_observer`."""
        return self

    def rate(self, count: int) -> float:
        """``count`` per second of model time (0 if nothing was timed)."""
        return count / self.seconds if self.seconds > 0 else 0.0


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_benchmark(results: dict, out_dir: str | os.PathLike, markdown: Callable[[dict], str],
                    plot: Callable[[dict, str], None]) -> None:
    """A benchmark's three outputs in ``out_dir``: ``results.json``, ``results.md``
    (``markdown(results)``) and ``tradeoff.png`` (``plot(results, path)``)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(out_dir, "tradeoff.png"))
