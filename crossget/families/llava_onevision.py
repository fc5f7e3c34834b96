"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``): fewer
visual tokens per image for the language model.

OneVision runs a SigLIP tower (no CLS token) on a base image and, for an image alone in
its prompt, on the tiles of the grid chosen from ``image_grid_pinpoints`` for its size;
the projector maps every tile's patch features into the LM's width (Qwen2), and
``pack_image_features`` unpads the grid to the image's aspect ratio, downsamples it
(bilinear) when it holds more than about ``max`` tiles' worth of patches
(``vision_aspect_ratio="anyres_max_<max>"``: when ``sqrt(rows * cols / (max * side^2)) > 1.1``)
and appends ``image_newline`` to every row. In a multi-image prompt
(``batch_num_images[i] > 1``) every image gives its base tile only, plus one newline.
Image ``i`` then gives ``L_i`` features (:func:`stock_image_tokens`), written over ``L_i``
``<image>`` placeholders.

Two sites (``site=``; :func:`crossget.config` reports the one that runs), as for LLaVA-NeXT
(:mod:`crossget.families.llava_next`, with the same shared logic,
:class:`~crossget.families.tower_site.TowerSiteFamily`):

- **Projector site** (``site="projector"``, the default of ``tome`` / ``crossget`` /
  ``divprune``; budget ``keep`` visual tokens per image, or ``flops``, a ratio of the analytic
  prefill FLOPs of :func:`prefill_flops` for one image of ``image_size``, default the largest
  grid pinpoint): after packing, each image's ``L_i`` features are merged down to exactly
  ``keep`` (:func:`crossget.families.visual_site.reduce_visual_tokens`), whatever the image's
  size and whether it is alone in its prompt or not. No CLS: SigLIP's tokens are all patches,
  so nothing is anchored or protected, and there is no cross token: CrossGET's complete-graph
  matching runs unguided, its groups plain size-weighted averages (``importance="none"`` in
  the resolved config), as ToMe's do. Only the authors' guidance rule (``"reference"``) is
  accepted, which guides nothing here.
- **Tower site** (``site="tower"``, :mod:`crossget.families.tower_site`): ``tome`` /
  ``crossget`` merge inside the SigLIP layers up to the feature layer with the SigLIP family's
  patch (:mod:`crossget.families.siglip`: no protected token, the cross token starts as the
  mean patch, CrossGET's importance ``cos(q_cross, k_i)``, ``importance="cross"``), every
  tile alike: ``keep`` tokens per tile reach the projector (budgets: ``keep`` per tile, ``r``
  per tower layer, or ``flops`` solved into them). The tiles are laid out "flat" (concatenated,
  base tile first, in tile order, no ``image_newline``). An image alone in its prompt gives
  ``tiles x keep`` tokens, its tiles the base tile plus its pinpoint's whole grid: the
  anyres-max downsampling is a bilinear resize of the unpadded grid, which merged tokens no
  longer form, so it does not run, and ``keep`` per tile is the budget that bounds the count
  (a large ``keep`` on a large grid can give more tokens than the downsampled stock count).
  An image of a multi-image prompt is one tile: ``keep`` tokens. Video frames run the tower
  unmerged (their pooling needs the grid). When nothing merges (``r=0``), upstream's packing
  and counts run.
- ``fastv`` / ``dart``: inside the LM (``site`` None); the prompt keeps the stock ``L_i``
  placeholders; after LM layer ``K`` only ``keep`` visual tokens per image stay. One count per
  batch: every image of a batch must give the same ``L_i``; a batch that mixes counts raises
  a ``ValueError``.
- ``visionzip`` is refused (``ValueError``): its dominant tokens are the patches CLS attends
  to most, and SigLIP has no CLS. The mean attention a patch receives would be a substitute,
  but VisionZip's released code (``dvlab-research/VisionZip``) ships only the CLIP (CLS) rule,
  and a substitute would be crossget's method, not the authors'.

Videos (``pixel_values_videos``) are never reduced: their frames go through upstream's
``get_video_features`` (pooled, one newline) with the tower unmerged, and their
``<video>`` placeholders keep the stock count; FastV ranks image tokens only.

Prompts need :func:`image_tokens` ``(model, (h, w))`` placeholders per image (``keep`` when
reduced at the projector site, for every image; ``tiles x keep`` at the tower site, ``keep``
for an image of a multi-image prompt; the stock count otherwise: give
:data:`MULTI_IMAGE` as the size for an image of a multi-image prompt), which
:func:`adapt_processor` makes a ``LlavaOnevisionProcessor`` write; a mismatch raises a
``ValueError`` that says so. The patch swaps the ``LlavaOnevisionModel`` instance's class
to a subclass (:class:`LlavaOnevisionModel`, same name) overriding ``pack_image_features``
and ``get_placeholder_mask``; unpatching restores the class.

Upstream limits kept as they are: with ``vision_feature_select_strategy="default"`` (which
drops a SigLIP patch) an image alone in its prompt fails in upstream's packing; the
forward of ``LlavaOnevisionModel`` always packs with the config's ``vision_aspect_ratio``.

The module's functions (:func:`base_model`, :func:`site`, :func:`reference_size`,
:func:`image_tokens`, :func:`adapt_processor`, :func:`prefill_flops`) are those of
:data:`FAMILY` (:class:`~crossget.families.tower_site.TowerSiteFamily`): for OneVision
the processor's patches per tile, tile size and grid pinpoints are checked against the
model's and its feature strategy and ``vision_aspect_ratio`` set as the model's (video
placeholders are never changed); the FLOPs count the SigLIP tower on every tile of an image
alone in its prompt (no CLS, no head) and the projector on every tile's patches, not the
downsampling of ``pack_image_features``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from transformers.models.llava_onevision import modeling_llava_onevision as hf
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.siglip import modeling_siglip as hf_siglip

