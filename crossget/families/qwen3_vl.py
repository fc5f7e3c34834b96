"""Qwen3-VL (``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): fewer visual tokens per
image for the language model, the deep-stack features reduced with the same groups.

Qwen3-VL's vision tower embeds each image's ``t x h x w`` patches (``image_grid_thw``), runs
full-attention blocks over them, and its patch merger folds every ``merge x merge`` block of
patches into one token in the LM's width: image ``i`` gives ``L_i = t h w / merge^2`` tokens,
written over ``L_i`` ``<|image_pad|>`` placeholders and placed with interleaved 3-D M-RoPE
positions. Besides, the outputs of the blocks ``deepstack_visual_indexes`` go each through
their own merger (``deepstack_merger_list``): one more ``[L_i, D]`` per image and level, which
the LM adds to its hidden states at the visual positions (``visual_pos_masks``) after its
first layers (level ``k`` after layer ``k``; upstream's ``_deepstack_process``).

Budget: ``keep`` visual tokens per image, every image exactly ``keep`` (or ``flops``, a ratio
of :func:`prefill_flops` for one square image of ``image_size`` pixels, default
:data:`DEFAULT_IMAGE`). Methods ``tome`` / ``crossget`` (and ``none``) at the projector site,
as for Qwen2.5-VL (:mod:`crossget.families.qwen_vl`): after the merger, each image's ``L_i``
main tokens are merged down to ``keep`` (:func:`reduce_with_groups`, the rounds of
:func:`crossget.families.visual_site.reduce_visual_tokens`, recorded). The groups found on the
main tokens are then applied to every deep-stack level of the same image (:class:`Groups`:
the same merges, the same size-weighted averages, the same order), so each level has exactly
``keep`` tokens per image, aligned with the kept main tokens: the LM adds to each kept token
the average of the deep-stack features of the tokens it covers (``visual_pos_masks`` marks
the ``keep`` placeholders per image).

Positions (M-RoPE): as for Qwen2.5-VL (:func:`crossget.families.qwen_vl.rope_index`, with
upstream Qwen3-VL's ``get_rope_index`` placing the re-expanded stock prompts): a merged token
takes the position of the first token it covers, text keeps its stock position, rope deltas
and decoding follow the stock layout; the patched forward (shared,
:class:`crossget.families.qwen_vl.KeptPositionsForward`) encodes the images before placing
them. Videos are not reduced (Qwen3-VL writes one placeholder run per frame, between
timestamps; upstream encodes videos with ``get_image_features``, so the patched
``get_video_features`` runs the stock one, and the patched forward encodes raw videos
before the images, since Qwen3-VL refuses raw videos beside ``mm_encoder_outputs``); a
forward with reduced images and videos runs, ``generate`` of such a prompt is refused
(it drops ``video_grid_thw`` once it has encoded them), and so is chunked prefill, as for
Qwen2.5-VL.

``fastv`` (:mod:`crossget.methods.fastv`) in the language model, with two Qwen3 specifics:

- Qwen3's attention normalises queries and keys per head (``q_norm`` / ``k_norm``) before the
  rotary embedding: FastV's ranking reads the normalised ones (:class:`NormedCapture` hooks
  the norms' outputs), so it ranks by the attention the model computes;
- deep-stack injection writes at the stock visual positions of the full sequence after LM
  layers ``0 .. levels - 1``; once FastV has pruned (at the input of layer ``K``) those
  positions are gone, so ``fastv_layer`` must be at least the number of deep-stack levels
  (``len(deepstack_visual_indexes)``: 3 for the released models, so ``K >= 3``); a smaller
  ``K`` is refused with a ``ValueError`` at patch time. With ``K >= levels`` every injection
  happens on the full sequence, before pruning, as in the stock model.

FastV ranks one count of tokens per image: a batch mixing counts is refused. DART
(``method="dart"``, FastV's pruning with DART's rule, which applies ``k_norm`` itself) takes
the same ``fastv_layer`` condition. DivPrune (``method="divprune"``, a selection at the
projector site) keeps the same indices on every deep-stack level.

Placeholders: :func:`image_tokens` (``keep`` when reduced, the stock ``t h w / merge^2``
otherwise); :func:`adapt_processor` makes a ``Qwen3VLProcessor`` write them. The patch swaps
the ``Qwen3VLModel`` instance's class to :class:`Qwen3VLModel` (same name: ``save_pretrained``
writes the stock architecture), overriding ``forward``, ``get_image_features``,
``get_video_features``, ``get_rope_index`` and ``get_placeholder_mask``; output capture is
the vision tower's and the language model's, whose classes stay. Unpatching restores it.

A budget by size (``image_tokens(model, (height, width))``, ``flops=`` with ``image_size``)
resizes as Qwen3-VL's released preprocessor does (:data:`MIN_PIXELS`, :data:`MAX_PIXELS`:
areas from 256 x 256 to 4096 x 4096, sides multiples of ``patch x merge``).

Shapes: ``L`` visual tokens of one image, ``D`` the LM's width, ``B`` prompts of length ``S``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from crossget.config import PatchConfig
from crossget.families.qwen_vl import KeptPositionsForward, QwenVLFamily, rope_index
from crossget.families.visual_site import (
    DEFAULT_TEXT_LEN,
    Site,
    reduce_images,
    reduce_visual_tokens,
)
from crossget.merge import Merge
from crossget.methods import fastv

__all__ = [
    "FAMILY",
    "Groups",
    "NormedCapture",
    "Qwen3VLModel",
    "adapt_processor",
    "image_tokens",
    "prefill_flops",
    "qwen3_stock_rope_index",
    "reduce_with_groups",
    "stock_image_tokens",
    "vision_tower_flops",
]

# Qwen3-VL's released preprocessor settings (size shortest_edge / longest_edge, in pixels): the
# resize an image of a given size gets when image_tokens is asked by size
MIN_PIXELS = 65536
MAX_PIXELS = 16777216

DEFAULT_IMAGE = 448  # pixels: the square image flops= is planned for by default
ImageSpec = Sequence[int] | torch.Tensor  # a grid row (t, h, w) in patches, or an image size (height, width) in pixels
MERGING = ("tome", "crossget")  # site methods that merge (recorded rounds); any other site method selects


# --------------------------------------------------------------------------- the groups, replayed
@dataclass(eq=False)
class Groups:
    """The merge groups :func:`reduce_with_groups` found on one image's tokens: each round's
    :class:`~crossget.merge.Merge` and the order it put the tokens in, applicable to any other
    ``[L, D']`` tensor of the same tokens (a deep-stack level)."""

    length: int
    rounds: list[tuple[Merge, torch.Tensor]] = field(default_factory=list)
    select: torch.Tensor | None = None  # a selecting method's kept indices [keep] (no rounds)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` ``[L, D']`` reduced with the same groups (size-weighted averages, in the order
        of the first token each covers): ``[keep, D']``.

        Raises:
            ValueError: ``y`` is not ``[L, D']`` for the ``L`` tokens the groups were found on.
        """
        if y.dim() != 2 or y.shape[0] != self.length:
            raise ValueError(f"these groups reduce [{self.length}, D] tokens, got {tuple(y.shape)}")
        if self.select is not None:
            return y[self.select]
        y, size = y.unsqueeze(0), None
        for merge, order in self.rounds:
            y, size = merge(y, size)
            y, size = y[:, order], size[:, order]
        return y[0]


def reduce_with_groups(x: torch.Tensor, keep: int, method: str) -> tuple[torch.Tensor, torch.Tensor, Groups]:
    """:func:`crossget.families.visual_site.reduce_visual_tokens` (the same rounds, the same
    result), recording its groups: ``(tokens [keep, D], first [keep], groups)``. A selecting
    site method (any but :data:`MERGING`) keeps tokens as they are: its groups pick the same
    indices.

    Raises:
        ValueError: ``x`` not 2-D, an unknown method, or ``keep`` not an int in ``[1, L]``.
    """
    if x.dim() != 2:
        raise ValueError(f"reduce_with_groups expects one image's tokens [L, D], got {tuple(x.shape)}")
    rounds: list[tuple[Merge, torch.Tensor]] = []
    tokens, first = reduce_visual_tokens(x, keep, method, rounds)
    if method in MERGING:
        return tokens, first, Groups(x.shape[0], rounds)
    if not torch.equal(tokens, x[first]):  # a selection: the kept tokens as they are, each its own group
        raise ValueError(f"method {method!r} neither merges (tome, crossget) nor selects tokens")
    return tokens, first, Groups(x.shape[0], select=first)


# --------------------------------------------------------------------------- anatomy
def _grid(model: nn.Module, image: ImageSpec) -> tuple[int, int, int]:
    """``(t, h, w)`` in patches: a grid row as given, or an image size ``(height, width)``
    resized as Qwen3-VL's image processor does (:data:`MIN_PIXELS`, :data:`MAX_PIXELS`;
    :meth:`crossget.families.qwen_vl.QwenVLFamily.grid`)."""
    return FAMILY.grid(model, image)


def stock_image_tokens(model: nn.Module, image: ImageSpec) -> int:
    """Visual tokens the unpatched model gives an image: ``t h w / merge^2`` for its grid row,
    or for an image size ``(height, width)`` after the image processor's resize."""
    return FAMILY.stock_image_tokens(model, image)


def stock_counts(base: nn.Module, kwargs: dict) -> list[int]:
    """Stock visual tokens per image of a forward's ``image_grid_thw`` (FastV's counts)."""
    return [stock_image_tokens(base, g) for g in kwargs["image_grid_thw"]]


def qwen3_stock_rope_index(base: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                           image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                           second_per_grid_ts: Any, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream Qwen3-VL's ``get_rope_index`` in :func:`crossget.families.qwen_vl.rope_index`'s
    ``upstream`` form (``second_per_grid_ts`` unused: Qwen3-VL places frames by timestamps)."""
    return hf.Qwen3VLModel.get_rope_index(base, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                          attention_mask=attention_mask)


# --------------------------------------------------------------------------- FLOPs model
def vision_tower_flops(model: nn.Module, image: ImageSpec) -> float:
    """Analytic FLOPs (2 x multiply-adds) of the vision tower on one image: the patch
    embedding, every block (QKV and output projections, full attention per frame, the MLP),
    the merger and every deep-stack merger."""
    vcfg = base_model(model).config.vision_config
    t, h, w = _grid(model, image)
    n, c, merge = t * h * w, vcfg.hidden_size, vcfg.spatial_merge_size
    patch_in = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    total = 2 * n * patch_in * c
    total += vcfg.depth * (8 * n * c * c + 4 * t * (h * w) ** 2 * c + 4 * n * c * vcfg.intermediate_size)
    wide = c * merge * merge
    total += (1 + len(vcfg.deepstack_visual_indexes)) * 2 * (n // merge ** 2) * (wide * wide + wide * vcfg.out_hidden_size)
    return float(total)


def prefill_flops(model: nn.Module, method: str = "none", keep: int | None = None, image: ImageSpec | None = None,
                  text_len: int = DEFAULT_TEXT_LEN, fastv_layer: int = fastv.DEFAULT_LAYER) -> float:
    """Analytic FLOPs of one prefill with one image (default a :data:`DEFAULT_IMAGE`-pixel
    square) and ``text_len`` other prompt tokens: :func:`vision_tower_flops`, the matching
    rounds and every LM layer (:func:`crossget.families.visual_site.site_and_lm_flops`; the
    deep-stack additions and their replayed merges are element-wise, left out)."""
    return FAMILY.prefill_flops(model, method, keep, image, text_len, fastv_layer)


# --------------------------------------------------------------------------- FastV on normed q / k
@dataclass(eq=False)
class NormedCapture:
    """A forward hook on layer ``K - 1``'s ``q_norm`` (``which="q"``) or ``k_norm`` (``"k"``):
    hands the pruner (FastV, or a subclass) the per-head normalised queries / keys, which
    Qwen3's attention rotates and multiplies, flattened to ``[B, L, H * hd]`` as its
    projections' captures are. It runs after the projection's capture, so it is what stays."""

    pruner: fastv.FastV
    which: str

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        capture = self.pruner.capture_q if self.which == "q" else self.pruner.capture_k
        capture(module, args, output.flatten(-2))


# --------------------------------------------------------------------------- the patched model
class Qwen3VLModel(KeptPositionsForward, hf.Qwen3VLModel):
    """The patched ``Qwen3VLModel`` (the instance's class is swapped; same name, so that
    ``save_pretrained`` writes the stock architecture); with ``method="none"`` every method
    is upstream's."""

    forward_signature = inspect.signature(hf.Qwen3VLModel.forward)

    def reduce_features(self, out: Any, site: Site, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each image's ``[L_i, D]`` main tokens reduced to ``[keep, D]`` (:func:`reduce_with_groups`)
        and every deep-stack level's ``[L_i, D]`` of that image reduced with the same groups, in
        place: ``pooler_output`` a tuple of ``[keep, D]``, ``deepstack_features`` a list (per
        level) of such tuples. Returns each image's ``first`` ``[keep]``.

        Raises:
            ValueError: ``keep`` is more than an image gives.
        """
        groups = []

        def reduce(f: torch.Tensor, keep: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
            tok, first, g = reduce_with_groups(f, keep, method)
            groups.append(g)
            return tok, first

        tokens, firsts = reduce_images(out.pooler_output, site, image_grid_thw, "grid", "image_grid_thw", reduce)
        out.pooler_output = tuple(t.to(f.dtype) for t, f in zip(tokens, out.pooler_output))
        out.deepstack_features = [tuple(g(feats[i]).to(feats[i].dtype) for i, g in enumerate(groups))
                                  for feats in out.deepstack_features]
        return firsts

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs: Any) -> Any:
        """Upstream's video features, unreduced (upstream encodes videos with
        ``get_image_features``, which this class reduces: the stock one runs here)."""
        return hf.Qwen3VLModel.get_image_features(self, pixel_values_videos, video_grid_thw, **kwargs)

    def encode_first(self, kw: dict, extra: dict) -> None:
        """Raw ``pixel_values_videos`` encoded before the images (upstream Qwen3-VL takes either
        raw videos or ``mm_encoder_outputs``, which the shared forward,
        :class:`~crossget.families.qwen_vl.KeptPositionsForward`'s, passes for the images)."""
        videos = kw.get("pixel_values_videos")
        if videos is not None:
            mm = dict(kw.get("mm_encoder_outputs") or {})
            if mm.get("video") is not None:
                raise ValueError("You cannot specify both pixel_values_videos and mm_encoder_outputs['video']")
            mm["video"] = self.get_video_features(videos, kw.get("video_grid_thw"), return_dict=True, **extra)
            kw["mm_encoder_outputs"], kw["pixel_values_videos"] = mm, None

    def get_rope_index(self, input_ids: torch.LongTensor, mm_token_type_ids: torch.IntTensor,
                       image_grid_thw: torch.LongTensor | None = None, video_grid_thw: torch.LongTensor | None = None,
                       attention_mask: torch.Tensor | None = None, image_first: Sequence[torch.Tensor] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's 3-D positions, with ``keep`` tokens per image at the stock positions of
        ``image_first`` (per image ``[keep]``; without it, stand-ins the encoding forward
        replaces). Returns ``(position_ids [3, B, S], rope_deltas [B, 1])``."""
        s = self.reducing_site()
        if s is None:
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                          attention_mask, **kwargs)
        frames = int(video_grid_thw[:, 0].sum()) if video_grid_thw is not None else 0  # a run per frame
        return rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, image_first, s.keep, video_grid_thw,
                          None, attention_mask, upstream=qwen3_stock_rope_index, video_runs=frames)


# --------------------------------------------------------------------------- the family
class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL: the budget is the visual tokens per image that reach the language model
    (main and deep-stack alike); Qwen2.5-VL's pieces (:class:`~crossget.families.qwen_vl.QwenVLFamily`)
    with Qwen3-VL's classes, resize bounds and FLOPs model."""

    name = "Qwen3-VL"
    classes = (hf.Qwen3VLForConditionalGeneration, hf.Qwen3VLModel)
    patched_class = Qwen3VLModel
    processor_class = Qwen3VLProcessor
    stock_counts = staticmethod(stock_counts)
    vision_tower_flops = staticmethod(vision_tower_flops)
    min_pixels, max_pixels = MIN_PIXELS, MAX_PIXELS
    default_size = DEFAULT_IMAGE

    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """:meth:`SiteFamily.patch`; ``fastv`` needs ``fastv_layer`` at least the number of
        deep-stack levels and ranks on Qwen3's normed queries and keys (:class:`NormedCapture`).

        Raises:
            ValueError: as :meth:`SiteFamily.patch`, or ``fastv_layer`` below the deep-stack levels.
        """
        base = self.base_model(model)
        if cfg.method in ("fastv", "dart"):  # pruned inside the language model before layer K
            levels = len(base.config.vision_config.deepstack_visual_indexes)
            layer = fastv.DEFAULT_LAYER if cfg.fastv_layer is None else cfg.fastv_layer
            if isinstance(layer, int) and not isinstance(layer, bool) and layer < levels:
                raise ValueError(
                    f"fastv_layer={layer} prunes before the deep-stack features are added: Qwen3-VL adds {levels} "
                    f"levels at the visual positions after LM layers 0..{levels - 1}, so fastv_layer must be at "
                    f"least {levels} (or use method='tome' / 'crossget')")
        resolved = super().patch(model, cfg)
        s = self.site(model)
        # FastV ranks on the normed q / k (a subclass with its own rule, as DART, reads what it needs itself)
        if s is not None and type(s.fastv) is fastv.FastV:
            attn = s.fastv.attn
            s.handles.append(attn.q_norm.register_forward_hook(NormedCapture(s.fastv, "q")))  # the record's list
            s.handles.append(attn.k_norm.register_forward_hook(NormedCapture(s.fastv, "k")))
        return resolved


FAMILY = Qwen3VLFamily()
base_model, site, adapt_processor, solve_keep = FAMILY.base_model, FAMILY.site, FAMILY.adapt_processor, FAMILY.solve_keep


def image_tokens(model: nn.Module, image: ImageSpec | None = None) -> int:
    """``<|image_pad|>`` placeholders an image needs in the prompt, as the model is patched
    now. ``image``: its ``image_grid_thw`` row ``(t, h, w)``, or its size ``(height, width)``."""
    return FAMILY.image_tokens(model, image)
