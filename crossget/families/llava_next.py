"""LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): fewer visual tokens
per image for the language model.

LLaVA-NeXT ("anyres") runs the CLIP tower on a base image and on the tiles of a grid chosen
from ``image_grid_pinpoints`` for each image's size; the projector maps every tile's patch
features into the LM's width, and ``pack_image_features`` unpads the grid to the image's
aspect ratio and appends ``image_newline`` to every row. Image ``i`` then gives ``L_i``
features (base tiles' patches, the unpadded grid, one newline per grid row), written over
``L_i`` ``<image>`` placeholders; ``L_i`` depends on the image size.

Two sites (``site=``, :class:`~crossget.config.PatchConfig`; :func:`crossget.config` reports
the one that runs):

- **Projector site** (``site="projector"``, the default of ``tome`` / ``crossget`` /
  ``divprune``; budget ``keep`` visual tokens per image, or ``flops``, a ratio of the analytic
  prefill FLOPs of :func:`prefill_flops` for one image of ``image_size``, default the largest
  grid pinpoint): after packing, each image's ``L_i`` features are merged down to exactly
  ``keep``, whatever the image's size (:func:`crossget.families.visual_site.reduce_visual_tokens`:
  ToMe's bipartite or CrossGET's complete-graph matching, without cross tokens: training-free;
  DivPrune selects). The tower and the projector run unreduced; only the LM sees fewer tokens.
- **Tower site** (``site="tower"``, the only site of ``visionzip``;
  :mod:`crossget.families.tower_site`): ``tome`` / ``crossget`` merge inside the CLIP layers up
  to the feature layer with LLaVA-1.5's patch (CLS protected and first; CrossGET's importance
  the authors' LLaVA rule, the attention a token receives plus the cross token's, reported as
  ``importance="attention"``; the LM carries no cross token here, so there is no
  ``cross_token_loss``). Every tile (base image and grid tiles, one batch through the tower)
  is merged alike: ``keep`` tokens per tile reach the projector (budgets: ``keep`` per tile,
  ``r`` per tower layer, or ``flops`` solved into them). ``visionzip`` selects per tile at the
  layer whose output is the feature layer, as VisionZip's own LLaVA-NeXT code does (dominant
  patches by CLS attention plus contextual tokens, :mod:`crossget.methods.visionzip`), ``keep``
  per tile. Merged tokens are no grid, so the tiles are laid out "flat" (the original LLaVA
  code's ``mm_patch_merge_type="flat"``: concatenated, base tile first, in tile order, no
  ``image_newline``, which marks grid rows); an image gives ``tiles x keep`` tokens
  (``tiles``: the base tile plus its pinpoint's grid), deterministic for its size. When
  nothing merges (``r=0``, ``keep=`` a tile's tokens) upstream's packing and counts run.
- ``fastv`` / ``dart`` (:mod:`crossget.methods.fastv`): inside the LM (``site`` None): the
  prompt keeps the stock ``L_i`` placeholders; after LM layer ``K`` only ``keep`` visual
  tokens per image stay. FastV ranks a fixed count of tokens per image, so every image in a
  batch must give the same ``L_i`` (same size, or sizes with the same tile grid and
  unpadding); a batch that mixes counts raises a ``ValueError``.

Why the projector site stays the default of ``tome`` / ``crossget``: it keeps upstream's
layout (unpadded grid, one newline per row) that the model was trained on and gives every
image exactly ``keep`` tokens; the tower site saves the tower's and the projector's work too,
at the price of the flat layout.

Prompts need :func:`image_tokens` ``(model, (h, w))`` placeholders per image (``keep``
when reduced at the projector site; ``tiles x keep`` at the tower site; the stock count
otherwise), which :func:`adapt_processor` makes a ``LlavaNextProcessor`` write; a mismatch
raises a ``ValueError`` that says so. The patch swaps the ``LlavaNextModel`` instance's class
to a subclass (:class:`LlavaNextModel`, same name, so ``save_pretrained`` writes the stock
architecture) overriding ``pack_image_features`` and ``get_placeholder_mask``; upstream's
``LlavaNextModel`` has no ``_can_record_outputs``, so output capture is unaffected; the tower
site also patches the CLIP tower's layers (or VisionZip's layer). Unpatching restores every class.

The module's functions (:func:`base_model`, :func:`site`, :func:`reference_size`,
:func:`image_tokens`, :func:`adapt_processor`, :func:`prefill_flops`) are those of
:data:`FAMILY` (:class:`~crossget.families.tower_site.TowerSiteFamily`): for LLaVA-NeXT
the processor's patch size, feature strategy and CLS count
(``num_additional_image_tokens = 1``: CLIP) are set as the model has them, and the FLOPs
count the CLIP tower on every tile (its CLS included; at the tower site with the schedule,
the matching products and CrossGET's cross token).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.clip import modeling_clip as hf_clip
from transformers.models.llava_next import modeling_llava_next as hf
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from crossget.families import clip
from crossget.families.base import Tower
from crossget.families.tower_site import TowerSiteFamily, TowerSiteModel
from crossget.families.visual_site import (
    DEFAULT_TEXT_LEN,
    FixedImageTokens,
    ImageSize,
    Site,
    check_pinpoints,
    unpadded_grid,
)

__all__ = [
    "FAMILY",
    "DEFAULT_TEXT_LEN",
    "FixedImageTokens",
    "LlavaNextModel",
    "Site",
    "adapt_processor",
    "image_tokens",
    "prefill_flops",
    "reference_size",
    "stock_image_tokens",
]


# --------------------------------------------------------------------------- anatomy
def stock_image_tokens(model: nn.Module, image_size: ImageSize) -> int:
    """Visual tokens the unpatched model gives an image of ``image_size`` ``(h, w)`` pixels
    (its original size, before the processor's resizing): the base tile's features, then
    the grid of the best pinpoint unpadded to the image's aspect ratio, plus one newline
    per grid row. The arithmetic of upstream's ``pack_image_features`` / ``unpad_image``
    (and of ``LlavaNextProcessor``), on the model's config."""
    cfg = base_model(model).config
    rows, cols = unpadded_grid(cfg, image_size)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    base = side**2 + (cfg.vision_feature_select_strategy == "full")  # a tile's patches (+ CLS)
    return base + rows * cols + rows


def stock_counts(base: nn.Module, kwargs: dict) -> list[int]:
    """Stock visual tokens per image of a forward with ``pixel_values`` (from ``image_sizes``)."""
    return [stock_image_tokens(base, s) for s in kwargs.get("image_sizes")]


# --------------------------------------------------------------------------- the patched model
class LlavaNextModel(TowerSiteModel, hf.LlavaNextModel):
    """The patched ``LlavaNextModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture): upstream's ``pack_image_features``
    and ``get_placeholder_mask`` with the site's reduction (the projector site) or the flat
    layout (the tower site, something merged) and the placeholder check
    (:class:`~crossget.families.tower_site.TowerSiteModel`)."""


# --------------------------------------------------------------------------- the family
class LlavaNextFamily(TowerSiteFamily):
    """LLaVA-NeXT: the budget is the visual tokens per image (projector site) or per tile (tower
    site) that reach the language model."""

    name = "LLaVA-NeXT"
    classes = (hf.LlavaNextForConditionalGeneration, hf.LlavaNextModel)
    methods = TowerSiteFamily.methods + ("visionzip",)
    patched_class = LlavaNextModel
    processor_class = LlavaNextProcessor
    tower_extra = 1  # CLIP's CLS
    tower_methods = ("none", "tome", "crossget", "visionzip")
    tower_importance = "attention"  # LLaVA-1.5's rule (the authors' LLaVA code) on the same CLIP
    tower_kind = "CLIP"
    stock_counts = staticmethod(stock_counts)
    stock_image_tokens = staticmethod(stock_image_tokens)

    def vision_record(self, model: nn.Module) -> Tower | None:
        """The CLIP tower's record (LLaVA-1.5's patch, :func:`crossget.families.clip.tower`)."""
        tower = self.base_model(model).vision_tower
        return clip.tower("vision", tower) if isinstance(tower, hf_clip.CLIPVisionModel) else None

    def configure_processor(self, processor: Any, model: nn.Module) -> None:
        """The processor's patch size, grid pinpoints, feature strategy and CLS count as the model's.

        Raises:
            ValueError: its patch size or grid pinpoints differ from the model's.
        """
        cfg = base_model(model).config
        patch = cfg.vision_config.patch_size
        if processor.patch_size is None:
            processor.patch_size = patch
        if processor.patch_size != patch:
            raise ValueError(f"processor.patch_size is {processor.patch_size}, the vision tower's is {patch}")
        check_pinpoints(processor, cfg)
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        processor.num_additional_image_tokens = 1  # CLIP's CLS, which "default" then drops


FAMILY = LlavaNextFamily()
base_model, site, reference_size = FAMILY.base_model, FAMILY.site, FAMILY.reference_size
image_tokens, adapt_processor, prefill_flops = FAMILY.image_tokens, FAMILY.adapt_processor, FAMILY.prefill_flops
