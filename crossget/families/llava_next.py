"""LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): fewer visual tokens
per image for the language model.

LLaVA-NeXT ("anyres") runs the CLIP tower on a base image and on the tiles of a grid chosen
from ``image_grid_pinpoints`` for each image's size; the projector maps every tile's patch
features into the LM's width, and ``pack_image_features`` unpads the grid to the image's
aspect ratio and appends ``image_newline`` to every row. Image ``i`` then gives ``L_i``
features (base tiles' patches, the unpadded grid, one newline per grid row), written over
``L_i`` ``<image>`` placeholders; ``L_i`` depends on the image size.

Budget: ``keep`` visual tokens per image (or ``flops``, a ratio of the analytic prefill
FLOPs of :func:`prefill_flops` for one image of ``image_size``, default the largest grid
pinpoint). Methods:

- ``tome`` / ``crossget`` (and ``none``): at the projector site
  (:func:`crossget.families.visual_site.reduce_visual_tokens`): after packing, each
  image's ``L_i`` features are merged down to exactly ``keep``, whatever the image's size
  (ToMe's bipartite or CrossGET's complete-graph matching, without cross tokens: training-free).
- ``fastv`` (:mod:`crossget.methods.fastv`): the prompt keeps the stock ``L_i``
  placeholders; after LM layer ``K`` only ``keep`` visual tokens per image stay. FastV
  ranks a fixed count of tokens per image, so every image in a batch must give the same
  ``L_i`` (same size, or sizes with the same tile grid and unpadding); a batch that mixes
  counts raises a ``ValueError``.

Site: the projector site, not the tower. The grid's tokens are only laid out (unpadded,
one newline per row) by ``pack_image_features``; merging inside the tower would change
what that function reshapes, so it would have to be rewritten. After packing, a plain
sequence of tokens per image is left, which any family with a vision-to-LM hand-off has,
so the site is shared (:mod:`crossget.families.visual_site`, with the family logic of
:class:`~crossget.families.visual_site.PackedSiteFamily`: budgets, ``flops=``, placeholders,
FastV's wiring). The cost: the tower and the projector run unreduced; only the language
model sees fewer tokens.

Prompts need :func:`image_tokens` ``(model, (h, w))`` placeholders per image (``keep``
when reduced at the projector site; the stock count otherwise), which
:func:`adapt_processor` makes a ``LlavaNextProcessor`` write; a mismatch raises a
``ValueError`` that says so. The patch swaps the ``LlavaNextModel`` instance's class to a
subclass (:class:`LlavaNextModel`, same name, so ``save_pretrained`` writes the stock
architecture) overriding ``pack_image_features`` and ``get_placeholder_mask``; upstream's
``LlavaNextModel`` has no ``_can_record_outputs``, so output capture is unaffected.
Unpatching restores the class.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from crossget.families.visual_site import (
    DEFAULT_TEXT_LEN,
    FixedImageTokens,
    ImageSize,
    PackedSiteFamily,
    Site,
    check_placeholders,
    image_hw,
    reduce_packed,
)
from crossget.methods import fastv
from crossget.record import record

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
def base_model(model: nn.Module) -> hf.LlavaNextModel:
    """The ``LlavaNextModel`` of ``model`` (itself, or ``model.model``).

    Raises:
        TypeError: not a LLaVA-NeXT model.
    """
    if isinstance(model, hf.LlavaNextForConditionalGeneration):
        return model.model
    if isinstance(model, hf.LlavaNextModel):
        return model
    raise TypeError(f"expected a LlavaNextForConditionalGeneration or LlavaNextModel, got {type(model).__name__}")


def reference_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the ``flops=`` budget is planned for by default: the largest grid
    pinpoint (by area; the first such), or the tower's tile size if there is none."""
    return FAMILY.reference_size(model)