from crossget.config import PatchConfig
from crossget.families import siglip
from crossget.families.base import Tower
from crossget.families.tower_site import TowerSiteFamily, TowerSiteModel, unmerged
from crossget.families.visual_site import ImageSize, check_pinpoints, unpadded_grid
from crossget.state import TowerState

__all__ = [
    "FAMILY",
    "MULTI_IMAGE",
    "LlavaOnevisionModel",
    "adapt_processor",
    "image_tokens",
    "prefill_flops",
    "reference_size",
    "stock_image_tokens",
]

MULTI_IMAGE = "multi-image"  # image_size of an image in a multi-image prompt (its count does not depend on it)


# --------------------------------------------------------------------------- anatomy
def max_tiles(cfg: Any) -> int:
    """``max`` of the config's ``vision_aspect_ratio="anyres_max_<max>"``, as upstream reads it."""
    return int(cfg.vision_aspect_ratio.strip("anyres_max_"))  # noqa: B005 (upstream's parsing, kept exact)


def stock_image_tokens(model: nn.Module, image_size: ImageSize | str) -> int:
    """Visual tokens the unpatched model gives an image of ``image_size`` ``(h, w)`` pixels
    (its original size) alone in its prompt: the base tile's patches, then the grid of the
    best pinpoint unpadded to the image's aspect ratio and downsampled by
    ``vision_aspect_ratio``'s rule, plus one newline per (downsampled) grid row. For
    ``image_size=MULTI_IMAGE`` (an image of a multi-image prompt): the base tile's patches
    and one newline. The arithmetic of upstream's ``pack_image_features`` (and of
    ``LlavaOnevisionProcessor``), on the model's config.

    Raises:
        ValueError: ``image_size`` is neither ``(h, w)`` nor :data:`MULTI_IMAGE`.
    """
    cfg = base_model(model).config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    base = side * side - (cfg.vision_feature_select_strategy == "default")  # SigLIP: no CLS to drop
    if isinstance(image_size, str) and image_size == MULTI_IMAGE:
        return base + 1
    rows, cols = unpadded_grid(cfg, image_size)
    ratio = (rows * cols / (max_tiles(cfg) * side**2)) ** 0.5  # anyres_max: bilinear downsampling
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return base + rows * cols + rows


def stock_counts(base: nn.Module, kwargs: dict) -> list[int]:
    """Stock visual tokens per image of a forward with ``pixel_values``: from ``image_sizes``
    for images alone in their prompt, the base tile's count for those of multi-image prompts
    (``batch_num_images``; None: every image alone, as upstream)."""
    sizes, per_prompt = kwargs.get("image_sizes"), kwargs.get("batch_num_images")
    multi = [False] * len(sizes) if per_prompt is None else [int(n) != 1 for n in per_prompt for _ in range(int(n))]
    return [stock_image_tokens(base, MULTI_IMAGE if m else s) for s, m in zip(sizes, multi)]


# --------------------------------------------------------------------------- the patched model
class LlavaOnevisionModel(TowerSiteModel, hf.LlavaOnevisionModel):
    """The patched ``LlavaOnevisionModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture): upstream's ``pack_image_features``
    and ``get_placeholder_mask`` with the site's reduction (projector site) or the flat layout
    (tower site, something merged) and the check of the image placeholders
    (:class:`~crossget.families.tower_site.TowerSiteModel`; video placeholders: upstream's
    check); video frames run the tower unmerged (their pooling needs the grid)."""

    # upstream's signature: generate() reads it to pick this method's inputs
    @functools.wraps(hf.LlavaOnevisionModel.get_video_features)
    def get_video_features(self, *args: Any, **kwargs: Any) -> Any:
        with unmerged(self.vision_tower):
            return super().get_video_features(*args, **kwargs)


