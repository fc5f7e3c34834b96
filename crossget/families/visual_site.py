"""The reduction site between the vision side and the language model: one image's packed
visual tokens (what the projector wrote, in the LM's width) reduced to a fixed count.

Families whose visual tokens cannot be merged inside the vision tower while keeping upstream's
layout (LLaVA-NeXT: anyres tiles unpadded and packed with a newline token per row; LLaVA-OneVision
and Qwen-VL) reduce here, image by image (LLaVA-NeXT and OneVision can also merge in the tower,
laying the tiles out flat: :mod:`crossget.families.tower_site`):

- ``"tome"``: ToMe's bipartite soft matching (:func:`crossget.methods.tome.bipartite_soft_matching`),
  repeated, since one round removes at most half of the tokens;
- ``"crossget"``: CrossGET's complete-graph soft matching without cross tokens
  (:func:`crossget.methods.crossget.complete_graph_soft_matching`, training-free), repeated;
- ``"divprune"``: DivPrune's greedy max-min diversity selection
  (:func:`crossget.methods.divprune.divprune_select`), where its authors run it: on the
  image's projected features as they enter the language model.

The first two match on the features themselves (cosine), merge by size-weighted averages
(:class:`crossget.merge.Merge`) and stop at exactly ``keep`` tokens; the output is in the
order of each token's smallest original index, so spatial order is kept. A selection keeps
``keep`` original tokens as they are, in spatial order, each its own ``first``.

The rest of the module is what such families share around the site (LLaVA-NeXT,
LLaVA-OneVision, Qwen2.5-VL): :class:`Site` (the method and budget a patched model reads,
and the per-forward wiring of FastV / DART in the language model), :func:`reduce_images` /
:func:`reduce_packed` (every image to ``keep`` tokens), :func:`check_placeholders` (a
prompt/feature mismatch that says how to build prompts), :class:`FixedImageTokens` (a
processor writing ``keep`` placeholders), :func:`site_and_lm_flops` (the analytic FLOPs after
the vision side), :class:`SiteFamily`, the family logic (budgets, ``flops=``, placeholders,
the processor, patching) on top of a few per-family pieces (the classes, the stock count of
an image, the FLOPs model, the default image, the processor's settings), and, for the
LLaVA-style families (anyres tiles packed by ``pack_image_features``),
:func:`unpadded_grid` (an image's tile grid), :func:`check_pinpoints`,
:class:`PackedSiteModel` (the patched base model's overrides) and :class:`PackedSiteFamily`.

Shapes: ``L`` visual tokens of one image, ``D`` channels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution

from crossget.config import PatchConfig
from crossget.families.base import Family, Tower
from crossget.merge import Merge
from crossget.methods import dart, fastv
from crossget.methods.crossget import complete_graph_soft_matching
from crossget.methods.divprune import divprune_select
from crossget.methods.tome import bipartite_soft_matching
from crossget.record import TOWER_FIELDS, record, swap_class, unmark
from crossget.schedule import decoder_layer_flops, vit_layer_flops

__all__ = [
    "DEFAULT_TEXT_LEN",
    "LM_METHODS",
    "SELECTING",
    "SITE_METHODS",
    "FixedImageTokens",
    "ImageSize",
    "PackedSiteFamily",
    "PackedSiteModel",
    "Site",
    "SiteFamily",
    "anyres_tiles",
    "check_keep",
    "check_pinpoints",
    "check_placeholders",
    "dart_flops",
    "image_hw",
    "placeholder_mask",
    "reduce_images",
    "reduce_packed",
    "reduce_visual_tokens",
    "site_and_lm_flops",
    "unpadded_grid",
]

SITE_METHODS = ("tome", "crossget", "divprune")  # what reduce_visual_tokens runs
SELECTING = ("divprune",)  # site methods that keep original tokens (the rest merge)
LM_METHODS = ("fastv", "dart")  # pruned inside the language model, before layer K (fastv_layer)


def check_keep(keep: object, available: int | None = None, what: str = "the image's visual tokens") -> int:
    """``keep`` as a valid token count: an int in ``[1, available]``.

    Raises:
        ValueError: not an int (bools included), ``<= 0``, or more than ``available``.
    """
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (visual tokens per image), got {keep!r}")
    if keep <= 0:
        raise ValueError(f"keep must be positive (visual tokens per image), got {keep}")
    if available is not None and keep > available:
        raise ValueError(f"keep={keep} is more than the {available} tokens of {what}")
    return keep


def _match(method: str, metric: torch.Tensor, r: int) -> Merge:
    if method == "tome":
        return bipartite_soft_matching(metric, r)
    return complete_graph_soft_matching(metric, r)  # no importance: plain size-weighted groups


def reduce_visual_tokens(x: torch.Tensor, keep: int, method: str,
                         rounds: list[tuple[Merge, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's visual tokens ``x`` ``[L, D]`` reduced to exactly ``keep`` tokens.

    ``divprune``: the ``keep`` tokens :func:`~crossget.methods.divprune.divprune_select`
    picks, as they are (``first``: their indices). ``tome`` / ``crossget``: rounds of
    ``method``'s matching on the current tokens (cosine similarity of the tokens themselves),
    each removing ``min(current - keep, current // 2)``; every group becomes the
    size-weighted average of what it covers. After each round the tokens are put in the
    order of their smallest original index, so a round's bipartite split (ToMe: alternate
    tokens) runs on spatially ordered tokens, and so does the output.

    Args:
        x: ``[L, D]`` visual tokens (any float dtype; merging accumulates in float32).
        keep: tokens to return, ``1 <= keep <= L``.
        method: ``"tome"``, ``"crossget"`` or ``"divprune"`` (:data:`SITE_METHODS`).
        rounds: when a list, each merging round's ``(merge, order)`` is appended to it (its
            :class:`~crossget.merge.Merge` and the order it put the tokens in), so that the
            same groups can be replayed on other features of the same tokens (nothing is
            appended for a selection).

    Returns:
        ``(tokens [keep, D], first [keep])``: the reduced tokens, and for each the smallest
        index in ``x`` of the tokens it covers (ascending; ``first == arange(L)`` when
        ``keep == L``).

    Raises:
        ValueError: ``x`` not 2-D, an unknown method, or ``keep`` not an int in ``[1, L]``.
    """
    if x.dim() != 2:
        raise ValueError(f"reduce_visual_tokens expects one image's tokens [L, D], got {tuple(x.shape)}")
    if method not in SITE_METHODS:
        raise ValueError(f"method must be one of {SITE_METHODS}, got {method!r}")
    n = x.shape[0]
    check_keep(keep, n)
    if method in SELECTING:
        first = divprune_select(x, keep)
        return x[first], first
    tokens = x.unsqueeze(0)  # [1, N, D]: the matchers are batched
    size = None  # [1, N, 1] float32 after the first merge
    first = torch.arange(n, device=x.device).unsqueeze(0)  # [1, N]
    while n > keep:
        merge = _match(method, tokens, min(n - keep, n // 2))
        tokens, size = merge(tokens, size)
        first = -merge.amax(-first)  # a group's smallest original index
        n = tokens.shape[1]
        order = first[0].argsort()  # indices are distinct: no ties
        first, tokens, size = first[:, order], tokens[:, order], size[:, order]
        if rounds is not None:
            rounds.append((merge, order))
    return tokens[0], first[0]


# --------------------------------------------------------------------------- shared around the site
DEFAULT_TEXT_LEN = 64  # text tokens assumed when solving flops= (as for LLaVA-1.5)
ImageSize = int | Sequence[int] | torch.Tensor  # (height, width) in pixels, or a square's side


def image_hw(image_size: ImageSize) -> tuple[int, int]:
    """``image_size`` as ``(height, width)`` pixels (one int: a square; a tensor: its two values).

    Raises:
        ValueError: not two positive ints.
    """
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, Sequence) or isinstance(image_size, str) or len(image_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)):
        raise ValueError(f"image_size must be (height, width) in pixels (or one int for a square), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def unpadded_grid(config: Any, image_size: ImageSize) -> tuple[int, int]:
    """``(rows, cols)`` in patches of the tile grid an image of ``image_size`` ``(h, w)`` pixels
    (its original size) gets in a LLaVA-style model (``config``: ``vision_config``,
    ``image_grid_pinpoints``): the grid of its best pinpoint, unpadded to the image's aspect
    ratio, the arithmetic of upstream's ``select_best_resolution`` / ``unpad_image``."""
    h, w = image_hw(image_size)
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution([h, w], config.image_grid_pinpoints)
    rows, cols = best_h // tile * side, best_w // tile * side  # grid in patches
    # unpad_image: crop the padding the processor's resize-and-pad added on one axis
    if w / h > cols / rows:
        new_rows = int(round(h * (cols / w), 7))
        rows -= (rows - new_rows) // 2 * 2
    else:
        new_cols = int(round(w * (rows / h), 7))
        cols -= (cols - new_cols) // 2 * 2
    return rows, cols


def anyres_tiles(image_size: ImageSize, pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Tiles a LLaVA-style tower runs on for an image of ``image_size`` ``(h, w)`` pixels alone in
    its prompt: the base tile and the grid of its best pinpoint of ``pinpoints`` in ``tile``-pixel
    tiles (upstream's ``image_size_to_num_patches``)."""
    h, w = select_best_resolution(list(image_hw(image_size)), pinpoints)
    return -(-h // tile) * -(-w // tile) + 1


def check_pinpoints(processor: Any, config: Any) -> None:
    """A ``ValueError`` if ``processor``'s image processor has other ``image_grid_pinpoints``
    than the model's ``config``."""
    points = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
    if points != [list(p) for p in config.image_grid_pinpoints]:
        raise ValueError(f"the processor's image_grid_pinpoints {points} differ from the model's "
                         f"{config.image_grid_pinpoints}")


def placeholder_mask(base: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the image placeholders of the prompts, found as upstream's
    ``get_placeholder_mask`` finds them (the ids, else embeddings equal to the image token's)."""
    if input_ids is not None:
        return input_ids == base.config.image_token_id
    token = base.get_input_embeddings()(torch.tensor(base.config.image_token_id, device=inputs_embeds.device))
    return (inputs_embeds == token).all(-1)


@dataclass(frozen=True)
class FixedImageTokens:
    """A processor's ``replace_image_token`` that writes ``count`` placeholders for every image
    (LLaVA-NeXT's and LLaVA-OneVision's processors call it per image; set on the processor
    instance by :meth:`PackedSiteFamily.adapt_processor`; picklable)."""

    token: str
    count: int

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.token * self.count


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@dataclass(eq=False)
class Site:
    """What a :class:`PackedSiteFamily` patch put on the base model (its record's ``glue``): the
    method and budget its patched class reads, and the wiring of the pruning in the language
    model (:meth:`on_forward` is the base model's forward pre-hook with ``method="fastv"`` or
    ``"dart"``).

    Attributes:
        method: ``none``, ``tome``, ``crossget``, ``divprune``, ``fastv`` or ``dart``.
        keep: visual tokens per image (0 with ``none``).
        family: the family's name, in errors.
        counts: ``(base model, forward kwargs) -> [stock visual tokens per image]`` for a
            forward with ``pixel_values`` (a module-level function: picklable).
        fastv: the pruning in the language model (``method="fastv"``: FastV; ``"dart"``:
            :class:`crossget.methods.dart.DART`).
        handles: the hooks to remove.
    """

    method: str
    keep: int
    family: str = ""
    counts: Callable[[nn.Module, dict], list[int]] | None = None
    fastv: fastv.FastV | None = None
    handles: list = field(default_factory=list)

    @property
    def reduces(self) -> bool:
        """Reduced at the projector site (``tome`` / ``crossget`` / ``divprune``): ``keep`` tokens per image."""
        return self.method in SITE_METHODS

    def counting(self) -> str:
        """How many visual tokens an image gives, in errors."""
        return f"keep={self.keep} per image" if self.reduces else "the stock count per image"

    def on_forward(self, base: nn.Module, args: tuple, kwargs: dict) -> None:
        """FastV / DART: the image positions, the visual tokens per image (one count for the
        whole batch) and the ranking query (last real prompt token) of this forward.

        Raises:
            ValueError: the images give different counts, or fewer than ``keep``.
        """
        fv = self.fastv
        fv.set_prompt(None)
        if args:
            kwargs = {**_forward_signature(type(base)).bind_partial(base, *args).arguments, **kwargs}
        pixels = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            counts = [len(f) for f in encoded.pooler_output]
        elif pixels is not None and pixels.size(0) > 0:
            counts = self.counts(base, kwargs)
        else:
            return  # no images: a decode step (or text only; videos are not pruned)
        if len(set(counts)) > 1:
            raise ValueError(
                f"{self.method} on {self.family} ranks one count of visual tokens per image, but these images give "
                f"{counts}: batch images of the same size (tile grid), or use method='tome' / 'crossget' / 'divprune'"
            )
        if self.keep > counts[0]:
            raise ValueError(f"keep={self.keep} is more than the {counts[0]} visual tokens each image gives")
        fv.per_image = counts[0]
        fv.set_prompt(placeholder_mask(base, kwargs.get("input_ids"), kwargs.get("inputs_embeds")),
                      kwargs.get("attention_mask"), encoded)

    def __call__(self, base: nn.Module, args: tuple, kwargs: dict) -> None:
        self.on_forward(base, args, kwargs)


def reduce_images(
    features: Sequence[torch.Tensor], site: Site, sizes: Any = None, label: str = "size", arg: str = "image_size",
    reduce: Callable[..., tuple] = reduce_visual_tokens,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every image's ``[L_i, D]`` features reduced to ``site.keep`` tokens with ``site.method``
    (``reduce``, default :func:`reduce_visual_tokens`, called as ``reduce(features, keep,
    method)``; its first two results are taken): ``(tokens [keep, D] per image, first [keep]
    per image)``.

    Raises:
        ValueError: an image gives fewer than ``keep`` tokens, named with its row of ``sizes``
            (``[images, k]``, when given) as ``(label row)``; the error says to count them with
            ``crossget.image_tokens(model, arg)``.
    """
    tokens, firsts = [], []
    for i, f in enumerate(features):
        if site.keep > f.shape[0]:
            size = "" if sizes is None else f" ({label} {tuple(torch.as_tensor(sizes[i]).tolist())})"
            raise ValueError(
                f"keep={site.keep} is more than the {f.shape[0]} visual tokens image {i}{size} gives; "
                f"patch with a smaller keep (crossget.image_tokens(model, {arg}) on the stock model counts them)"
            )
        tok, first = reduce(f, site.keep, site.method)[:2]
        tokens.append(tok)
        firsts.append(first)
    return tokens, firsts


def reduce_packed(
    features: Sequence[torch.Tensor], lengths: torch.Tensor, site: Site, image_sizes: Any = None
) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
    """What ``pack_image_features`` returned, reduced at the site: with ``tome`` / ``crossget``
    / ``divprune`` each image's ``[L_i, D]`` features become ``[keep, D]`` (:func:`reduce_images`) and
    ``lengths`` ``[images]`` all ``keep``; otherwise both unchanged.

    Raises:
        ValueError: an image gives fewer than ``keep`` tokens (named, with its size from
            ``image_sizes`` ``[images, 2]`` when given).
    """
    if not site.reduces:
        return features, lengths
    return reduce_images(features, site, image_sizes)[0], torch.full_like(lengths, site.keep)


def check_placeholders(
    base: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor,
    site: Site,
) -> None:
    """A ``ValueError`` that says how to build prompts when their image placeholders are not
    the ``[N, D]`` ``image_features`` (all images, concatenated) of the patched model."""
    found, need = int(placeholder_mask(base, input_ids, inputs_embeds).sum()), image_features.shape[0]
    if found != need:
        per = site.counting()
        raise ValueError(
            f"the prompts hold {found} image placeholder tokens, but the images give {need} visual tokens "
            f"(the model is patched with method={site.method!r}: {per}): build prompts with "
            f"crossget.adapt_processor(processor, model), or repeat the image token "
            f"crossget.image_tokens(model, image_size) times per image"
        )


class PackedSiteModel:
    """The overrides a :class:`PackedSiteFamily`'s patched base model shares, put first among
    the bases of a subclass of the upstream model (``class LlavaNextModel(PackedSiteModel,
    hf.LlavaNextModel)``; the subclass keeps upstream's name, so that ``save_pretrained``
    writes the stock architecture). Reads its :class:`Site` from the crossget record."""

    def pack_image_features(self, image_features: Any, image_sizes: Any, *args: Any, **kwargs: Any) -> Any:
        """Upstream's packing, then (``tome``/``crossget``) each image's ``[L_i, D]`` features
        reduced to ``[keep, D]`` (:func:`reduce_packed`); returns ``(list of [keep, D], lengths [images])``."""
        features, lengths = super().pack_image_features(image_features, image_sizes, *args, **kwargs)
        return reduce_packed(features, lengths, record(self).glue, image_sizes)

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """Upstream's mask(s), after a check of the image placeholders whose error says how to
        build the prompts (:func:`check_placeholders`; other placeholders: upstream's check)."""
        if image_features is not None:
            check_placeholders(self, input_ids, inputs_embeds, image_features, record(self).glue)
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features, *args, **kwargs)


def site_and_lm_flops(
    text_config: Any, method: str, stock: int, keep: int, text_len: int, fastv_layer: int
) -> int:
    """Analytic FLOPs after the vision side of one prefill with one image of ``stock`` visual
    tokens: the projector-site matching rounds (``tome``/``crossget`` down to ``keep``: the
    similarity products; ``divprune``: its ``stock x stock`` distance matrix) and every LM
    layer (``text_config``, a Llama-style decoder) on the visual plus ``text_len`` text tokens
    (``fastv`` / ``dart``: layers from ``fastv_layer`` on with ``keep`` visual tokens; ``dart``
    adds :func:`dart_flops`)."""
    total = 0
    if method in SELECTING:
        total += 2 * stock * stock * text_config.hidden_size
    elif method in SITE_METHODS:
        n = stock
        while n > keep:  # the rounds of reduce_visual_tokens: bipartite (N/2)^2 or complete N^2 products
            pairs = (n // 2) * ((n + 1) // 2) if method == "tome" else n * n
            total += 2 * pairs * text_config.hidden_size
            n -= min(n - keep, n // 2)
    if method == "dart":
        total += dart_flops(text_config.hidden_size, stock, keep, text_len)
    visual = keep if method in SITE_METHODS else stock
    for layer in range(text_config.num_hidden_layers):
        n = keep if method in LM_METHODS and layer >= fastv_layer else visual
        total += decoder_layer_flops(text_config, n + text_len)
    return total


def dart_flops(width: int, stock: int, keep: int, text_len: int) -> int:
    """DART's selection cost for one image of ``stock`` tokens in an LM of ``width``: the
    cosine similarity of every image token to each of its pivots (``min(4, keep)`` image and
    ``min(4, text_len)`` text pivots), ``2 x pivots x stock x width`` (norms left out)."""
    pivots = min(dart.DEFAULT_PIVOTS, keep) + min(dart.DEFAULT_PIVOTS, text_len)
    return 2 * pivots * stock * width if keep < stock else 0


# --------------------------------------------------------------------------- the family logic
class SiteFamily(Family):
    """A multimodal LLM family whose budget is ``keep`` visual tokens per image, reduced at the
    projector site by :attr:`patched_class` (``tome``, ``crossget``, ``divprune``), or FastV /
    DART in the language model: budgets, ``flops=``, placeholders, the processor and patching.

    A subclass sets :attr:`name`, :attr:`classes` (``(the model with the LM head, the base
    model)``), :attr:`patched_class` (the base model's patched subclass), :attr:`processor_class`,
    :attr:`stock_counts`, :attr:`stock_image_tokens` and :attr:`prefill_flops` (module-level
    functions, as static methods), and implements :meth:`default_image` and
    :meth:`configure_processor`. The base model's language model is a Llama-style decoder
    (``.layers``).
    """

    methods = ("none", "tome", "crossget", "fastv", "divprune", "dart")
    # guidance: read only to refuse a rule (a resolved config names the authors' one)
    options = frozenset({"keep", "flops", "fastv_layer", "text_len", "image_size", "towers", "importance", "guidance",
                         "guidance_scale", "site"})
    importance = ("cross", "none")  # no cross tokens at the projector site: both run without
    default_guidance = "reference"  # nothing is guided here: whatever the encoders' default becomes
    patched_class: type = nn.Module
    processor_class: type = object
    depends_on: str = "the image size"  # what the stock count depends on, in errors
    size_hint: str = "give image_size=(height, width) to crossget.image_tokens"
    fastv_pre_hook: bool = True  # FastV's per-forward inputs from a forward pre-hook (else the patched forward sets them)
    # (base model, forward kwargs with pixel_values) -> stock tokens per image; a module-level function
    stock_counts: Callable[[nn.Module, dict], list[int]] | None = None

    # ---------------------------------------------------------------- per family
    def stock_image_tokens(self, model: nn.Module, image_size: Any) -> int:
        """Visual tokens the unpatched model gives an image of ``image_size``."""
        raise NotImplementedError

    def prefill_flops(self, model: nn.Module, method: str = "none", keep: int | None = None, image_size: Any = None,
                      text_len: int = DEFAULT_TEXT_LEN, fastv_layer: int = fastv.DEFAULT_LAYER) -> float:
        """Analytic FLOPs of one prefill with one image of ``image_size`` and ``text_len`` other prompt tokens."""
        raise NotImplementedError

    def default_image(self, model: nn.Module, image_size: Any) -> Any:
        """The image ``flops=`` budgets and token counts are planned for (``image_size``, or the
        family's default when None)."""
        raise NotImplementedError

    def configure_processor(self, processor: Any, model: nn.Module) -> None:
        """Check ``processor`` against the model (ValueError) and set its per-size counting as the model's."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def base_model(self, model: nn.Module) -> nn.Module:
        """The base model of ``model`` (``model.model`` for the model with the LM head, or
        ``model`` itself).

        Raises:
            TypeError: not one of the family's models.
        """
        outer, inner = self.classes
        if isinstance(model, outer):
            return model.model
        if isinstance(model, inner):
            return model
        raise TypeError(f"expected a {outer.__name__} or {inner.__name__}, got {type(model).__name__}")

    def site(self, model: nn.Module) -> Site | None:
        """What the patch installed on the base model (None if not patched)."""
        rec = record(self.base_model(model))
        return rec.glue if rec is not None and isinstance(rec.glue, Site) else None

    def image_label(self, model: nn.Module, image_size: Any) -> str:
        """How errors name an image of ``image_size``."""
        return f"an image of size {image_hw(image_size)}"

    def image_tokens(self, model: nn.Module, image_size: Any = None) -> int:
        """Image placeholders an image of ``image_size`` needs in the prompt, as the model is
        patched now: ``keep`` when reduced at the projector site (``tome``, ``crossget``,
        ``divprune``), else
        the stock count of :meth:`stock_image_tokens`.

        Raises:
            ValueError: no ``image_size`` where the count depends on it (stock, ``none``,
                ``fastv``, ``dart``), or ``keep`` is more than such an image gives.
        """
        s = self.site(model)
        if s is not None and s.reduces:
            if image_size is not None:
                check_keep(s.keep, self.stock_image_tokens(model, image_size), self.image_label(model, image_size))
            return s.keep
        if image_size is None:
            raise ValueError(f"{self.name}'s visual-token count depends on {self.depends_on}: {self.size_hint}")
        return self.stock_image_tokens(model, image_size)

    def adapt_processor(self, processor: Any, model: nn.Module) -> Any:
        """Make the family's processor write :meth:`image_tokens` placeholders per image; returns it.

        Reduced at the projector site: ``keep`` for every image (an instance attribute
        ``replace_image_token``, :class:`FixedImageTokens`); otherwise the processor's own
        per-size count (the attribute is removed), set up by :meth:`configure_processor`.
        Call it again after re-patching or unpatching.

        Raises:
            TypeError: ``processor`` is not the family's processor.
            ValueError: its settings (patch size, grid pinpoints, ...) differ from the model's.
        """
        if not isinstance(processor, self.processor_class):
            raise TypeError(f"expected a {self.processor_class.__name__}, got {type(processor).__name__}")
        self.configure_processor(processor, model)
        s = self.site(model)
        if s is not None and s.reduces:
            processor.replace_image_token = FixedImageTokens(processor.image_token, s.keep)
        else:
            processor.__dict__.pop("replace_image_token", None)  # the class's per-size count again
        return processor

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """None: no tower is patched (the reduction is at the projector site or in the LM)."""
        self.base_model(model)
        return {}

    def resolve_site(self, method: str, site: str | None) -> str | None:
        """The site ``method`` runs at with ``site=`` given (None: the method's default):
        ``"projector"``; None for the methods pruning inside the language model.

        Raises:
            ValueError: a site the family (or the method) does not have.
        """
        if method in LM_METHODS:
            if site is not None:
                raise ValueError(f"{method} prunes inside the language model: site= does not apply (got {site!r})")
            return None
        if site not in (None, "projector"):
            raise ValueError(f"{self.name} reduces at the projector site only: site must be 'projector' or None, "
                             f"got {site!r}")
        return "projector"

    def check_patch_keep(self, model: nn.Module, keep: Any, size: Any) -> int:
        """``keep`` checked when patching: an int no more than the planned image ``size`` gives."""
        return check_keep(keep, self.stock_image_tokens(model, size), f"{self.image_label(model, size)} (the reference size)")

    def solve_keep(self, model: nn.Module, target: float, method: str, size: Any, text_len: int,
                   fastv_layer: int) -> tuple[int, float]:
        """Largest ``keep`` whose :meth:`prefill_flops` are at most ``target`` x the stock ones,
        and that ratio.

        Raises:
            ValueError: even ``keep=1`` costs more.
        """
        ref = self.prefill_flops(model, "none", None, size, text_len)
        for keep in range(self.stock_image_tokens(model, size), 0, -1):
            ratio = self.prefill_flops(model, method, keep, size, text_len, fastv_layer) / ref
            if ratio <= target + 1e-12:
                return keep, ratio
        raise ValueError(f"flops={target} is out of reach for method={method!r} with a {text_len}-token prompt "
                         f"and {self.image_label(model, size)} (the vision side runs whole)")

    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """Budgets (give one): ``keep`` visual tokens per image, or ``flops`` a target ratio of
        :meth:`prefill_flops` for one image of ``image_size`` (default :meth:`default_image`)
        and ``text_len`` prompt tokens (default 64). ``fastv_layer``: the ``K`` of FastV and
        DART (pruned before LM layer ``K``).

        Raises:
            TypeError: not one of the family's models.
            ValueError: bad method, budget (not an int, zero, negative, more than
                :meth:`check_patch_keep` takes), towers, guidance or fastv_layer (FastV's /
                DART's only).
        """
        base = self.base_model(model)
        method = cfg.method
        site = self.resolve_site(method, cfg.site)
        if cfg.towers not in (None, ()):
            raise ValueError(f"{self.name} reduces at the projector site, no tower: towers must be None "
                             f"(or ()), got {cfg.towers!r}")
        if cfg.guidance not in (None, "reference") or cfg.guidance_scale not in (None, 1.0):
            raise ValueError(f"{self.name}'s projector-site matching has no importance to guide: "
                             f"guidance={cfg.guidance!r}, guidance_scale={cfg.guidance_scale!r} cannot apply")
        if cfg.keep is not None and cfg.flops is not None:
            raise ValueError("give keep= or flops=, not both")
        n_lm = len(base.language_model.layers)
        if cfg.fastv_layer is not None and method not in LM_METHODS:  # read by FastV / DART only
            raise ValueError(f"fastv_layer= is FastV's / DART's layer in the language model; method={method!r} "
                             f"runs at {self.name}'s projector site, which has no such setting")
        fastv_layer = fastv.DEFAULT_LAYER if cfg.fastv_layer is None else cfg.fastv_layer
        if method in LM_METHODS and (isinstance(fastv_layer, bool) or not isinstance(fastv_layer, int)
                                  or not 1 <= fastv_layer < n_lm):
            raise ValueError(f"fastv_layer must be an int in [1, {n_lm - 1}] for this {n_lm}-layer LM, got {fastv_layer!r}")
        size = self.default_image(model, cfg.image_size)
        text_len = DEFAULT_TEXT_LEN if cfg.text_len is None else cfg.text_len
        keep, estimate = cfg.keep, None
        if method == "none":
            keep = None
        elif cfg.flops is not None:
            keep, estimate = self.solve_keep(model, cfg.flops, method, size, text_len, fastv_layer)
        elif keep is None:
            raise ValueError("give keep= (visual tokens per image) or flops= (target prefill FLOPs ratio)")
        else:
            keep = self.check_patch_keep(model, keep, size)

        self.unpatch(model)
        s = Site(method, keep if keep is not None else 0, self.name, self.stock_counts)
        if method in LM_METHODS:
            # per_image is set by every forward (it depends on the images' size)
            prune = fastv.FastV if method == "fastv" else dart.DART
            s.fastv = prune(base.language_model, fastv_layer, keep, per_image=keep)
            s.handles = s.fastv.install()
            if self.fastv_pre_hook:
                s.handles.append(base.register_forward_pre_hook(s, with_kwargs=True))
        swap_class(base, self.patched_class, glue=s, handles=s.handles)
        return PatchConfig(
            method=method, keep=keep, flops=cfg.flops, flops_estimate=estimate, towers=(),
            importance="none" if method == "crossget" else cfg.importance,
            guidance=cfg.guidance, guidance_scale=cfg.guidance_scale,
            text_len=cfg.text_len if cfg.flops is None else text_len, image_size=cfg.image_size,
            fastv_layer=fastv_layer if method in LM_METHODS else None, site=site,
        )

    def unpatch(self, model: nn.Module) -> None:
        base = self.base_model(model)
        if self.site(model) is not None:
            unmark(base, TOWER_FIELDS + ("glue",))  # hooks removed, stock class back

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: Any = None
    ) -> dict[str, list[int]]:
        """Tokens in each LM layer (``language``) for one image of ``image_size`` (default
        :meth:`default_image`) and ``text_len`` other prompt tokens (default 64)."""
        s = self.site(model)
        text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
        visual = self.image_tokens(model, self.default_image(model, image_size))
        n_lm = len(self.base_model(model).language_model.layers)
        language = [visual + text_len] * n_lm
        if s is not None and s.method in LM_METHODS:
            language[s.fastv.layer:] = [s.keep + text_len] * (n_lm - s.fastv.layer)
        return {"language": language}


class PackedSiteFamily(SiteFamily):
    """A LLaVA-style family (anyres tiles, ``pack_image_features``) on :class:`SiteFamily`.

    A subclass sets what :class:`SiteFamily` asks (its :attr:`patched_class` a subclass of
    :class:`PackedSiteModel` and the upstream base model) and :attr:`tower_extra`. The base
    model's config is a LLaVA-NeXT-style one (``vision_config``, ``text_config``,
    ``image_grid_pinpoints``, ``vision_feature_layer``, ``vision_feature_select_strategy``,
    ``image_token_id``).
    """

    tower_extra: int = 1  # tokens per tile in the vision tower besides its patches (CLIP's CLS; SigLIP: 0)

    def reference_size(self, model: nn.Module) -> tuple[int, int]:
        """(height, width) the ``flops=`` budget is planned for by default: the largest grid
        pinpoint (by area; the first such), or the tower's tile size if there is none."""
        cfg = self.base_model(model).config
        points = [tuple(p) for p in (cfg.image_grid_pinpoints or [])]
        if not points:
            return cfg.vision_config.image_size, cfg.vision_config.image_size
        return max(points, key=lambda p: p[0] * p[1])

    def default_image(self, model: nn.Module, image_size: Any) -> Any:
        """``image_size``, or :meth:`reference_size` when None."""
        return self.reference_size(model) if image_size is None else image_size

    def tiles(self, model: nn.Module, image_size: ImageSize) -> int:
        """Tiles the tower runs on for an image of ``image_size`` alone in its prompt: the base
        tile and the grid of its best pinpoint (upstream's ``image_size_to_num_patches``)."""
        cfg = self.base_model(model).config
        return anyres_tiles(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def prefill_flops(self, model: nn.Module, method: str = "none", keep: int | None = None,
                      image_size: ImageSize | None = None, text_len: int = DEFAULT_TEXT_LEN,
                      fastv_layer: int = fastv.DEFAULT_LAYER) -> float:
        """Analytic FLOPs of one prefill with one image of ``image_size`` (default
        :meth:`reference_size`) and ``text_len`` other prompt tokens: the vision tower on every
        tile (patch embedding, all layers, ``tower_extra`` tokens besides the patches), the
        projector, then :func:`site_and_lm_flops` (the matching rounds, every LM layer)."""
        cfg = self.base_model(model).config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        size = self.reference_size(model) if image_size is None else image_hw(image_size)
        stock = self.stock_image_tokens(model, size)
        keep = stock if keep is None else keep
        tiles = self.tiles(model, size)
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        n0 = patches + self.tower_extra
        c = vcfg.hidden_size
        per_tile = 2 * patches * c * vcfg.num_channels * vcfg.patch_size**2
        per_tile += vcfg.num_hidden_layers * vit_layer_flops(c, vcfg.intermediate_size, n0, n0)
        total = tiles * per_tile
        layers = cfg.vision_feature_layer
        width_in = c * (1 if isinstance(layers, int) else len(layers))
        projected = tiles * (n0 - (cfg.vision_feature_select_strategy == "default"))  # "default" drops token 0
        total += 2 * projected * (width_in * tcfg.hidden_size + tcfg.hidden_size**2)
        return float(total + site_and_lm_flops(tcfg, method, stock, keep, text_len, fastv_layer))

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: Any = None
    ) -> dict[str, list[int]]:
        """Tokens in each LM layer (``language``, :meth:`SiteFamily.tokens_per_layer`) and in
        each tower layer (``vision``, per tile, unreduced)."""
        vcfg = self.base_model(model).config.vision_config
        vision = [(vcfg.image_size // vcfg.patch_size) ** 2 + self.tower_extra] * vcfg.num_hidden_layers
        return {"vision": vision, **super().tokens_per_layer(model, text_len, image_size)}