def stock_image_tokens(model: nn.Module, image_size: ImageSize) -> int:
    """Visual tokens the unpatched model gives an image of ``image_size`` ``(h, w)`` pixels
    (its original size, before the processor's resizing): the base tile's features, then
    the grid of the best pinpoint unpadded to the image's aspect ratio, plus one newline
    per grid row. The arithmetic of upstream's ``pack_image_features`` / ``unpad_image``
    (and of ``LlavaNextProcessor``), on the model's config."""
    cfg = base_model(model).config
    h, w = image_hw(image_size)
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    best_h, best_w = select_best_resolution([h, w], cfg.image_grid_pinpoints)
    rows, cols = best_h // tile * (tile // patch), best_w // tile * (tile // patch)  # grid in patches
    # unpad_image: crop the padding the processor's resize-and-pad added on one axis
    if w / h > cols / rows:
        new_rows = int(round(h * (cols / w), 7))
        rows -= (rows - new_rows) // 2 * 2
    else:
        new_cols = int(round(w * (rows / h), 7))
        cols -= (cols - new_cols) // 2 * 2
    base = (tile // patch) ** 2 + (cfg.vision_feature_select_strategy == "full")  # a tile's patches (+ CLS)
    return base + rows * cols + rows


def stock_counts(base: nn.Module, kwargs: dict) -> list[int]:
    """Stock visual tokens per image of a forward with ``pixel_values`` (from ``image_sizes``)."""
    return [stock_image_tokens(base, s) for s in kwargs.get("image_sizes")]


def site(model: nn.Module) -> Site | None:
    """What the patch installed on the model's ``LlavaNextModel`` (None if not patched)."""
    return FAMILY.site(model)


def image_tokens(model: nn.Module, image_size: ImageSize | None = None) -> int:
    """``<image>`` placeholders an image of ``image_size`` ``(h, w)`` needs in the prompt, as
    the model is patched now: ``keep`` when reduced at the projector site (``tome``,
    ``crossget``), else the stock count of :func:`stock_image_tokens`.

    Raises:
        ValueError: no ``image_size`` where the count depends on it (stock, ``none``,
            ``fastv``), or ``keep`` is more than such an image gives.
    """
    return FAMILY.image_tokens(model, image_size)


def adapt_processor(processor: Any, model: nn.Module) -> Any:
    """Make a ``LlavaNextProcessor`` write :func:`image_tokens` placeholders per image; returns it.

    Reduced at the projector site: ``keep`` for every image (an instance attribute
    ``replace_image_token``, :class:`FixedImageTokens`); otherwise the processor's own
    per-size count (the attribute is removed), with its patch size, feature strategy and
    CLS count (``num_additional_image_tokens = 1``: CLIP) set as the model has them. Call it
    again after re-patching or unpatching.

    Raises:
        TypeError: ``processor`` is not a LLaVA-NeXT processor.
        ValueError: its patch size or grid pinpoints differ from the model's.
    """
    return FAMILY.adapt_processor(processor, model)


def prefill_flops(
    model: nn.Module,
    method: str = "none",
    keep: int | None = None,
    image_size: ImageSize | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
    fastv_layer: int = fastv.DEFAULT_LAYER,
) -> float:
    """Analytic FLOPs of one prefill with one image of ``image_size`` (default
    :func:`reference_size`) and ``text_len`` other prompt tokens: the CLIP tower on every
    tile (patch embedding, all layers), the projector, the projector-site matching rounds
    (``tome``/``crossget``: the similarity products), and every LM layer on the visual plus
    text tokens (``fastv``: layers from ``K`` on with ``keep`` visual tokens)."""
    return FAMILY.prefill_flops(model, method, keep, image_size, text_len, fastv_layer)


# --------------------------------------------------------------------------- the patched model
class LlavaNextModel(hf.LlavaNextModel):
    """The patched ``LlavaNextModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture). Reads its :class:`Site` from the
    crossget record."""

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """Upstream's packing, then (``tome``/``crossget``) each image's ``[L_i, D]``
        features reduced to ``[keep, D]``; returns ``(list of [keep, D], lengths [images])``."""
        features, lengths = super().pack_image_features(
            image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        return reduce_packed(features, lengths, record(self).glue, image_sizes)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """Upstream's mask, after a check whose error says how to build the prompts."""
        check_placeholders(self, input_ids, inputs_embeds, image_features, record(self).glue)
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)


# --------------------------------------------------------------------------- the family
class LlavaNextFamily(PackedSiteFamily):
    """LLaVA-NeXT: the budget is the visual tokens per image that reach the language model."""

    name = "LLaVA-NeXT"
    classes = (hf.LlavaNextForConditionalGeneration, hf.LlavaNextModel)
    patched_class = LlavaNextModel
    processor_class = LlavaNextProcessor
    tower_extra = 1  # CLIP's CLS
    stock_counts = staticmethod(stock_counts)

    def base_model(self, model: nn.Module) -> hf.LlavaNextModel:
        return base_model(model)

    def stock_image_tokens(self, model: nn.Module, image_size: ImageSize) -> int:
        return stock_image_tokens(model, image_size)

    def configure_processor(self, processor: Any, model: nn.Module) -> None:
        """The processor's patch size, grid pinpoints, feature strategy and CLS count as the model's."""
        cfg = base_model(model).config
        patch = cfg.vision_config.patch_size
        if processor.patch_size is None:
            processor.patch_size = patch
        if processor.patch_size != patch:
            raise ValueError(f"processor.patch_size is {processor.patch_size}, the vision tower's is {patch}")
        points = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
        if points != [list(p) for p in cfg.image_grid_pinpoints]:
            raise ValueError(f"the processor's image_grid_pinpoints {points} differ from the model's "
                             f"{cfg.image_grid_pinpoints}")
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        processor.num_additional_image_tokens = 1  # CLIP's CLS, which "default" then drops


FAMILY = LlavaNextFamily()
