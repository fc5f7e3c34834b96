"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``): fewer visual
tokens per image for the language model.

Qwen2.5-VL's vision tower embeds each image's ``t x h x w`` patches (``image_grid_thw``), runs
windowed and full attention blocks over them, and its patch merger folds every
``merge x merge`` block of patches into one token in the LM's width: image ``i`` gives
``L_i = t h w / merge^2`` tokens, written over ``L_i`` ``<|image_pad|>`` placeholders, and
the LM places them with 3-D M-RoPE positions (temporal, height, width) on that grid.

Budget: ``keep`` visual tokens per image, every image exactly ``keep`` whatever its size (or
``flops``, a ratio of the analytic prefill FLOPs of :func:`prefill_flops` for one square image
of ``image_size`` pixels, default :data:`DEFAULT_IMAGE`, solved into ``keep``).
Methods ``tome`` / ``crossget`` (and ``none``) at the projector site
(:func:`crossget.families.visual_site.reduce_visual_tokens`): after the merger, each image's
``L_i`` tokens are merged down to ``keep`` (ToMe's bipartite or CrossGET's complete-graph
matching, without cross tokens: training-free; nothing is guided, so the only guidance rule
taken is the authors', ``"reference"``). The tower and the merger run unreduced: merging
inside the tower would change the window partition and the merger's ``merge^2`` blocks.

Positions (M-RoPE). A merged token takes the ``(t, h, w)`` position of the smallest original
index it covers (``first`` of :func:`reduce_visual_tokens`: the group's first token in
raster order on the merged grid, the order of the merger's output); text after an image
keeps the position it has in the stock model (the position advances by ``max(h, w) / merge``
per image, as upstream's ``get_rope_index``), so the text, the rope deltas and decoding are
placed as in the stock model. Only the visual
positions depend on which tokens were kept, so they are computed from the images of each
forward: the patched ``get_image_features`` returns, with the reduced tokens, each image's
grid and ``first`` (:class:`KeptTokens`, attached to the encoder output, which ``generate``
keeps across steps and expands for beams); the patched ``forward`` encodes raw
``pixel_values`` first, then computes the 3-D positions of its prompts from them (replacing
the three M-RoPE rows of any ``position_ids`` given: ``generate`` computes them before the
images are encoded, with stand-ins in the visual columns; the text row it adds stays).
Nothing about the images is kept on the model between forwards (besides upstream's own
``rope_deltas``, set as upstream sets them). Videos are not reduced (their tokens and
positions are upstream's); a forward with reduced images and videos needs ``video_grid_thw``
(which ``generate`` drops once it has encoded them: refused with a ``ValueError``), and
``generate``'s chunked prefill (``prefill_chunk_size``), which slices the encoder output,
is refused too.

``fastv`` (:mod:`crossget.methods.fastv`): the prompt keeps the stock placeholders and
positions; after LM layer ``K`` only ``keep`` visual tokens per image stay. Qwen's M-RoPE
needs nothing of FastV: the LM's rotary embedding folds the three position rows (mrope
sections) into one ``cos``/``sin`` ``[B, S, head_dim]`` before the layers, which FastV's
ranking (``rotate_half``, as upstream's ``apply_rotary_pos_emb``) and its gathering of the
kept tokens' rotary rows read as for Llama. FastV ranks a fixed count of tokens per image,
so every image in a batch must give the same ``t h w / merge^2`` (e.g. the same grid); a
batch that mixes counts raises a ``ValueError``.

Prompts need :func:`image_tokens` placeholders per image (``keep`` when reduced, the stock
``t h w / merge^2`` otherwise), which :func:`adapt_processor` makes a ``Qwen2_5_VLProcessor``
write (its ``mm_token_type_ids`` follow the placeholders); a mismatch raises a ``ValueError``
that says so. The patch swaps the ``Qwen2_5_VLModel`` instance's class to a subclass
(:class:`Qwen2_5_VLModel`, same name, so ``save_pretrained`` writes the stock architecture)
overriding ``forward``, ``get_image_features``, ``get_rope_index`` and
``get_placeholder_mask``. Upstream's ``Qwen2_5_VLModel`` records no outputs itself (no
``_can_record_outputs``; its forward is not under ``capture_outputs``): hidden states and
attentions are captured by the vision tower and the language model, whose classes stay, so
output capture is unaffected. Unpatching restores the class.

The module's :func:`base_model`, :func:`site`, :func:`adapt_processor` (which checks the
image processor's patch, merge and temporal patch sizes against the model's) and
:func:`image_tokens` are those of :data:`FAMILY`
(:class:`~crossget.families.visual_site.SiteFamily`, shared with LLaVA-NeXT and OneVision).

Shapes: ``L`` visual tokens of one image, ``D`` the LM's width, ``B`` prompts of length ``S``.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from crossget.families.visual_site import (
    DEFAULT_TEXT_LEN,
    Site,
    SiteFamily,
    check_keep,
    check_placeholders,
    reduce_images,
    site_and_lm_flops,
)
from crossget.methods import fastv
from crossget.record import ATTR, record

__all__ = [
    "FAMILY",
    "KeptPositionsForward",
    "KeptTokens",
    "Qwen2_5_VLModel",
    "adapt_processor",
    "image_tokens",
    "kept_tokens",
    "prefill_flops",
    "qwen2_5_stock_rope_index",
    "rope_index",
    "stock_image_tokens",
    "vision_tower_flops",
    "vision_positions",
]

# the Qwen2-VL image processor's defaults (shortest_edge / longest_edge, in pixels): the
# resize an image of a given size gets when image_tokens is asked by size
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280

DEFAULT_IMAGE = 448  # pixels: the square image flops= is planned for (and token counts reported at) by default
ImageSpec = Sequence[int] | torch.Tensor  # a grid row (t, h, w) in patches, or an image size (height, width) in pixels


# --------------------------------------------------------------------------- anatomy
def _grid(model: nn.Module, image: ImageSpec) -> tuple[int, int, int]:
    """``(t, h, w)`` in patches (:meth:`QwenVLFamily.grid`)."""
    return FAMILY.grid(model, image)


def stock_image_tokens(model: nn.Module, image: ImageSpec) -> int:
    """Visual tokens the unpatched model gives an image: ``t h w / merge^2`` for its
    ``image_grid_thw`` row ``(t, h, w)``, or for an image size ``(height, width)`` in pixels
    after the image processor's default resize."""
    return FAMILY.stock_image_tokens(model, image)


def stock_counts(base: nn.Module, kwargs: dict) -> list[int]:
    """Stock visual tokens per image of a forward's ``image_grid_thw`` (FastV's
    :attr:`crossget.families.visual_site.Site.counts`)."""
    return [stock_image_tokens(base, g) for g in kwargs["image_grid_thw"]]


# --------------------------------------------------------------------------- positions
@dataclass(eq=False)
class KeptTokens:
    """What the patched ``get_image_features`` kept of each image, attached to its output
    (``output._crossget``) so that a forward fed that output can place the tokens.

    Attributes:
        tokens: the reduced tokens per image, ``[keep, D]`` each (the very tensors of
            ``pooler_output``: ``generate`` repeats them for beams, they are found by identity).
        grids: ``[images, 3]`` each image's ``image_grid_thw`` row.
        first: per image, ``[keep]`` the smallest index (raster order on the merged grid)
            each kept token covers.
    """

    tokens: tuple[torch.Tensor, ...]
    grids: torch.Tensor
    first: tuple[torch.Tensor, ...]

    def layout(self, pooler_output: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Grids ``[n, 3]`` and ``first`` of the images of ``pooler_output`` (this output's own
        tensors, possibly repeated and reordered, as ``generate`` expands them for beams).

        Raises:
            ValueError: a tensor that this output did not produce.
        """
        index = []
        for t in pooler_output:
            i = next((j for j, mine in enumerate(self.tokens) if mine is t), None)
            if i is None:
                raise ValueError("mm_encoder_outputs['image'] holds visual tokens that crossget's "
                                 "get_image_features did not produce: encode the images with the patched model "
                                 "(model.get_image_features) and pass its output unchanged")
            index.append(i)
        return self.grids[index], [self.first[i] for i in index]


def kept_tokens(output: Any) -> KeptTokens | None:
    """The :class:`KeptTokens` of an image-encoder output of the patched model (None if it
    was not reduced by crossget)."""
    kept = getattr(output, "__dict__", {}).get(ATTR)
    return kept if isinstance(kept, KeptTokens) else None


def vision_positions(base: hf.Qwen2_5_VLModel, start: int, grid: torch.Tensor,
                     first: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, n]`` M-RoPE positions of one image's tokens starting at ``start``: upstream's
    ``get_vision_position_ids`` on the merged grid, at the kept tokens' ``first`` indices
    (``n = len(first)``; all ``t h w / merge^2`` tokens when None)."""
    merge = base.config.vision_config.spatial_merge_size
    pos = base.get_vision_position_ids(start, grid, 1, merge, 1, device=grid.device)
    return pos if first is None else pos[:, first.to(pos.device)]


def qwen2_5_stock_rope_index(base: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                             image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                             second_per_grid_ts: torch.Tensor | None,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream Qwen2.5-VL's ``get_rope_index`` (:func:`rope_index`'s default ``upstream``)."""
    return hf.Qwen2_5_VLModel.get_rope_index(base, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts, attention_mask=attention_mask)


def rope_index(base: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
               image_grid_thw: torch.Tensor | None, image_first: Sequence[torch.Tensor] | None,
               keep: int, video_grid_thw: torch.Tensor | None = None,
               second_per_grid_ts: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, *,
               upstream: Callable[..., tuple[torch.Tensor, torch.Tensor]] = qwen2_5_stock_rope_index,
               video_runs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``get_rope_index`` on the stock layout of the prompts, at the kept tokens.

    Each prompt (its real tokens) is expanded to the stock layout (image ``i``'s ``keep``
    placeholders back to its ``t h w / merge^2``), upstream's ``get_rope_index`` places the
    expanded prompts, and each column of a prompt takes the stock position of what it stands
    for: text and videos their own, image ``i``'s kept tokens those of ``image_first[i]``
    (without ``image_first``: the first ``keep`` in raster order, stand-ins that the forward
    replaces). So the position after each image and the largest position are the stock
    model's; the rope delta (largest position + 1 - the prompt's length) is the stock one plus
    the tokens the prompt has fewer.

    ``upstream`` ``(base, ids, types, image_grid_thw, video_grid_thw, second_per_grid_ts,
    attention_mask) -> (positions, deltas)`` places the stock-layout prompts (default
    Qwen2.5-VL's; Qwen3-VL passes its own); ``video_runs`` is the number of video
    placeholder runs the prompts may hold (default one per ``video_grid_thw`` row; Qwen3-VL
    writes one run per frame).

    Returns:
        ``(position_ids [3, B, S], rope_deltas [B, 1])``.

    Raises:
        ValueError: an image's placeholder run is not ``keep`` long, the prompts hold more
            images than ``image_grid_thw`` rows, or videos without ``video_grid_thw`` rows.
    """
    merge = base.config.vision_config.spatial_merge_size
    images = iter(range(len(image_grid_thw))) if image_grid_thw is not None else iter(())
    videos = (len(video_grid_thw) if video_grid_thw is not None else 0) if video_runs is None else video_runs
    rows, columns, reduced = [], [], []  # per prompt: stock-layout (ids, types), its kept columns, real tokens
    for b in range(input_ids.shape[0]):
        ids, types = input_ids[b], mm_token_type_ids[b]
        if attention_mask is not None:
            ids, types = ids[attention_mask[b].bool()], types[attention_mask[b].bool()]
        x_ids, x_types, kept, at = [], [], [], 0
        for kind, group in itertools.groupby(types.tolist()):
            n = len(list(group))
            run = ids[at:at + n].tolist()
            cols = range(len(x_ids), len(x_ids) + n)
            if kind == 1:  # an image: keep placeholders back to the stock count, kept at first
                i = next(images, None)
                if i is None:
                    raise ValueError("the prompts hold more images (placeholder runs) than image_grid_thw rows")
                if n != keep:
                    raise ValueError(
                        f"image {i} has {n} placeholder tokens in the prompt, but the model is patched with "
                        f"keep={keep} visual tokens per image: build prompts with crossget.adapt_processor(processor, "
                        f"model), or repeat the image token crossget.image_tokens(model) times per image")
                first = image_first[i] if image_first is not None else torch.arange(keep)
                cols = [len(x_ids) + j for j in first.tolist()]
                run = run[:1] * (int(image_grid_thw[i].prod()) // merge**2)
            elif kind == 2:  # a video, as upstream
                videos -= 1
                if videos < 0:
                    raise ValueError("a prompt with reduced images and videos needs video_grid_thw in the forward "
                                     "(generate drops it after encoding: reduced images and videos cannot be generated "
                                     "together)")
            x_ids += run
            x_types += [kind] * len(run)
            kept += cols
            at += n
        rows.append((x_ids, x_types))
        columns.append(kept)
        reduced.append(at)
    width = max(len(r[0]) for r in rows)
    stock_ids = input_ids.new_zeros(len(rows), width)
    stock_types = torch.zeros_like(stock_ids)
    stock_mask = torch.zeros_like(stock_ids)
    for b, (r_ids, r_types) in enumerate(rows):  # left-padded, as the prompts
        stock_ids[b, width - len(r_ids):] = torch.tensor(r_ids, dtype=stock_ids.dtype)
        stock_types[b, width - len(r_ids):] = torch.tensor(r_types, dtype=stock_ids.dtype)
        stock_mask[b, width - len(r_ids):] = 1
    stock, deltas = upstream(base, stock_ids, stock_types, image_grid_thw, video_grid_thw, second_per_grid_ts,
                             stock_mask)
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    for b, kept in enumerate(columns):
        row = stock[:, b, width - len(rows[b][0]):][:, kept]
        if attention_mask is not None:
            position_ids[:, b, attention_mask[b].bool()] = row.to(position_ids)
        else:
            position_ids[:, b] = row.to(position_ids)
    fewer = torch.tensor([len(r[0]) - n for r, n in zip(rows, reduced)], device=deltas.device)
    return position_ids, deltas + fewer.unsqueeze(1)


# --------------------------------------------------------------------------- FLOPs model
def _windows(tokens: int, side: int) -> list[int]:
    """Sizes of upstream's windows along one axis of ``tokens`` merged tokens (``side`` each)."""
    return [side] * (tokens // side) + ([tokens % side] if tokens % side else [])


def vision_tower_flops(model: nn.Module, image: ImageSpec) -> float:
    """Analytic FLOPs (2 x multiply-adds) of the vision tower and patch merger on one image
    (grid row ``(t, h, w)`` or size ``(height, width)``): the patch embedding, every block
    (QKV and output projections, attention within each window or, in the full-attention
    blocks, over the whole image, the gated MLP) and the merger's MLP."""
    vcfg = base_model(model).config.vision_config
    t, h, w = _grid(model, image)
    n, c, merge = t * h * w, vcfg.hidden_size, vcfg.spatial_merge_size
    patch_in = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    side = vcfg.window_size // merge // vcfg.patch_size  # merged tokens per window side
    windowed = t * sum((a * b * merge * merge) ** 2 for a in _windows(h // merge, side) for b in _windows(w // merge, side))
    total = 2 * n * patch_in * c
    for layer in range(vcfg.depth):
        pairs = t * (h * w) ** 2 if layer in vcfg.fullatt_block_indexes else windowed  # attention is per frame
        total += 8 * n * c * c + 4 * pairs * c + 6 * n * c * vcfg.intermediate_size
    wide = c * merge * merge
    total += 2 * (n // merge ** 2) * (wide * wide + wide * vcfg.out_hidden_size)
    return float(total)


def prefill_flops(
    model: nn.Module,
    method: str = "none",
    keep: int | None = None,
    image: ImageSpec | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
    fastv_layer: int = fastv.DEFAULT_LAYER,
) -> float:
    """Analytic FLOPs of one prefill with one image (grid row or ``(height, width)``; default
    a ``DEFAULT_IMAGE``-pixel square) and ``text_len`` other prompt tokens:
    :func:`vision_tower_flops`, the projector-site matching rounds (``tome``/``crossget``: the
    similarity products), and every LM layer on the visual plus text tokens (``fastv``: layers
    from ``K`` on with ``keep`` visual tokens). The LM head is left out, as for LLaVA."""
    return FAMILY.prefill_flops(model, method, keep, image, text_len, fastv_layer)


# --------------------------------------------------------------------------- the patched model
class KeptPositionsForward:
    """The overrides a patched Qwen-VL base model shares (put first among the bases of a
    subclass of the upstream model, as :class:`Qwen2_5_VLModel`): the forward, in which the
    images are encoded and reduced before the prompts are placed, ``get_image_features``
    (output carrying :class:`KeptTokens`) and ``get_placeholder_mask``. The subclass sets
    :attr:`forward_signature` (upstream's ``forward``), implements :meth:`reduce_features`
    and overrides ``get_rope_index`` (taking ``image_first``); :meth:`encode_first` may encode
    more before the images."""

    forward_signature: inspect.Signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Upstream's forward; with ``tome``/``crossget`` the images are encoded (and reduced)
        first, so that the 3-D positions ``[3, B, S]`` of this forward's prompts are computed
        from the tokens kept of its images (the patched ``get_rope_index`` with ``image_first``),
        replacing the M-RoPE rows of any ``position_ids`` given; with ``fastv`` its per-forward inputs are set
        (:meth:`crossget.families.visual_site.Site.on_forward`)."""
        s = record(self).glue
        if not s.reduces and s.fastv is None:
            return super().forward(*args, **kwargs)
        kw = self.forward_signature.bind(self, *args, **kwargs).arguments
        kw.pop("self")
        extra = kw.pop("kwargs", {})
        if s.fastv is not None:
            s.on_forward(self, (), kw)  # every argument bound by name: this forward's FastV inputs
            return super().forward(**kw, **extra)
        self.encode_first(kw, extra)
        mm = dict(kw.get("mm_encoder_outputs") or {})
        pixels = kw.get("pixel_values")
        if pixels is not None:
            if mm.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs['image']")
            mm["image"] = self.get_image_features(pixels, kw.get("image_grid_thw"), return_dict=True, **extra)
            kw["pixel_values"] = None
        encoded = mm.get("image")
        if encoded is not None:
            kw["mm_encoder_outputs"] = mm
            kept = kept_tokens(encoded)
            if kept is None:
                raise ValueError("mm_encoder_outputs['image'] were not encoded by the patched model (or were sliced, "
                                 "as generate's chunked prefill does: use prefill_chunk_size=None): encode the "
                                 "images with model.get_image_features after crossget.patch")
            grids, first = kept.layout(encoded.pooler_output)
            kw["position_ids"] = self._kept_positions(kw, grids, first)
        return super().forward(**kw, **extra)

    def reducing_site(self) -> Site | None:
        """The :class:`Site` the patch put on this model when it reduces at the projector site
        (``tome``, ``crossget``, ``divprune``), else None."""
        rec = record(self)
        s = rec.glue if rec is not None else None
        return s if isinstance(s, Site) and s.reduces else None

    def encode_first(self, kw: dict, extra: dict) -> None:
        """What a forward with reduced images encodes before them, in place in its bound
        arguments ``kw`` (``extra``: its other keyword arguments): nothing here."""

    def reduce_features(self, out: Any, site: Site, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Reduce upstream's image-encoder output ``out`` in place (``pooler_output`` a tuple of
        ``[keep, D]``) and return each image's ``first`` ``[keep]``.

        Raises:
            ValueError: ``keep`` is more than an image gives.
        """
        raise NotImplementedError

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None,
                           **kwargs: Any) -> Any:
        """Upstream's features, then (``tome``/``crossget``) each image's ``[L_i, D]`` tokens
        reduced to ``[keep, D]`` (:meth:`reduce_features`): ``pooler_output`` is a tuple of
        ``[keep, D]``, and the output carries the grids and kept indices (:class:`KeptTokens`,
        :func:`kept_tokens`).

        Raises:
            ValueError: ``keep`` is more than an image gives.
        """
        s = self.reducing_site()
        return_dict = kwargs.pop("return_dict", None)
        out = super().get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        if s is not None:
            firsts = self.reduce_features(out, s, image_grid_thw)
            out.__dict__[ATTR] = KeptTokens(tuple(out.pooler_output), image_grid_thw.detach().clone(), tuple(firsts))
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return out.to_tuple()
        return out

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor | None = None,
                             video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's masks ``([B, S, 1], [B, S, 1])``, after a check whose error says how to
        build the prompts (``image_features``: ``[visual tokens, D]``)."""
        if image_features is not None:
            check_placeholders(self, input_ids, inputs_embeds, image_features, record(self).glue)
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features, video_features)

    def _kept_positions(self, kw: dict, grids: torch.Tensor, first: list[torch.Tensor]) -> torch.Tensor:
        """3-D positions for a forward whose images were reduced (given text row kept)."""
        ids, types = kw.get("input_ids"), kw.get("mm_token_type_ids")
        if ids is None or types is None:
            raise ValueError("reduced images are placed by their prompts: give input_ids and mm_token_type_ids "
                             "(as the processor writes them) with the images")
        cache = kw.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("crossget places the reduced images of a prompt from its start: a prompt with images "
                             "cannot continue a filled KV cache")
        mask = kw.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        pos, deltas = self.get_rope_index(ids, types, image_grid_thw=grids, video_grid_thw=kw.get("video_grid_thw"),
                                          second_per_grid_ts=kw.get("second_per_grid_ts"), attention_mask=mask,
                                          image_first=first)
        self.rope_deltas = deltas  # as upstream's compute_3d_position_ids does, for a later cached decode
        given = kw.get("position_ids")
        if given is not None and given.dim() == 3 and given.shape[0] == 4:
            pos = torch.cat([given[:1], pos.to(given)], 0)  # the text row generate adds (packed masks) stays
        return pos


class Qwen2_5_VLModel(KeptPositionsForward, hf.Qwen2_5_VLModel):  # noqa: N801 (upstream's name: save_pretrained writes the stock architecture)
    """The patched ``Qwen2_5_VLModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture). Reads its :class:`Site` from the
    crossget record; with ``method="none"`` every method is upstream's."""

    forward_signature = inspect.signature(hf.Qwen2_5_VLModel.forward)

    def reduce_features(self, out: Any, site: Site, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each image's ``[L_i, D]`` tokens of ``out.pooler_output`` reduced to ``[keep, D]``
        (:func:`~crossget.families.visual_site.reduce_images`), in place; returns each image's
        ``first`` ``[keep]``.

        Raises:
            ValueError: ``keep`` is more than an image gives.
        """
        tokens, firsts = reduce_images(out.pooler_output, site, image_grid_thw, "image_grid_thw", "grid")
        out.pooler_output = tuple(t.to(f.dtype) for t, f in zip(tokens, out.pooler_output))
        return firsts

    def get_rope_index(self, input_ids: torch.LongTensor, mm_token_type_ids: torch.IntTensor,
                       image_grid_thw: torch.LongTensor | None = None, video_grid_thw: torch.LongTensor | None = None,
                       second_per_grid_ts: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       image_first: Sequence[torch.Tensor] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's 3-D positions, with ``keep`` tokens per image at the stock positions of
        ``image_first`` (per image, ``[keep]``: :class:`KeptTokens`). Without ``image_first``
        (``generate`` asks before the images are encoded) the visual columns are stand-ins,
        which the forward that encodes the images replaces; text positions and the rope deltas
        do not depend on it. Returns ``(position_ids [3, B, S], rope_deltas [B, 1])``."""
        s = self.reducing_site()
        if s is None:
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                          second_per_grid_ts, attention_mask, **kwargs)
        return rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, image_first, s.keep,
                          video_grid_thw, second_per_grid_ts, attention_mask)

# --------------------------------------------------------------------------- the family
class QwenVLFamily(SiteFamily):
    """Qwen2.5-VL: the budget is the visual tokens per image that reach the language model
    (``keep`` more than an image gives is refused at the forward that sees it).

    The Qwen-VL pieces a later family (Qwen3-VL, a subclass) builds on: images given by grid
    row or size (:meth:`grid`, resized within :attr:`min_pixels` / :attr:`max_pixels`), the
    stock count, the prefill FLOPs (:attr:`vision_tower_flops`, a module-level function, as a
    static method), the default image and the processor's check."""

    name = "Qwen2.5-VL"
    classes = (hf.Qwen2_5_VLForConditionalGeneration, hf.Qwen2_5_VLModel)
    patched_class = Qwen2_5_VLModel
    processor_class = Qwen2_5_VLProcessor
    depends_on = "the image"
    size_hint = "give its image_grid_thw row (t, h, w) or its size (height, width) to crossget.image_tokens"
    fastv_pre_hook = False  # the patched forward sets FastV's per-forward inputs
    stock_counts = staticmethod(stock_counts)
    vision_tower_flops = staticmethod(vision_tower_flops)
    min_pixels, max_pixels = MIN_PIXELS, MAX_PIXELS  # the image processor's resize bounds (areas, in pixels)
    default_size = DEFAULT_IMAGE  # pixels: the square image flops= and token counts are planned for by default

    def grid(self, model: nn.Module, image: ImageSpec) -> tuple[int, int, int]:
        """``(t, h, w)`` in patches: a grid row as given, or an image size ``(height, width)``
        resized as the image processor does by default (:attr:`min_pixels`, :attr:`max_pixels`).

        Raises:
            ValueError: neither a grid row nor an image size of positive ints.
        """
        if isinstance(image, torch.Tensor):
            image = image.tolist()
        ok = isinstance(image, Sequence) and len(image) in (2, 3) and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image)
        if not ok:
            raise ValueError(f"give an image_grid_thw row (t, h, w) in patches or an image size (height, width) in "
                             f"pixels, got {image!r}")
        if len(image) == 3:
            return int(image[0]), int(image[1]), int(image[2])
        vcfg = self.base_model(model).config.vision_config
        patch, merge = vcfg.patch_size, vcfg.spatial_merge_size
        # the processor's smart_resize: sides multiples of patch*merge, area within bounds (imported
        # here: its module needs Pillow, which the model does not)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(int(image[0]), int(image[1]), factor=patch * merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return 1, h // patch, w // patch

    def stock_image_tokens(self, model: nn.Module, image: ImageSpec) -> int:
        """Visual tokens the unpatched model gives an image: ``t h w / merge^2`` for its grid
        row ``(t, h, w)``, or for an image size ``(height, width)`` after the resize of :meth:`grid`."""
        t, h, w = self.grid(model, image)
        return t * h * w // self.base_model(model).config.vision_config.spatial_merge_size ** 2

    def prefill_flops(self, model: nn.Module, method: str = "none", keep: int | None = None,
                      image: ImageSpec | None = None, text_len: int = DEFAULT_TEXT_LEN,
                      fastv_layer: int = fastv.DEFAULT_LAYER) -> float:
        """Analytic FLOPs of one prefill with one image (default a :attr:`default_size`-pixel
        square) and ``text_len`` other prompt tokens: :attr:`vision_tower_flops`, the matching
        rounds and every LM layer (:func:`crossget.families.visual_site.site_and_lm_flops`)."""
        tcfg = self.base_model(model).config.text_config
        image = (self.default_size, self.default_size) if image is None else image
        stock = self.stock_image_tokens(model, image)
        keep = stock if keep is None else keep
        return float(self.vision_tower_flops(model, image)
                     + site_and_lm_flops(tcfg, method, stock, keep, text_len, fastv_layer))

    def image_label(self, model: nn.Module, image_size: ImageSpec) -> str:
        return f"an image with grid {self.grid(model, image_size)}"

    def default_image(self, model: nn.Module, image_size: Any) -> Any:
        """``image_size`` (a grid row, ``(height, width)`` or a square's side), default a
        :attr:`default_size`-pixel square."""
        image = self.default_size if image_size is None else image_size
        return (image, image) if isinstance(image, int) else image

    def check_patch_keep(self, model: nn.Module, keep: Any, size: Any) -> int:
        return check_keep(keep)  # more than an image gives: refused at the forward that sees it

    def configure_processor(self, processor: Any, model: nn.Module) -> None:
        """The image processor's patch, merge and temporal patch sizes checked against the model's.

        Raises:
            ValueError: one differs from the model's.
        """
        vcfg = self.base_model(model).config.vision_config
        ip = processor.image_processor
        for name, mine in (("patch_size", vcfg.patch_size), ("merge_size", vcfg.spatial_merge_size),
                           ("temporal_patch_size", vcfg.temporal_patch_size)):
            theirs = getattr(ip, name, None)
            if theirs is not None and theirs != mine:
                raise ValueError(f"the image processor's {name} is {theirs}, the model's is {mine}")


FAMILY = QwenVLFamily()
base_model, site, adapt_processor, solve_keep = FAMILY.base_model, FAMILY.site, FAMILY.adapt_processor, FAMILY.solve_keep


def image_tokens(model: nn.Module, image: ImageSpec | None = None) -> int:
    """``<|image_pad|>`` placeholders an image needs in the prompt, as the model is patched
    now (:meth:`~crossget.families.visual_site.SiteFamily.image_tokens`). ``image``: its
    ``image_grid_thw`` row ``(t, h, w)``, or its size ``(height, width)`` in pixels."""
    return FAMILY.image_tokens(model, image)
