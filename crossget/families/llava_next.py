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
so the site is shared (:mod:`crossget.families.visual_site`). The cost: the tower and the
projector run unreduced; only the language model sees fewer tokens.

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

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from crossget.config import PatchConfig
from crossget.families.base import Family, Tower
from crossget.families.visual_site import SITE_METHODS, check_keep, reduce_visual_tokens
from crossget.methods import fastv
from crossget.record import TOWER_FIELDS, record, swap_class, unmark
from crossget.schedule import decoder_layer_flops, vit_layer_flops

__all__ = [
    "FAMILY",
    "LlavaNextModel",
    "adapt_processor",
    "image_tokens",
    "prefill_flops",
    "reference_size",
    "stock_image_tokens",
]

DEFAULT_TEXT_LEN = 64  # text tokens assumed when solving flops= (as for LLaVA-1.5)
ImageSize = int | Sequence[int] | torch.Tensor  # (height, width) in pixels, or a square's side


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


def _size(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)):
        raise ValueError(f"image_size must be (height, width) in pixels (or one int for a square), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def reference_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the ``flops=`` budget is planned for by default: the largest grid
    pinpoint (by area; the first such), or the tower's tile size if there is none."""
    cfg = base_model(model).config
    points = [tuple(p) for p in (cfg.image_grid_pinpoints or [])]
    if not points:
        return cfg.vision_config.image_size, cfg.vision_config.image_size
    return max(points, key=lambda p: p[0] * p[1])


def _base_tokens(cfg: Any) -> int:
    """Features of one tile: its patches (+ CLS with ``"full"``)."""
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return side * side + (cfg.vision_feature_select_strategy == "full")


def stock_image_tokens(model: nn.Module, image_size: ImageSize) -> int:
    """Visual tokens the unpatched model gives an image of ``image_size`` ``(h, w)`` pixels
    (its original size, before the processor's resizing): the base tile's features, then
    the grid of the best pinpoint unpadded to the image's aspect ratio, plus one newline
    per grid row. The arithmetic of upstream's ``pack_image_features`` / ``unpad_image``
    (and of ``LlavaNextProcessor``), on the model's config."""
    cfg = base_model(model).config
    h, w = _size(image_size)
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
    return _base_tokens(cfg) + rows * cols + rows


def site(model: nn.Module) -> Site | None:
    """What the patch installed on the model's ``LlavaNextModel`` (None if not patched)."""
    rec = record(base_model(model))
    return rec.glue if rec is not None and isinstance(rec.glue, Site) else None


def image_tokens(model: nn.Module, image_size: ImageSize | None = None) -> int:
    """``<image>`` placeholders an image of ``image_size`` ``(h, w)`` needs in the prompt, as
    the model is patched now: ``keep`` when reduced at the projector site (``tome``,
    ``crossget``), else the stock count of :func:`stock_image_tokens`.

    Raises:
        ValueError: no ``image_size`` where the count depends on it (stock, ``none``,
            ``fastv``), or ``keep`` is more than such an image gives.
    """
    s = site(model)
    if s is not None and s.method in SITE_METHODS:
        if image_size is not None:
            check_keep(s.keep, stock_image_tokens(model, image_size), f"an image of size {_size(image_size)}")
        return s.keep
    if image_size is None:
        raise ValueError("LLaVA-NeXT's visual-token count depends on the image size: "
                         "give image_size=(height, width) to crossget.image_tokens")
    return stock_image_tokens(model, image_size)


@dataclass(frozen=True)
class FixedImageTokens:
    """A ``LlavaNextProcessor``'s ``replace_image_token`` that writes ``count`` placeholders
    for every image (set on the processor instance by :func:`adapt_processor`; picklable)."""

    token: str
    count: int

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.token * self.count


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
    if not isinstance(processor, LlavaNextProcessor):
        raise TypeError(f"expected a LlavaNextProcessor, got {type(processor).__name__}")
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
    s = site(model)
    if s is not None and s.method in SITE_METHODS:
        processor.replace_image_token = FixedImageTokens(processor.image_token, s.keep)
    else:
        processor.__dict__.pop("replace_image_token", None)  # the class's per-size count again
    return processor


# --------------------------------------------------------------------------- FLOPs model
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
    base = base_model(model)
    cfg = base.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    size = reference_size(model) if image_size is None else _size(image_size)
    stock = stock_image_tokens(model, size)
    keep = stock if keep is None else keep
    tiles = hf.image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, vcfg.image_size)
    n0 = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    c = vcfg.hidden_size
    per_tile = 2 * (n0 - 1) * c * vcfg.num_channels * vcfg.patch_size**2
    per_tile += vcfg.num_hidden_layers * vit_layer_flops(c, vcfg.intermediate_size, n0, n0)
    total = tiles * per_tile
    layers = cfg.vision_feature_layer
    width_in = c * (1 if isinstance(layers, int) else len(layers))
    projected = tiles * _base_tokens(cfg)
    total += 2 * projected * (width_in * tcfg.hidden_size + tcfg.hidden_size**2)
    if method in SITE_METHODS:
        n = stock
        while n > keep:  # the rounds of reduce_visual_tokens: bipartite (N/2)^2 or complete N^2 products
            pairs = (n // 2) * ((n + 1) // 2) if method == "tome" else n * n
            total += 2 * pairs * tcfg.hidden_size
            n -= min(n - keep, n // 2)
    visual = keep if method in SITE_METHODS else stock
    for layer in range(tcfg.num_hidden_layers):
        n = keep if method == "fastv" and layer >= fastv_layer else visual
        total += decoder_layer_flops(tcfg, n + text_len)
    return float(total)


def _solve_flops(model: nn.Module, target: float, method: str, size: tuple[int, int], text_len: int,
                 fastv_layer: int) -> tuple[int, float]:
    """Largest ``keep`` whose estimated prefill FLOPs are at most ``target`` x the stock ones."""
    ref = prefill_flops(model, image_size=size, text_len=text_len)
    for keep in range(stock_image_tokens(model, size), 0, -1):
        ratio = prefill_flops(model, method, keep, size, text_len, fastv_layer) / ref
        if ratio <= target + 1e-12:
            return keep, ratio
    raise ValueError(f"flops={target} is out of reach for method={method!r} with a {text_len}-token prompt "
                     f"and a {size[0]}x{size[1]} image (the tower and projector run whole)")


# --------------------------------------------------------------------------- the patched model
def _placeholder_count(base: hf.LlavaNextModel, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> int:
    """Placeholders in the prompts, found as upstream's ``get_placeholder_mask`` finds them."""
    if input_ids is not None:
        return int((input_ids == base.config.image_token_id).sum())
    token = base.get_input_embeddings()(torch.tensor(base.config.image_token_id, device=inputs_embeds.device))
    return int((inputs_embeds == token).all(-1).sum())


class LlavaNextModel(hf.LlavaNextModel):
    """The patched ``LlavaNextModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture). Reads its :class:`Site` from the
    crossget record."""

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """Upstream's packing, then (``tome``/``crossget``) each image's ``[L_i, D]``
        features reduced to ``[keep, D]``; returns ``(list of [keep, D], lengths [images])``."""
        features, lengths = super().pack_image_features(
            image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        s = record(self).glue
        if s.method not in SITE_METHODS:
            return features, lengths
        out = []
        for i, f in enumerate(features):
            if s.keep > f.shape[0]:
                size = tuple(torch.as_tensor(image_sizes[i]).tolist())
                raise ValueError(
                    f"keep={s.keep} is more than the {f.shape[0]} visual tokens image {i} (size {size}) gives; "
                    f"patch with a smaller keep (crossget.image_tokens(model, image_size) on the stock model counts them)"
                )
            out.append(reduce_visual_tokens(f, s.keep, s.method)[0])
        return out, torch.full_like(lengths, s.keep)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """Upstream's mask, after a check whose error says how to build the prompts."""
        found, need = _placeholder_count(self, input_ids, inputs_embeds), image_features.shape[0]
        if found != need:
            s = record(self).glue
            per = f"keep={s.keep} per image" if s.method in SITE_METHODS else "the stock count per image"
            raise ValueError(
                f"the prompts hold {found} image placeholder tokens, but the images give {need} visual tokens "
                f"(the model is patched with method={s.method!r}: {per}): build prompts with "
                f"crossget.adapt_processor(processor, model), or repeat the image token "
                f"crossget.image_tokens(model, image_size) times per image"
            )
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)


_FORWARD = inspect.signature(hf.LlavaNextModel.forward)


@dataclass(eq=False)
class Site:
    """What the patch put on a ``LlavaNextModel``: the method and budget its patched class
    reads, and FastV's wiring (its :meth:`on_forward` is the model's forward pre-hook)."""

    method: str
    keep: int
    fastv: fastv.FastV | None = None
    handles: list = field(default_factory=list)

    def on_forward(self, base: hf.LlavaNextModel, args: tuple, kwargs: dict) -> None:
        """FastV: the image positions, the visual tokens per image (one count for the whole
        batch) and the ranking query (last real prompt token) of this forward."""
        fv = self.fastv
        fv.image_mask = None
        if args:
            kwargs = {**_FORWARD.bind_partial(base, *args).arguments, **kwargs}
        pixels, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            counts = [len(f) for f in encoded.pooler_output]
        elif pixels is not None and pixels.size(0) > 0:
            counts = [stock_image_tokens(base, s) for s in sizes]
        else:
            return  # no images: a decode step (or text only)
        if len(set(counts)) > 1:
            raise ValueError(
                f"fastv on LLaVA-NeXT ranks one count of visual tokens per image, but these images give {counts}: "
                f"batch images of the same size (tile grid), or use method='tome' / 'crossget'"
            )
        if self.keep > counts[0]:
            raise ValueError(f"keep={self.keep} is more than the {counts[0]} visual tokens each image gives")
        fv.per_image = counts[0]
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is not None:
            mask = ids == base.config.image_token_id
        else:
            token = base.get_input_embeddings()(torch.tensor(base.config.image_token_id, device=embeds.device))
            mask = (embeds == token).all(-1)
        fv.image_mask = mask
        length = mask.shape[1]
        # generate() without a cache feeds the same encoded images with a longer sequence at
        # every step: keep the prompt length of their first forward, so that every step ranks
        # (and prunes) exactly as the prefill did (as for LLaVA-1.5)
        prompt = encoded.__dict__.setdefault("_crossget", length) if encoded is not None else length
        pos = torch.arange(length, device=mask.device).expand(mask.shape[0], length)
        ok = pos < prompt
        valid = kwargs.get("attention_mask")
        if isinstance(valid, torch.Tensor) and valid.dim() == 2:
            ok = ok & valid.bool()
        fv.query_pos = torch.where(ok, pos, -1).amax(-1)

    def __call__(self, base: hf.LlavaNextModel, args: tuple, kwargs: dict) -> None:
        self.on_forward(base, args, kwargs)


# --------------------------------------------------------------------------- the family
class LlavaNextFamily(Family):
    """LLaVA-NeXT: the budget is the visual tokens per image that reach the language model."""

    name = "LLaVA-NeXT"
    classes = (hf.LlavaNextForConditionalGeneration, hf.LlavaNextModel)
    methods = ("none", "tome", "crossget", "fastv")
    # guidance: read only to refuse a rule (a resolved config names the authors' one)
    options = frozenset({"keep", "flops", "fastv_layer", "text_len", "image_size", "towers", "importance", "guidance",
                         "guidance_scale"})
    importance = ("cross", "none")  # no cross tokens at the projector site: both run without
    default_guidance = "reference"  # nothing is guided here: whatever the encoders' default becomes

    def image_tokens(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """:func:`image_tokens`."""
        return image_tokens(model, image_size)

    def adapt_processor(self, processor: Any, model: nn.Module) -> Any:
        return adapt_processor(processor, model)

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """None: no tower is patched (the reduction is at the projector site or in the LM)."""
        base_model(model)
        return {}

    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """Budgets (give one): ``keep`` visual tokens per image, or ``flops`` a target ratio of
        :func:`prefill_flops` for one image of ``image_size`` (default :func:`reference_size`)
        and ``text_len`` prompt tokens (default 64). ``fastv_layer``: FastV's K.

        Raises:
            TypeError: not a LLaVA-NeXT model.
            ValueError: bad method, budget (not an int, zero, negative, more than the
                reference image gives), towers or fastv_layer.
        """
        base = base_model(model)
        method = cfg.method
        if cfg.towers not in (None, ()):
            raise ValueError(f"LLaVA-NeXT reduces at the projector site, no tower: towers must be None "
                             f"(or ()), got {cfg.towers!r}")
        if cfg.guidance not in (None, "reference") or cfg.guidance_scale not in (None, 1.0):
            raise ValueError("LLaVA-NeXT's projector-site matching has no importance to guide: "
                             f"guidance={cfg.guidance!r}, guidance_scale={cfg.guidance_scale!r} cannot apply")
        if cfg.keep is not None and cfg.flops is not None:
            raise ValueError("give keep= or flops=, not both")
        n_lm = len(base.language_model.layers)
        fastv_layer = fastv.DEFAULT_LAYER if cfg.fastv_layer is None else cfg.fastv_layer
        if method == "fastv" and (isinstance(fastv_layer, bool) or not isinstance(fastv_layer, int)
                                  or not 1 <= fastv_layer < n_lm):
            raise ValueError(f"fastv_layer must be an int in [1, {n_lm - 1}] for this {n_lm}-layer LM, got {fastv_layer!r}")
        size = reference_size(model) if cfg.image_size is None else _size(cfg.image_size)
        text_len = DEFAULT_TEXT_LEN if cfg.text_len is None else cfg.text_len
        keep, estimate = cfg.keep, None
        if method == "none":
            keep = None
        elif cfg.flops is not None:
            keep, estimate = _solve_flops(model, cfg.flops, method, size, text_len, fastv_layer)
        elif keep is None:
            raise ValueError("give keep= (visual tokens per image) or flops= (target prefill FLOPs ratio)")
        else:
            check_keep(keep, stock_image_tokens(model, size), f"a {size[0]}x{size[1]} image (the reference size)")

        self.unpatch(model)
        s = Site(method, keep if keep is not None else 0)
        if method == "fastv":
            # per_image is set by every forward (it depends on the images' size)
            s.fastv = fastv.FastV(base.language_model, fastv_layer, keep, per_image=keep)
            s.handles = s.fastv.install() + [base.register_forward_pre_hook(s, with_kwargs=True)]
        swap_class(base, LlavaNextModel, glue=s, handles=s.handles)
        return PatchConfig(
            method=method, keep=keep, flops=cfg.flops, flops_estimate=estimate, towers=(),
            importance="none" if method == "crossget" else cfg.importance,
            guidance=cfg.guidance, guidance_scale=cfg.guidance_scale,
            text_len=cfg.text_len if cfg.flops is None else text_len, image_size=cfg.image_size,
            fastv_layer=fastv_layer if method == "fastv" else None,
        )

    def unpatch(self, model: nn.Module) -> None:
        base = base_model(model)
        if site(model) is not None:
            unmark(base, TOWER_FIELDS + ("glue",))  # hooks removed, stock class back

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: int | None = None
    ) -> dict[str, list[int]]:
        """Tokens in each LM layer (``language``) for one image of ``image_size`` (default
        :func:`reference_size`) and ``text_len`` other prompt tokens (default 64); the tower
        (``vision``, per tile) runs unreduced."""
        base = base_model(model)
        s = site(model)
        text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
        size = reference_size(model) if image_size is None else _size(image_size)
        visual = image_tokens(model, size)
        n_lm = len(base.language_model.layers)
        language = [visual + text_len] * n_lm
        if s is not None and s.method == "fastv":
            language[s.fastv.layer:] = [s.keep + text_len] * (n_lm - s.fastv.layer)
        vcfg = base.config.vision_config
        vision = [(vcfg.image_size // vcfg.patch_size) ** 2 + 1] * vcfg.num_hidden_layers
        return {"vision": vision, "language": language}


FAMILY = LlavaNextFamily()
