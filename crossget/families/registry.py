"""Which family patches a model: the registry of :class:`~crossget.families.base.Family` instances."""

from __future__ import annotations

from torch import nn

from crossget.config import PatchConfig
from crossget.families import blip, blip2, clip, dual_encoder, llava, llava_next, llava_onevision, qwen3_vl, qwen_vl, siglip, vit
from crossget.families.base import Family
from crossget.record import mark, unmark

# LLaVA first: a LlavaModel holds a CLIPVisionModel, which the CLIP family would also claim
FAMILIES: tuple[Family, ...] = (llava.FAMILY, llava_next.FAMILY, llava_onevision.FAMILY, clip.FAMILY, blip.FAMILY,
                               blip2.FAMILY, vit.FAMILY, siglip.FAMILY, dual_encoder.FAMILY, qwen_vl.FAMILY,
                               qwen3_vl.FAMILY)


def family_of(model: nn.Module) -> Family:
    """The family that patches ``model``.

    Raises:
        TypeError: no family supports the model's class (the message lists those supported).
    """
    for fam in FAMILIES:
        if isinstance(model, fam.classes):
            return fam
    names = ", ".join(cls.__name__ for fam in FAMILIES for cls in fam.classes)
    raise TypeError(f"crossget cannot patch {type(model).__name__}; supported classes: {names}")


def install_config(model: nn.Module, cfg: PatchConfig) -> None:
    """Patch ``model`` as ``cfg`` says through its family and record the resolved config
    (what :func:`crossget.patch` and the calibration search both do)."""
    fam = family_of(model)
    cfg = cfg.with_guidance(fam.default_guidance)
    fam.check(cfg)
    mark(model, config=fam.patch(model, cfg))


def remove_patch(model: nn.Module) -> None:
    """The stock model again: the family's patch removed, every record of it dropped
    (a tower patched on its own inside the model too)."""
    family_of(model).unpatch(model)
    for module in model.modules():
        unmark(module, fields=("config", "kept"))
