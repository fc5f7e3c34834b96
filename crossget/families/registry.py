"""Which family patches a model: the registry of :class:`~crossget.families.base.Family` instances."""

from __future__ import annotations

from torch import nn

from crossget.families import blip, blip2, clip, dual_encoder, llava, siglip, vit
from crossget.families.base import Family

# LLaVA first: a LlavaModel holds a CLIPVisionModel, which the CLIP family would also claim
FAMILIES: tuple[Family, ...] = (llava.FAMILY, clip.FAMILY, blip.FAMILY, blip2.FAMILY, vit.FAMILY, siglip.FAMILY,
                               dual_encoder.FAMILY)


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