# --------------------------------------------------------------------------- the family
class LlavaOnevisionFamily(TowerSiteFamily):
    """LLaVA-OneVision: the budget is the visual tokens per image (projector site) or per tile
    (tower site) that reach the language model."""

    name = "LLaVA-OneVision"
    classes = (hf.LlavaOnevisionForConditionalGeneration, hf.LlavaOnevisionModel)
    patched_class = LlavaOnevisionModel
    processor_class = LlavaOnevisionProcessor
    tower_extra = 0  # SigLIP: no CLS
    tower_importance = "cross"  # the SigLIP family's rule: the cross token starts as the mean patch
    tower_kind = "SigLIP"
    multi_image = True
    size_hint = ("give image_size=(height, width) to crossget.image_tokens "
                 "(crossget.families.llava_onevision.MULTI_IMAGE for an image of a multi-image prompt)")
    stock_counts = staticmethod(stock_counts)
    stock_image_tokens = staticmethod(stock_image_tokens)

    def image_label(self, model: nn.Module, image_size: Any) -> str:
        if isinstance(image_size, str) and image_size == MULTI_IMAGE:
            return "an image of a multi-image prompt"
        return super().image_label(model, image_size)

    def check(self, cfg: PatchConfig) -> None:
        """As :meth:`Family.check`; VisionZip is refused with the reason.

        Raises:
            ValueError: ``method="visionzip"`` (VisionZip ranks patches by CLS's attention, and
                SigLIP has no CLS), or what :meth:`Family.check` raises.
        """
        if cfg.method == "visionzip":
            raise ValueError("visionzip keeps the patches CLS attends to most; LLaVA-OneVision's SigLIP tower has no "
                             "CLS token, so crossget does not run it there (method must be one of "
                             f"{self.methods} for LLaVA-OneVision models)")
        super().check(cfg)

    def vision_record(self, model: nn.Module) -> Tower | None:
        """The SigLIP tower's record (the SigLIP family's, :func:`crossget.families.siglip.tower`:
        no protected token)."""
        tower = self.base_model(model).vision_tower
        return siglip.tower("vision", tower) if isinstance(tower, hf_siglip.SiglipVisionModel) else None

    def install_vision_glue(self, vision: Tower, state: TowerState) -> tuple[list, nn.Module | None]:
        """The mean-patch cross token and the pooling head over merged tokens
        (:func:`crossget.families.siglip.install_vision_glue`)."""
        return siglip.install_vision_glue(vision.module, state)

    def tower_tiles(self, model: nn.Module, image_size: Any) -> int:
        """One tile for an image of a multi-image prompt (:data:`MULTI_IMAGE`), else its anyres tiles."""
        if isinstance(image_size, str) and image_size == MULTI_IMAGE:
            return 1
        return self.tiles(model, image_size)

    def configure_processor(self, processor: Any, model: nn.Module) -> None:
        """The processor's patches per tile, tile size and grid pinpoints checked against the
        model's; its feature strategy and ``vision_aspect_ratio`` set as the model's.

        Raises:
            ValueError: its patches per tile, tile size or grid pinpoints differ from the model's.
        """
        cfg = base_model(model).config
        tile = cfg.vision_config.image_size
        patches = (tile // cfg.vision_config.patch_size) ** 2
        if processor.num_image_tokens is None:
            processor.num_image_tokens = patches
        if processor.num_image_tokens != patches:
            raise ValueError(f"processor.num_image_tokens is {processor.num_image_tokens}, "
                             f"the vision tower's tiles have {patches} patches")
        size = getattr(processor.image_processor, "size", None) or {}  # a dict or a SizeDict
        got = size.get("height") or size.get("shortest_edge") or tile
        if got != tile:
            raise ValueError(f"the processor resizes tiles to {got} pixels, the vision tower's are {tile}")
        check_pinpoints(processor, cfg)
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        processor.vision_aspect_ratio = cfg.vision_aspect_ratio


FAMILY = LlavaOnevisionFamily()
base_model, site, reference_size = FAMILY.base_model, FAMILY.site, FAMILY.reference_size
image_tokens, adapt_processor, prefill_flops = FAMILY.image_tokens, FAMILY.adapt_processor, FAMILY.prefill_flops
