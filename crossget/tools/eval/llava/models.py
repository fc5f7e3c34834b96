"""The multimodal LLMs the ``llava-*`` harnesses evaluate: loading a local model folder, and
patching it for one method and budget through the generic ``crossget`` API.

Every family crossget reduces for a language model is evaluated the same way
(docs/protocol.md): LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL.

    from crossget.tools.eval.llava import load_mllm, patch_mllm
    model, processor = load_mllm("path/to/llava-onevision-qwen2-7b-ov-hf")
    processor = patch_mllm(model, processor, "tome", keep=128)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.api import adapt_processor
from crossget.config import PatchConfig
from crossget.families import llava, llava_next, llava_onevision, qwen3_vl, qwen_vl
from crossget.families.base import Family
from crossget.families.registry import family_of
from crossget.io import apply

__all__ = ["DTYPES", "MLLM_FAMILIES", "family_methods", "folder_family", "load_mllm", "patch_mllm"]

# the families whose visual tokens feed a language model, in the order errors list them
MLLM_FAMILIES: tuple[Family, ...] = (llava.FAMILY, llava_next.FAMILY, llava_onevision.FAMILY, qwen_vl.FAMILY,
                                     qwen3_vl.FAMILY)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def folder_family(path: str | Path) -> Family:
    """The family of the model in a local folder, from its ``config.json``'s ``model_type`` alone.

    Raises:
        FileNotFoundError: no ``config.json`` at ``path``.
        ValueError: ``config.json`` is not JSON.
        TypeError: a model type these evaluations do not support (the message lists those supported).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json, weights and the processor files)")
    try:
        kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path / 'config.json'} is not a JSON model config ({err})") from None
    by_type = {fam.classes[0].config_class.model_type: fam for fam in MLLM_FAMILIES}
    if kind not in by_type:
        supported = ", ".join(f"{t} ({f.classes[0].__name__})" for t, f in by_type.items())
        raise TypeError(f"{path} holds a {kind!r} model; these evaluations support model_type {supported}")
    return by_type[kind]


def family_methods(model: nn.Module) -> tuple[str, ...]:
    """The methods ``model``'s family runs (``crossget.families.registry``)."""
    return tuple(family_of(model).methods)


def _images_only(cls: type) -> type:
    """``cls`` (a processor with a video processor) built from its image processor and tokenizer
    only: transformers builds video processors with torchvision, which an image evaluation
    does not need. A subclass of the same name, so ``crossget.adapt_processor`` takes it."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin reads the sub-processors from this signature: the video one is left out
        cls.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} without its video processor."})


def _load_processor(path: Path, family: Family) -> Any:
    """The folder's processor; the family's class without its video processor when
    ``AutoProcessor`` cannot build it (torchvision missing, or a processor class it does not know)."""
    from transformers import AutoProcessor

    wanted = getattr(family, "processor_class", None)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, ValueError, TypeError, AttributeError) as err:
        if wanted is None:
            raise
        reason: Exception | None = err
    else:
        if wanted is None or isinstance(processor, wanted):
            return processor
        reason = None
    try:
        return _images_only(wanted).from_pretrained(path)
    except (OSError, ImportError, ValueError, TypeError, AttributeError) as err:
        raise OSError(f"cannot load a {wanted.__name__} from {path}: {err}") from reason


def load_mllm(path: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[nn.Module, Any]:
    """``(model with its LM head, processor)`` from a local folder, in eval mode.

    The class is the family's for the folder's ``config.json`` ``model_type`` (:func:`folder_family`).
    A processor with a video processor that cannot be built here (no torchvision) is loaded
    without it (images only). The processor comes adapted to the stock model
    (``crossget.adapt_processor``: its patch size and per-image counts are the model's).

    Raises:
        FileNotFoundError: no model folder (``config.json``) at ``path``.
        TypeError: the folder holds a model of a type these evaluations do not support (the
            message lists those supported).
        ValueError: unknown ``dtype``.
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    model = folder_family(path).classes[0].from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    processor = _load_processor(path, family_of(model))
    return model, adapt_processor(processor, model) or processor


def patch_mllm(
    model: nn.Module, processor: Any, method: str = "none", keep: int | None = None, r: int | None = None,
    flops: float | None = None, fastv_layer: int | None = None, site: str | None = None,
) -> Any:
    """Put ``model`` in the state of one method and budget (``crossget.apply``: from the stock
    model up) and return ``processor`` adapted to the visual-token count that now reaches the
    language model (``crossget.adapt_processor``; ``"none"``: the stock count again).

    ``fastv_layer``: FastV's / DART's ``K`` (default: the method's, 2). ``site``: where a family
    with several sites reduces (LLaVA-NeXT / OneVision: ``"tower"`` or ``"projector"``; default the family's).

    Raises:
        ValueError: a method the model's family does not run (names those it runs), a budget
            for ``"none"``, or no budget / several for a method.
    """
    methods = family_methods(model)
    if method not in methods:
        raise ValueError(f"method must be one of {methods} for {family_of(model).name}, got {method!r}")
    budget = {k: v for k, v in (("keep", keep), ("r", r), ("flops", flops)) if v is not None}
    if method == "none":
        if budget or fastv_layer is not None or site is not None:
            given = budget or {"fastv_layer": fastv_layer, "site": site}
            raise ValueError(f"method 'none' is the stock model and takes no budget, got {given}")
        apply(model, None)
    else:
        if len(budget) != 1:
            raise ValueError(f"give exactly one of keep, r or flops for method {method!r}, got {budget or 'none'}")
        extra = {k: v for k, v in (("fastv_layer", fastv_layer), ("site", site)) if v is not None}
        apply(model, PatchConfig(method=method, **budget, **extra))
    return adapt_processor(processor, model) or processor
