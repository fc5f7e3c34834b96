"""Peak memory of tensors allocated inside a block, on any device (CPU included)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storages that ops create inside the ``with`` block.

    A storage counts from the op that returns it until its last tensor dies (a
    ``weakref.finalize`` on the storage). Storages that existed before (parameters,
    inputs, and views of them) never count, so for a forward this is the peak
    activation memory. Scratch memory inside one kernel is not visible.

        with torch.inference_mode(), PeakMemory() as mem:
            model(**inputs)
        mem.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted (0: from outside)

    def _forget(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)

    def _see(self, tensor: torch.Tensor, counted: bool) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            if counted and self._sizes[key] and storage.nbytes() > self._sizes[key]:  # resized in place
                self.live_bytes += storage.nbytes() - self._sizes[key]
                self._sizes[key] = storage.nbytes()
            return
        size = storage.nbytes() if counted else 0
        self._sizes[key] = size
        self.live_bytes += size
        weakref.finalize(storage, self._forget, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self._sizes:
                self._see(t, counted=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, counted=True)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20
