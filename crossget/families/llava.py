"""LLaVA-1.5 (``LlavaForConditionalGeneration``): fewer visual tokens for the language model.

LLaVA-1.5 runs a CLIP ViT-L/14-336 tower, takes the hidden states of one layer
(``vision_feature_layer``, -2), drops CLS (``vision_feature_select_strategy="default"``),
projects the 576 patch tokens with an MLP and writes them over 576 ``<image>``
placeholders of the prompt. Every method here cuts that count, training-free, at a
budget given as ``r`` (tokens per layer), ``keep`` (visual tokens that reach the
language model, per image) or ``flops`` (a prefill FLOPs ratio):

- ``crossget`` / ``tome`` (/ ``none``): merge in the vision tower's layers up to the
  selected feature layer (the CLIP family patch; later layers ``r = 0``), CLS kept first
  and the rest in spatial order, so a schedule gives a fixed number of features.
  CrossGET's importance follows the authors' LLaVA code: the attention a token
  receives (mean over queries) plus the cross token's attention to it; and the language
  model gets a cross token of its own (see below).
- ``fastv`` (:mod:`crossget.methods.fastv`): the tower is untouched; after layer ``K``
  of the language model only the ``keep`` visual tokens per image the last prompt token
  attended to most stay in the sequence.
- ``visionzip`` (:mod:`crossget.methods.visionzip`): at the feature layer, keep the
  dominant patches and merge the rest into a few contextual tokens.
- ``divprune`` (:mod:`crossget.methods.divprune`): the tower is untouched; each image's
  projected features (the multimodal projector's output, as they enter the language model)
  are cut to the ``keep`` that DivPrune's max-min diversity selection picks, in spatial order
  (a forward hook on ``multi_modal_projector``); the prompt holds ``keep`` placeholders.
- ``dart`` (:class:`crossget.methods.dart.DART`): as ``fastv`` (the prompt keeps every
  placeholder; pruned before LM layer ``K``, ``fastv_layer``), with DART's rule choosing
  each image's ``keep`` tokens (4 image and 4 text pivots by the L1 norm of layer
  ``K - 1``'s keys; similarity on layer ``K``'s input after the LM's final norm).

Prompts must hold as many ``<image>`` placeholders as the model now gives features
(:func:`image_tokens`); :func:`adapt_processor` makes a ``LlavaProcessor`` write that
count, and a mismatch raises a ``ValueError`` that says so. ``generate()`` encodes the
images once before prefill; decoding reads the KV cache of the reduced prefill.

Language-model cross token (``method="crossget"``): as in the authors' code, each LM
layer ``l`` replaces the state of the first real token (BOS) by
``stopgrad(state) + theta_l`` (``theta`` zeros: training-free and exact). Its outputs
are aligned with the vision tower's cross-token outputs, projected by the (detached)
multimodal projector, by :func:`cross_token_loss` (docs/method.md §3's loss; vision layers are
spread over the LM's layers as the authors do; they weight it 0.001 for 7B,
:data:`CROSS_LOSS_WEIGHT`). The two sets of cross tokens are the ``vision`` and
``text`` entries of :func:`crossget.save_cross_tokens`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.clip import modeling_clip as hf_clip
from transformers.models.llava import modeling_llava as hf

from crossget.config import MERGING, METHODS, PatchConfig
from crossget.families import clip
from crossget.families.base import (
    CROSS_PARAM,
    ENCODER_OPTIONS,
    Family,
    Tower,
    allow_missing_cross_tokens,
    drop_cross_tokens,
    install,
    no_inputs,
    uninstall,
)
from crossget.families.visual_site import LM_METHODS, dart_flops, placeholder_mask
from crossget.methods import dart, fastv, visionzip
from crossget.methods.divprune import divprune_select
from crossget.record import mark, record, unmark
from crossget.schedule import EncoderCost, RSpec, decoder_layer_flops, resolve_r, token_counts, vit_layer_flops
from crossget.state import TowerSettings, TowerState

__all__ = [
    "CROSS_LOSS_WEIGHT",
    "FASTV_LAYER",
    "FAMILY",
    "adapt_processor",
    "feature_schedule",
    "hidden_state_indices",
    "image_tokens",
    "merge_schedule",
    "prefill_flops",
    "schedule_for_keep",
    "tokens_at_layer",
]

FASTV_LAYER = fastv.DEFAULT_LAYER  # FastV's K: prune after this many LM layers (the paper's K=2)
CROSS_LOSS_WEIGHT = 1e-3  # the authors' weight of the cross-token loss for LLaVA-1.5-7B
DEFAULT_TEXT_LEN = 64  # text tokens assumed when solving flops= (prompt around the image)


# --------------------------------------------------------------------------- model anatomy
def _base(model: nn.Module) -> hf.LlavaModel:
    if isinstance(model, hf.LlavaForConditionalGeneration):
        return model.model
    if isinstance(model, hf.LlavaModel):
        return model
    raise TypeError(f"expected a LlavaForConditionalGeneration or LlavaModel, got {type(model).__name__}")


def _vision(model: nn.Module) -> hf_clip.CLIPVisionModel:
    tower = _base(model).vision_tower
    if not isinstance(tower, hf_clip.CLIPVisionModel):
        raise TypeError(
            f"crossget patches LLaVA with a CLIP vision tower (LLaVA-1.5); this one has {type(tower).__name__}"
        )
    return tower


def _strategy(model: nn.Module) -> str:
    strategy = _base(model).config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    return strategy


def hidden_state_indices(selection: int | Sequence[int], layers: int) -> list[int]:
    """``vision_feature_layer`` (``selection``) of a tower of ``layers`` layers as non-negative
    ``hidden_states`` indices (0 = embeddings, ``i`` = output of layer ``i - 1``).

    Raises:
        ValueError: an index outside the ``layers + 1`` hidden states.
    """
    n = layers + 1
    sel = [selection] if isinstance(selection, int) else list(selection)
    out = []
    for s in sel:
        if not -n <= s < n:
            raise ValueError(f"vision_feature_layer {s} is outside the tower's {n} hidden states")
        out.append(s % n)
    return out


def feature_layers(model: nn.Module) -> list[int]:
    """The selected ``hidden_states`` indices, non-negative (0 = embeddings, ``i`` = output of layer ``i - 1``)."""
    return hidden_state_indices(_base(model).config.vision_feature_layer, len(_vision(model).encoder.layers))


def _reducible(model: nn.Module) -> int:
    """Layers that may merge: all before the earliest selected feature layer (later ones
    must keep the same tokens, since LLaVA concatenates several selected layers)."""
    return min(feature_layers(model))


def _tokens_in(model: nn.Module) -> int:
    cfg = _vision(model).config
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


def stock_image_tokens(model: nn.Module) -> int:
    """Visual tokens per image of the unpatched model (576 for LLaVA-1.5)."""
    return _tokens_in(model) - (_strategy(model) == "default")


def image_tokens(model: nn.Module) -> int:
    """Visual tokens per image that reach the language model as the model is patched now:
    the number of ``<image>`` placeholders every image needs in the prompt (the same for
    every image: LLaVA-1.5's processor resizes them)."""
    g = glue(model)
    return g.image_tokens if g is not None else stock_image_tokens(model)


def adapt_processor(processor: Any, model: nn.Module) -> Any:
    """Make a ``LlavaProcessor`` write :func:`image_tokens` placeholders per image; returns it.

    Call it again after re-patching (or unpatching, which restores the stock count).
    The processor computes ``(h // p) * (w // p) + num_additional_image_tokens - (1 if
    "default")``; only ``num_additional_image_tokens`` changes.

    Raises:
        TypeError: ``processor`` is not a LLaVA-style processor.
        ValueError: its patch size differs from the vision tower's.
    """
    if not hasattr(processor, "num_additional_image_tokens") or not hasattr(processor, "patch_size"):
        raise TypeError(f"expected a LlavaProcessor, got {type(processor).__name__}")
    cfg = _vision(model).config
    if processor.patch_size is None:
        processor.patch_size = cfg.patch_size
    if processor.patch_size != cfg.patch_size:
        raise ValueError(f"processor.patch_size is {processor.patch_size}, the vision tower's is {cfg.patch_size}")
    strategy = _strategy(model)
    processor.vision_feature_select_strategy = strategy
    patches = (cfg.image_size // cfg.patch_size) ** 2
    processor.num_additional_image_tokens = image_tokens(model) - patches + (strategy == "default")
    return processor


# --------------------------------------------------------------------------- budgets
def schedule_for_keep(n_tokens: int, layers: int, target: int, protected: int = 1) -> list[int]:
    """Per-layer ``r`` over ``layers`` layers taking ``n_tokens`` down to exactly ``target``.

    As even as possible, one more token in the earliest layers, within the clamp of docs/method.md §4,
    ``r <= (N - P) // 2`` (front-loaded further where a late layer would need more).

    Raises:
        ValueError: ``target`` out of ``[1, n_tokens]`` or below what ``layers`` layers reach.
    """
    if isinstance(target, bool) or not isinstance(target, int) or not protected <= target <= n_tokens:
        raise ValueError(f"cannot keep {target!r} of {n_tokens} tokens ({protected} protected)")

    def floor_after(n: int, m: int) -> int:  # fewest tokens m layers can leave
        for _ in range(m):
            n -= max(n - protected, 0) // 2
        return n

    sched, n = [], n_tokens
    for i in range(layers):
        r = -(-(n - target) // (layers - i))  # ceil: the remainder goes to early layers
        top = max(n - protected, 0) // 2
        while r < top and floor_after(n - r, layers - i - 1) > target:
            r += 1  # a late layer could not remove its share: take more now
        r = min(r, top)
        sched.append(r)
        n -= r
    if n != target:
        raise ValueError(f"{layers} layers can take {n_tokens} tokens down to {n} at least, not {target}")
    return sched


def tokens_at_layer(n_tokens: int, sched: Sequence[int], layer: int, protected: int = 1) -> int:
    """Tokens in ``hidden_states[layer]`` of a tower of ``n_tokens`` inputs merging with ``sched``."""
    return token_counts(n_tokens, sched, protected)[layer - 1][1] if layer else n_tokens


def _keep_from_schedule(model: nn.Module, sched: Sequence[int]) -> int:
    return tokens_at_layer(_tokens_in(model), sched, _reducible(model)) - (_strategy(model) == "default")


def _check_keep(model: nn.Module, keep: object) -> int:
    top = stock_image_tokens(model)
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (visual tokens per image), got {keep!r}")
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    if keep > top:
        raise ValueError(f"keep={keep} is more than the {top} visual tokens the model has per image")
    return keep


def merge_schedule(model: nn.Module, keep: int) -> list[int]:
    """Vision schedule (all layers) that gives ``keep`` features per image."""
    reducible = _reducible(model)
    target = keep + (_strategy(model) == "default")  # CLS is still there at the feature layer
    if target != _tokens_in(model) and reducible == 0:
        raise ValueError("vision_feature_layer selects the embeddings: no tower layer can merge")
    sched = schedule_for_keep(_tokens_in(model), reducible, target) if reducible else []
    return sched + [0] * (len(_vision(model).encoder.layers) - reducible)


def _resolve_r(model: nn.Module, r: RSpec) -> list[int]:
    return feature_schedule(r, len(_vision(model).encoder.layers), _reducible(model))


def feature_schedule(r: RSpec, layers: int, reducible: int) -> list[int]:
    """``r`` (an int for each of the first ``reducible`` layers, or one per layer) as a schedule
    of all ``layers`` layers, zero from layer ``reducible`` on (the feature layer's input).

    Raises:
        ValueError: a bad ``r``, or nonzero ``r`` from layer ``reducible`` on.
    """
    if isinstance(r, int) and not isinstance(r, bool):
        sched = resolve_r(r, reducible, name="r") + [0] * (layers - reducible)
    else:
        sched = resolve_r(r, layers, name="r for the vision tower")
        late = [i for i in range(reducible, layers) if sched[i]]
        if late:
            raise ValueError(
                f"r must be 0 from layer {reducible} on (vision_feature_layer reads the output of layer "
                f"{reducible - 1}), got nonzero r at layers {late}: {sched}"
            )
    return sched


def _visionzip_split(model: nn.Module, keep: int, contextual: int | None) -> tuple[int, int]:
    """(dominant patches, contextual tokens) for ``keep`` features per image."""
    room = keep - (_strategy(model) == "full")  # with "full", CLS is one of the features
    try:
        return visionzip.split_budget(room, _tokens_in(model) - 1, contextual)
    except ValueError as err:
        raise ValueError(f"{err} for keep={keep}") from None


# --------------------------------------------------------------------------- FLOPs model
def prefill_flops(
    model: nn.Module,
    method: str = "none",
    keep: int | None = None,
    schedule: Sequence[int] | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
    fastv_layer: int = FASTV_LAYER,
) -> float:
    """Analytic FLOPs of one prefill (one image, ``text_len`` other prompt tokens): vision
    tower, projector, language model (docs/method.md §7). Used to solve ``flops=``; report
    measured FLOPs (:mod:`crossget.flops`) where it matters."""
    vcfg, tcfg = _vision(model).config, _base(model).config.text_config
    n0, layers = _tokens_in(model), len(_vision(model).encoder.layers)
    stock = stock_image_tokens(model)
    keep = stock if keep is None else keep
    sched = [0] * layers if schedule is None else list(schedule)
    total = 2 * (n0 - 1) * vcfg.hidden_size * vcfg.num_channels * vcfg.patch_size**2
    if method == "visionzip":
        # the feature layer runs whole and selects after its MLP; later layers see the selection
        cut = min(feature_layers(model)) - 1
        after = keep + (_strategy(model) == "default")
        counts = [(n0, n0)] * (cut + 1) + [(after, after)] * (layers - cut - 1)
    else:
        counts = token_counts(n0, sched if method in MERGING else [0] * layers, protected=1)
    total += sum(vit_layer_flops(vcfg.hidden_size, vcfg.intermediate_size, n, m) for n, m in counts)
    # FastV, DART and DivPrune project every token (DivPrune selects among the projected ones)
    projected = stock if method in LM_METHODS + ("divprune",) else keep
    total += 2 * projected * (vcfg.hidden_size * tcfg.hidden_size + tcfg.hidden_size**2)
    if method == "divprune":
        total += 2 * stock * stock * tcfg.hidden_size  # its cosine-distance matrix
    elif method == "dart":
        total += dart_flops(tcfg.hidden_size, stock, keep, text_len)
    lm_in = (keep if method not in LM_METHODS else stock) + text_len
    for layer in range(tcfg.num_hidden_layers):
        n = lm_in if (method not in LM_METHODS or layer < fastv_layer) else keep + text_len
        total += decoder_layer_flops(tcfg, n)
    return float(total)


def _solve_flops(model: nn.Module, target: float, method: str, text_len: int, fastv_layer: int) -> tuple[int, float]:
    """Largest ``keep`` whose estimated prefill FLOPs are at most ``target`` x the stock ones."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"flops must be a ratio in (0, 1], got {target!r}")
    base = prefill_flops(model, text_len=text_len)
    for keep in range(stock_image_tokens(model), 0, -1):
        try:
            sched = merge_schedule(model, keep) if method in MERGING else None
        except ValueError:
            break  # below what the tower can reach
        ratio = prefill_flops(model, method, keep, sched, text_len, fastv_layer) / base
        if ratio <= target + 1e-12:
            return keep, ratio
    raise ValueError(f"flops={target} is out of reach for method={method!r} with a {text_len}-token prompt")


# --------------------------------------------------------------------------- language model
@dataclass(eq=False)
class LMCrossToken:
    """The language model's cross token (docs/method.md §10): at every layer ``l`` the state
    of the first real token becomes ``stopgrad(state) + theta_l``; its outputs are kept for
    :meth:`LlavaFamily.cross_token_pairs`. The hooks are this object's methods."""

    state: TowerState
    theta: nn.Parameter

    def install(self, lm: nn.Module) -> list:
        handles = [
            lm.register_forward_pre_hook(self.lm_pre, with_kwargs=True),
            lm.register_forward_hook(self.lm_post, with_kwargs=True),
        ]
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_pre_hook(LMLayerHook(self, i), with_kwargs=True))
            handles.append(layer.register_forward_hook(self.layer_post, with_kwargs=True))
        return handles

    def lm_pre(self, _module, args, kwargs):
        # only a forward that starts at position 0 holds the first token (a cached decode
        # step reads its effect from the cache)
        state = self.state
        state.anchor = None
        state.cross_outputs = []
        if fastv.cache_len(kwargs.get("past_key_values")) == 0:
            x = kwargs.get("inputs_embeds")
            x = kwargs.get("input_ids", args[0] if args else None) if x is None else x
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                state.anchor = mask.int().argmax(-1)  # first real token (left padding)
            else:
                state.anchor = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def layer_pre(self, layer: int, args, kwargs):
        anchor = self.state.anchor
        if anchor is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        rows = torch.arange(x.shape[0], device=x.device)
        # stopgrad(state) + theta_l: the value is unchanged while theta is zero
        x = x.index_put((rows, anchor), x[rows, anchor].detach() + self.theta[layer].to(x.dtype))
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def layer_post(self, _module, _args, _kwargs, output):
        anchor = self.state.anchor
        if anchor is not None:
            x = output[0] if isinstance(output, tuple) else output
            self.state.cross_outputs.append(x[torch.arange(x.shape[0], device=x.device), anchor])

    def lm_post(self, _module, _args, _kwargs, _output):
        self.state.anchor = None  # layers called on their own afterwards are left alone


@dataclass(eq=False)
class LMLayerHook:
    cross: LMCrossToken
    index: int

    def __call__(self, module, args, kwargs):
        return self.cross.layer_pre(self.index, args, kwargs)


def _install_lm_cross_tokens(base: hf.LlavaModel, theta: nn.Parameter | None) -> tuple[TowerState, list]:
    lm = base.language_model
    layers, width = len(lm.layers), lm.config.hidden_size
    if theta is None or theta.shape != (layers, width):
        ref = next(lm.parameters())
        theta = nn.Parameter(torch.zeros(layers, width, dtype=ref.dtype, device=ref.device))
    setattr(lm, CROSS_PARAM, theta)
    state = TowerState(
        settings=TowerSettings("text", (0,) * layers, "crossget", prop_attn=False),
        heads=lm.config.num_attention_heads,
        causal=True,
    )
    state.cross_tokens = theta
    mark(lm, state=state)
    # as for the towers: the checkpoint stays stock (theta travels in cross-token files)
    stock_checkpoint = [lm.register_state_dict_post_hook(drop_cross_tokens),
                        lm.register_load_state_dict_post_hook(allow_missing_cross_tokens)]
    return state, LMCrossToken(state, theta).install(lm) + stock_checkpoint


_LLAVA_FORWARD = inspect.signature(hf.LlavaModel.forward)


@dataclass(eq=False)
class Glue:
    """What :meth:`LlavaFamily.patch` installed on a LlavaModel besides the vision tower;
    its :meth:`on_forward` is the LlavaModel's forward pre-hook."""

    method: str
    image_tokens: int
    feature_layer: Any
    strategy: str
    handles: list = field(default_factory=list)
    lm_state: TowerState | None = None
    fastv: fastv.FastV | None = None
    visionzip_layer: nn.Module | None = None

    def on_forward(self, base: hf.LlavaModel, args: tuple, kwargs: dict) -> None:
        """Check the placeholder count; give FastV its image positions and ranking query."""
        if args:
            kwargs = {**_LLAVA_FORWARD.bind_partial(base, *args).arguments, **kwargs}
        for name, ref in (("vision_feature_layer", self.feature_layer), ("vision_feature_select_strategy", self.strategy)):
            if kwargs.get(name) is not None and kwargs[name] != ref:
                raise ValueError(f"the model was patched for {name}={ref!r}; re-patch it to use {kwargs[name]!r}")
        pixels, encoded = kwargs.get("pixel_values"), (kwargs.get("mm_encoder_outputs") or {}).get("image")
        n_images = pixels.shape[0] if pixels is not None else (len(encoded.pooler_output) if encoded is not None else 0)
        mask = placeholder_mask(base, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if n_images else None
        if mask is not None:
            found, need = int(mask.sum()), n_images * self.image_tokens
            if found != need:
                raise ValueError(
                    f"the prompts hold {found} image placeholder tokens for {n_images} image(s), but the model patched "
                    f"with method={self.method!r} gives {self.image_tokens} visual tokens per image ({need} in all): "
                    f"build prompts with crossget.adapt_processor(processor, model), or repeat the image token "
                    f"crossget.image_tokens(model) times per image"
                )
        if self.fastv is not None:
            self.fastv.set_prompt(mask, kwargs.get("attention_mask"), encoded)

    def __call__(self, base: hf.LlavaModel, args: tuple, kwargs: dict) -> None:
        self.on_forward(base, args, kwargs)


def glue(model: nn.Module) -> Glue | None:
    """What the patch installed on the model's LlavaModel (None if not patched)."""
    rec = record(_base(model))
    return rec.glue if rec is not None else None


def _uninstall_glue(model: nn.Module) -> nn.Parameter | None:
    """Remove what :meth:`LlavaFamily.patch` put outside the vision tower; returns the LM cross tokens."""
    base = _base(model)
    g = glue(model)
    if g is None:
        return None
    for h in g.handles:
        h.remove()
    unmark(base, ("glue",))
    if g.visionzip_layer is not None:
        visionzip.uninstall(g.visionzip_layer)
    lm = base.language_model
    if record(lm) is not None:
        unmark(lm, ("state",))
    theta = getattr(lm, CROSS_PARAM, None)
    if theta is not None:
        delattr(lm, CROSS_PARAM)
    return theta


# --------------------------------------------------------------------------- the family
def _vision_tower_record(model: nn.Module) -> Tower:
    return clip.tower("vision", _vision(model))


class LlavaFamily(Family):
    """LLaVA-1.5: the budget is the visual tokens that reach the language model."""

    name = "LLaVA"
    classes = (hf.LlavaForConditionalGeneration, hf.LlavaModel)
    methods = METHODS
    # the processor fixes the size; a calibrated schedule is for encoder families
    options = (ENCODER_OPTIONS - {"image_size", "schedule"}) | {"keep", "fastv_layer", "contextual"}
    importance = ("cross", "attention", "none")
    # the authors' rule: the guidance rules were measured with cross-token importance in
    # encoder towers (docs/results-guidance.md), not with LLaVA's attention importance
    default_guidance = "reference"

    def image_tokens(self, model: nn.Module, image_size: Any = None) -> int:
        """:func:`image_tokens` (one count for every image size)."""
        return image_tokens(model)

    def adapt_processor(self, processor: Any, model: nn.Module) -> Any:
        return adapt_processor(processor, model)

    def towers(self, model: nn.Module) -> dict[str, Tower]:
        """``vision`` (the CLIP tower) and ``text`` (the language model, which only carries
        CrossGET's cross tokens: it is never merged)."""
        lm = _base(model).language_model
        layer = lm.layers[0]
        text = Tower(
            kind="text", module=lm, encoder=lm, layers=list(lm.layers), layer_class=type(layer),
            attention_class=type(layer.self_attn), attention_attr="self_attn", causal=True, restore_length=False,
            read_inputs=no_inputs, hidden=lm.config.hidden_size, heads=lm.config.num_attention_heads,
        )
        return {"vision": _vision_tower_record(model), "text": text}

    def encoder_cost(
        self, module: nn.Module, kind: str, text_len: int | None = None, image_size: int | None = None
    ) -> EncoderCost:
        if kind != "vision":
            raise ValueError("the LLaVA language model is not an encoder: see crossget.families.llava.prefill_flops")
        return clip.encoder_cost(module, kind, text_len, image_size)

    def joint_projection(self, model: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``vision``: the multimodal projector with detached weights (into the LM's width);
        ``text``: identity (the LM's own space)."""
        if kind == "text":
            return _identity
        return DetachedProjector(_base(model).multi_modal_projector)

    def cross_token_pairs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision layer ``i``'s cross-token output, projected by the detached multimodal
        projector, paired with LM layers ``[floor(i Lt / Lv), floor((i + 1) Lt / Lv))`` (the
        authors' spreading of 24 vision layers over 32 LM layers, docs/method.md §10). Add
        the loss to the LM loss with a small weight (:data:`CROSS_LOSS_WEIGHT`).

        Raises:
            ValueError: not patched with ``method="crossget"``, no forward ran, or several
                images per prompt (cross tokens pair one image with one prompt).
        """
        g = glue(model)
        vision = _vision_tower_record(model).state
        if g is None or g.lm_state is None or vision is None or vision.cross_tokens is None:
            raise ValueError("cross_token_loss needs a LLaVA model patched with method='crossget'")
        vis, txt = vision.cross_outputs, g.lm_state.cross_outputs
        if not vis or not txt:
            raise ValueError("run a forward with images through the patched model before cross_token_loss")
        if vis[0].shape[0] != txt[0].shape[0]:
            raise ValueError(
                f"cross_token_loss pairs one image with one prompt: got {vis[0].shape[0]} images, {txt[0].shape[0]} prompts"
            )
        lv, lt = len(vis), len(txt)
        pair = [i for i in range(lv) for _ in range((i + 1) * lt // lv - i * lt // lv)]
        return self.joint_projection(model, "vision")(torch.stack(vis))[pair], torch.stack(txt)

    def patch(self, model: nn.Module, cfg: PatchConfig) -> PatchConfig:
        """Budgets (give one): ``r`` tokens per vision layer (int, or one per layer with zeros
        from the feature layer on), ``keep`` visual tokens per image for the LM, or ``flops``
        a target ratio of the estimated prefill FLOPs (:func:`prefill_flops`, ``text_len``
        prompt tokens besides the image, default 64). ``fastv``/``visionzip``/``divprune``/``dart``
        read ``r`` as the visual-token count CrossGET's schedule ``r`` gives. ``fastv_layer``:
        the ``K`` of FastV and DART (pruned before LM layer ``K``);
        ``contextual``: VisionZip's contextual tokens (default 10/64 of ``keep``).
        ``importance`` (``method="crossget"``): ``"cross"`` or ``"attention"`` (the same for
        LLaVA: the authors' attention rule, cross tokens in the tower and the LM) or
        ``"none"`` (complete-graph matching without cross tokens: an ablation).

        Raises:
            TypeError: not a LLaVA model with a CLIP vision tower.
            ValueError: bad method, budget (more than exist, zero, negative), towers, metric, or
                ``fastv_layer`` / ``contextual`` with a method that does not read them.
        """
        base = _base(model)
        _vision(model)
        strategy = _strategy(model)
        method, r, keep, flops = cfg.method, cfg.r, cfg.keep, cfg.flops
        importance = "none" if cfg.importance == "none" else "attention"
        metric = cfg.resolved_metric
        if cfg.towers is not None and list(cfg.towers) not in (["vision"], []):
            raise ValueError(f"LLaVA reduces its vision tower only: towers must be ('vision',) or None, got {cfg.towers!r}")
        if sum(x is not None for x in (r, flops, keep)) > 1:
            raise ValueError("give one of r=, keep= or flops=")
        if r is None and flops is None and keep is None:
            if method != "none":
                raise ValueError("give r= (tokens per vision layer), keep= (visual tokens per image) or flops= (ratio)")
            r = 0
        if isinstance(r, Mapping):
            if set(r) - {"vision"}:
                raise ValueError(f"LLaVA reduces its vision tower only; r names {sorted(set(r) - {'vision'})}")
            r = r.get("vision", 0)
        if cfg.fastv_layer is not None and method not in LM_METHODS:  # read by FastV / DART only
            raise ValueError(f"fastv_layer= is FastV's / DART's layer in the language model; method={method!r} "
                             f"has no such setting")
        if cfg.contextual is not None and method != "visionzip":
            raise ValueError(f"contextual= is VisionZip's count of contextual tokens; method={method!r} has none")
        n_lm = len(base.language_model.layers)
        fastv_layer = FASTV_LAYER if cfg.fastv_layer is None else cfg.fastv_layer
        if method in LM_METHODS and (isinstance(fastv_layer, bool) or not isinstance(fastv_layer, int)
                                  or not 1 <= fastv_layer < n_lm):
            raise ValueError(f"fastv_layer must be an int in [1, {n_lm - 1}] for this {n_lm}-layer LM, got {fastv_layer!r}")
        if method == "visionzip" and len(feature_layers(model)) > 1:
            raise ValueError("visionzip selects tokens of one feature layer; this model concatenates several")
        if method == "visionzip" and min(feature_layers(model)) == 0:
            raise ValueError("visionzip needs a tower layer before vision_feature_layer")

        estimate = None
        text_len = DEFAULT_TEXT_LEN if cfg.text_len is None else cfg.text_len
        if flops is not None:
            keep, estimate = _solve_flops(model, flops, method, text_len, fastv_layer)
        if keep is not None:
            keep = _check_keep(model, keep)
            sched = merge_schedule(model, keep) if method in MERGING else None
        else:
            sched = _resolve_r(model, r)
            keep = _keep_from_schedule(model, sched)
            sched = sched if method in MERGING else None
        if method == "none":
            sched, keep = [0] * len(_vision(model).encoder.layers), stock_image_tokens(model)
        selects = method == "visionzip" and keep != stock_image_tokens(model)  # else: nothing to select
        split = _visionzip_split(model, keep, cfg.contextual) if selects else None

        # reconfiguring: remove everything, carry trained cross tokens over
        vision_record = _vision_tower_record(model)
        theta_vision = uninstall(vision_record)
        theta_text = _uninstall_glue(model)
        # FastV and DART prune inside the LM: the prompt still holds every visual token
        placeholders = stock_image_tokens(model) if method in LM_METHODS else keep
        g = Glue(method, placeholders, base.config.vision_feature_layer, strategy)
        if method in MERGING:
            settings = TowerSettings(
                "vision", tuple(sched), method, cfg.prop_attn, metric, cfg.trace_sources,
                importance=importance if method == "crossget" else "cross",
                guidance=cfg.guidance, guidance_scale=cfg.guidance_scale,
            )
            install(vision_record, settings, theta_vision)
            if method == "crossget" and importance != "none":
                g.lm_state, g.handles = _install_lm_cross_tokens(base, theta_text)
        elif method in LM_METHODS:
            prune = fastv.FastV if method == "fastv" else dart.DART
            g.fastv = prune(base.language_model, fastv_layer, keep, stock_image_tokens(base))
            g.handles = g.fastv.install()
        elif method == "divprune" and keep != stock_image_tokens(model):
            g.handles = [base.multi_modal_projector.register_forward_hook(ProjectorSelect(keep))]
        elif split is not None:
            g.visionzip_layer = _vision(model).encoder.layers[min(feature_layers(model)) - 1]
            visionzip.install(g.visionzip_layer, *split)
        g.handles.append(base.register_forward_pre_hook(g, with_kwargs=True))
        mark(base, glue=g)
        return PatchConfig(
            method=method,
            r={"vision": tuple(sched)} if method in MERGING else None,
            keep=keep,
            flops=flops,
            flops_estimate=estimate,
            towers=("vision",) if method in MERGING else (),
            prop_attn=cfg.prop_attn,
            metric=metric,
            importance=importance if method == "crossget" else cfg.importance,
            guidance=cfg.guidance,
            guidance_scale=cfg.guidance_scale,
            text_len=text_len,
            trace_sources=cfg.trace_sources,
            fastv_layer=fastv_layer if method in LM_METHODS else None,
            contextual=split[1] if split is not None else None,
        )

    def unpatch(self, model: nn.Module) -> None:
        uninstall(_vision_tower_record(model))
        _uninstall_glue(model)

    def tokens_per_layer(
        self, model: nn.Module, text_len: int | None = None, image_size: int | None = None
    ) -> dict[str, list[int]]:
        """Tokens after each vision layer (``vision``) and in each LM layer (``language``,
        for one image and ``text_len`` other prompt tokens, default 64)."""
        g = glue(model)
        text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
        n0, layers = _tokens_in(model), len(_vision(model).encoder.layers)
        n_lm = len(_base(model).language_model.layers)
        method = g.method if g is not None else "none"
        state = _vision_tower_record(model).state
        if state is not None and method in ("crossget", "tome"):
            vision = [m for _, m in token_counts(n0, state.settings.r, 1)]
        elif method == "visionzip" and g.visionzip_layer is not None:
            cut = min(feature_layers(model)) - 1
            after = g.image_tokens + (_strategy(model) == "default")
            vision = [n0] * cut + [after] * (layers - cut)
        else:
            vision = [n0] * layers
        lm_in = (g.image_tokens if g is not None else stock_image_tokens(model)) + text_len
        language = [lm_in] * n_lm
        if method in LM_METHODS:
            language[g.fastv.layer :] = [g.fastv.keep + text_len] * (n_lm - g.fastv.layer)
        return {"vision": vision, "language": language}


@dataclass(frozen=True)
class ProjectorSelect:
    """DivPrune at LLaVA's projector: a forward hook on ``multi_modal_projector`` keeping, of
    each image's ``[L, D]`` projected features (output ``[images, L, D]``), the ``keep``
    :func:`~crossget.methods.divprune.divprune_select` picks, in spatial order."""

    keep: int

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        idx = divprune_select(output, self.keep)  # [images, keep]
        return output.gather(1, idx.unsqueeze(-1).expand(-1, -1, output.shape[-1]))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(eq=False)
class DetachedProjector:
    """LLaVA's two-layer multimodal projector with detached weights (the loss trains theta only)."""

    projector: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projector
        x = nn.functional.linear(x, p.linear_1.weight.detach(), _detached(p.linear_1.bias))
        return nn.functional.linear(p.act(x), p.linear_2.weight.detach(), _detached(p.linear_2.bias))


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


FAMILY = LlavaFamily()
