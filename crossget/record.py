"""The one attribute crossget sets on a module it patches, and the helpers that set and clear it.

Everything crossget puts on a module lives in :data:`ATTR`, a :class:`Record`: a patched
layer finds its tower state and index there, a swapped module its original class, a
patched model its config and family-level additions. Unpatching clears the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from crossget.config import PatchConfig

ATTR = "_crossget"  # the one attribute crossget sets on a module (a Record)


@dataclass(eq=False)
class Record:
    """What crossget put on one module; removed whole by unpatching."""

    state: Any = None  # tower, encoder, layers, attentions: the tower's crossget.state.TowerState
    layer: int | None = None  # layers and attentions: their index in the tower
    original_class: type | None = None  # modules whose class was swapped
    handles: list = field(default_factory=list)  # hooks to remove
    config: PatchConfig | None = None  # the patched model: what crossget.config reports
    glue: Any = None  # family-level additions (BLIP's bias hooks, LLaVA's LM state, ...)
    output: Any = None  # weak reference to the last output (BLIP vision towers)
    kept: dict | None = None  # the patched model: trained cross tokens of towers left unpatched, by kind

    def __getstate__(self) -> dict:
        # the last output is per forward (and a weak reference cannot be pickled)
        return {**vars(self), "output": None}


def record(module: nn.Module) -> Record | None:
    return module.__dict__.get(ATTR)


def mark(module: nn.Module, **fields: Any) -> Record:
    """The module's record (made if missing) with ``fields`` set."""
    rec = module.__dict__.setdefault(ATTR, Record())
    for k, v in fields.items():
        setattr(rec, k, v)
    return rec


TOWER_FIELDS = ("state", "layer", "original_class", "handles")


def unmark(module: nn.Module, fields: tuple[str, ...] = TOWER_FIELDS) -> None:
    """Clear ``fields`` of the module's record (removing its hooks, restoring a swapped
    class); the record goes when nothing is left in it."""
    rec = module.__dict__.get(ATTR)
    if rec is None:
        return
    if "handles" in fields:
        for h in rec.handles:
            h.remove()
    if "original_class" in fields and rec.original_class is not None:
        module.__class__ = rec.original_class
    blank = Record()
    for name in fields:
        setattr(rec, name, getattr(blank, name))
    if all(v is None or (isinstance(v, list) and not v) for v in vars(rec).values()):
        del module.__dict__[ATTR]


def swap_class(module: nn.Module, cls: type, **fields: Any) -> None:
    """Give ``module`` the patched subclass ``cls`` (restored by :func:`unmark`)."""
    mark(module, original_class=module.__class__, **fields)
    module.__class__ = cls
