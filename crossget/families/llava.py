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
- ``fastv`` (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024):
  the tower is untouched; after layer ``K`` (2) of the language model only the ``keep``
  visual tokens that the last prompt token attended to most in layer ``K - 1`` (mean
  over heads) stay in the sequence, with their original positions.
- ``visionzip`` (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
  Language Models", 2024): at the feature layer, keep the "dominant" patches that CLS
  attends to most (summed over heads) in spatial order, and merge the rest into a few
  "contextual" tokens (evenly spaced targets, each other token averaged into its most
  similar target by head-mean keys); contextual share 10/64 as in the paper's
  64/128/192 settings (54+10, 108+20, 162+30).

Prompts must hold as many ``<image>`` placeholders as the model now gives features
(:func:`image_tokens`); :func:`adapt_processor` makes a ``LlavaProcessor`` write that
count, and a mismatch raises a ``ValueError`` that says so. ``generate()`` encodes the
images once before prefill; decoding reads the KV cache of the reduced prefill.

Language-model cross token (``method="crossget"``): as in the authors' code, each LM
layer ``l`` replaces the state of the first real token (BOS) by
``stopgrad(state) + theta_l`` (``theta`` zeros: training-free and exact). Its outputs
are aligned with the vision tower's cross-token outputs, projected by the (detached)
multimodal projector, by :func:`cross_token_loss` (SPEC §3's loss; vision layers are
spread over the LM's layers as the authors do; they weight it 0.001 for 7B,
:data:`CROSS_LOSS_WEIGHT`). The two sets of cross tokens are the ``vision`` and
``text`` entries of :func:`crossget.save_cross_tokens`.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.clip import modeling_clip as hf_clip
from transformers.models.llama.modeling_llama import rotate_half
from transformers.models.llava import modeling_llava as hf

from crossget.families import clip
from crossget.families.base import CROSS_PARAM, STATE_ATTR, Tower, install, uninstall
from crossget.merge import gather_tokens
from crossget.schedule import EncoderCost, RSpec, resolve_r, token_counts
from crossget.state import METRICS, TowerSettings, TowerState

__all__ = [
    "CROSS_LOSS_WEIGHT",
    "FASTV_LAYER",
    "METHODS",
    "adapt_processor",
    "cross_token_loss",
    "image_tokens",
    "prefill_flops",
    "schedule_for_keep",
    "visionzip_select",
]

SUPPORTED = (hf.LlavaForConditionalGeneration, hf.LlavaModel)
MERGING = ("crossget", "tome", "none")  # run in the vision tower through the CLIP patch
METHODS = (*MERGING, "fastv", "visionzip")
FASTV_LAYER = 2  # FastV's K: prune after this many LM layers (the paper's K=2)
VISIONZIP_CONTEXTUAL = 10 / 64  # contextual share of VisionZip's budgets (54+10, 108+20, 162+30)
CROSS_LOSS_WEIGHT = 1e-3  # the authors' weight of the cross-token loss for LLaVA-1.5-7B
DEFAULT_TEXT_LEN = 64  # text tokens assumed when solving flops= (prompt around the image)
GLUE_ATTR = "_crossget_llava"  # on the LlavaModel: what patch_model installed


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


def feature_layers(model: nn.Module) -> list[int]:
    """The selected ``hidden_states`` indices, non-negative (0 = embeddings, ``i`` = output of layer ``i - 1``)."""
    sel = _base(model).config.vision_feature_layer
    n = len(_vision(model).encoder.layers) + 1
    sel = [sel] if isinstance(sel, int) else list(sel)
    out = []
    for s in sel:
        if not -n <= s < n:
            raise ValueError(f"vision_feature_layer {s} is outside the tower's {n} hidden states")
        out.append(s % n)
    return out


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
    the number of ``<image>`` placeholders every image needs in the prompt."""
    glue = getattr(_base(model), GLUE_ATTR, None)
    return glue.image_tokens if glue is not None else stock_image_tokens(model)


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

    As even as possible, one more token in the earliest layers, within SPEC §4's clamp
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


def _keep_from_schedule(model: nn.Module, sched: Sequence[int]) -> int:
    n = token_counts(_tokens_in(model), sched, protected=1)
    out = n[_reducible(model) - 1][1] if _reducible(model) else _tokens_in(model)
    return out - (_strategy(model) == "default")


def _check_keep(model: nn.Module, keep: object) -> int:
    top = stock_image_tokens(model)
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int (visual tokens per image), got {keep!r}")
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    if keep > top:
        raise ValueError(f"keep={keep} is more than the {top} visual tokens the model has per image")
    return keep


def _merge_schedule(model: nn.Module, keep: int) -> list[int]:
    """Vision schedule (all layers) that gives ``keep`` features per image."""
    reducible = _reducible(model)
    target = keep + (_strategy(model) == "default")  # CLS is still there at the feature layer
    if target != _tokens_in(model) and reducible == 0:
        raise ValueError("vision_feature_layer selects the embeddings: no tower layer can merge")
    sched = schedule_for_keep(_tokens_in(model), reducible, target) if reducible else []
    return sched + [0] * (len(_vision(model).encoder.layers) - reducible)


def _resolve_r(model: nn.Module, r: RSpec) -> list[int]:
    layers = len(_vision(model).encoder.layers)
    reducible = _reducible(model)
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
    cls = _strategy(model) == "full"  # CLS is one of the features
    room = keep - cls
    if contextual is None:
        contextual = round(room * VISIONZIP_CONTEXTUAL)
    if isinstance(contextual, bool) or not isinstance(contextual, int) or not 0 <= contextual <= room:
        raise ValueError(f"contextual must be an int in [0, {room}] for keep={keep}, got {contextual!r}")
    dominant = room - contextual
    patches = _tokens_in(model) - 1
    if contextual and dominant + contextual >= patches:
        contextual = 0  # nothing left to merge: keep the dominant patches only
        dominant = room
    return dominant, contextual


# --------------------------------------------------------------------------- FLOPs model
def _lm_layer_flops(cfg, n: int) -> float:
    """Llama layer on ``n`` tokens: projections (GQA), full attention, gated MLP (2 x MACs)."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or c // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return 2 * n * (2 * c * q + 2 * c * kv + 3 * c * i) + 4 * n * n * q


def _vit_layer_flops(cfg, n: int, m: int) -> float:
    c, i = cfg.hidden_size, cfg.intermediate_size
    return 8 * n * c * c + 4 * n * n * c + 4 * m * c * i


def prefill_flops(
    model: nn.Module,
    method: str = "none",
    keep: int | None = None,
    schedule: Sequence[int] | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
    fastv_layer: int = FASTV_LAYER,
) -> float:
    """Analytic FLOPs of one prefill (one image, ``text_len`` other prompt tokens): vision
    tower, projector, language model. Used to solve ``flops=``; report measured FLOPs
    (:mod:`crossget.flops`) where it matters."""
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
    total += sum(_vit_layer_flops(vcfg, n, m) for n, m in counts)
    lm_in = (keep if method != "fastv" else stock) + text_len
    total += 2 * (lm_in - text_len) * (vcfg.hidden_size * tcfg.hidden_size + tcfg.hidden_size**2)
    for layer in range(tcfg.num_hidden_layers):
        n = lm_in if (method != "fastv" or layer < fastv_layer) else keep + text_len
        total += _lm_layer_flops(tcfg, n)
    return float(total)


def _solve_flops(model: nn.Module, target: float, method: str, text_len: int, fastv_layer: int) -> tuple[int, float]:
    """Largest ``keep`` whose estimated prefill FLOPs are at most ``target`` x the stock ones."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"flops must be a ratio in (0, 1], got {target!r}")
    base = prefill_flops(model, text_len=text_len)
    for keep in range(stock_image_tokens(model), 0, -1):
        try:
            sched = _merge_schedule(model, keep) if method in MERGING else None
        except ValueError:
            break  # below what the tower can reach
        ratio = prefill_flops(model, method, keep, sched, text_len, fastv_layer) / base
        if ratio <= target + 1e-12:
            return keep, ratio
    raise ValueError(f"flops={target} is out of reach for method={method!r} with a {text_len}-token prompt")


# --------------------------------------------------------------------------- vision tower
def _vision_tower_record(model: nn.Module) -> Tower:
    return clip.towers(_vision(model))["vision"]


class VisionZipCLIPAttention(hf_clip.CLIPAttention):
    """Eager CLIP attention that keeps CLS's attention and the head-mean keys (VisionZip)."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out, probs = hf_clip.eager_attention_forward(
            self, q, k, v, attention_mask, scaling=self.scale, dropout=self.dropout if self.training else 0.0
        )
        self._visionzip = (probs[:, :, 0, 1:].sum(1), k.mean(1))  # [B, N-1], [B, N, head_dim]
        return self.out_proj(out.reshape(b, n, -1)), probs


class VisionZipCLIPEncoderLayer(hf_clip.CLIPEncoderLayer):
    """The feature layer: a stock CLIP layer, then VisionZip's selection of its output."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        x = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)[0]
        x = x + self.mlp(self.layer_norm2(x))
        cls_attention, metric = self.self_attn.__dict__.pop("_visionzip")
        return visionzip_select(x, cls_attention, metric, *self._crossget_visionzip)


def visionzip_select(
    x: torch.Tensor, cls_attention: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """VisionZip's token selection (Yang et al. 2024) on one layer's output.

    Args:
        x: ``[B, N, C]``, CLS first.
        cls_attention: ``[B, N - 1]`` attention of CLS to every patch, summed over heads.
        metric: ``[B, N, D]`` keys averaged over heads (contextual merging by cosine).
        dominant: patches kept as they are (highest CLS attention), in spatial order.
        contextual: tokens the remaining patches are merged into: evenly spaced targets
            among them; every other remaining patch joins its most similar target; each
            group is averaged.

    Returns:
        ``[B, 1 + dominant + contextual, C]``: CLS, dominant patches, contextual tokens.
    """
    b, n, c = x.shape
    dom = cls_attention.topk(dominant, dim=-1).indices.sort(dim=-1).values + 1
    keep = torch.cat([dom.new_zeros(b, 1), dom], 1)
    out = gather_tokens(x, keep)
    if not contextual:
        return out
    taken = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
    rest = torch.arange(n, device=x.device).expand(b, n)[~taken].view(b, n - keep.shape[1])  # ascending
    step = max(1, rest.shape[1] // contextual)
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=x.device)
    is_target[torch.arange(0, rest.shape[1], step, device=x.device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    m = nn.functional.normalize(metric.float(), dim=-1)
    assign = (gather_tokens(m, others) @ gather_tokens(m, targets).transpose(1, 2)).argmax(-1)  # [B, O]
    sums = gather_tokens(x, targets).float()
    sums = sums.scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, c), gather_tokens(x, others).float())
    counts = torch.ones(b, targets.shape[1], device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float))
    return torch.cat([out, (sums / counts.unsqueeze(-1)).to(x.dtype)], 1)


# --------------------------------------------------------------------------- language model
@dataclass
class _FastV:
    """FastV's per-forward bookkeeping (the LM sequence changes at layer ``layer``)."""

    layer: int
    keep: int
    per_image: int  # placeholders per image (stock count)
    image_mask: torch.Tensor | None = None  # [B, L] of the current forward
    query_pos: torch.Tensor | None = None  # [B] the ranking query: last real prompt token
    valid: torch.Tensor | None = None  # [B, L] bool, real (not padding) tokens of the prune forward
    mode: str | None = None  # "prune" (a prefill with images), "decode" (cached prefill was pruned)
    q: torch.Tensor | None = None  # layer K-1 projections of the prune forward
    k: torch.Tensor | None = None
    keep_idx: torch.Tensor | None = None  # [B, L'] positions that stay (ascending)
    drop_idx: torch.Tensor | None = None  # [B, L - L']
    full_len: int = 0
    cache: Any = None  # weakref to the KV cache filled by the pruned prefill
    reduced: dict = field(default_factory=dict)  # kwargs for layers after K (mask, rope, positions)
    dropped: torch.Tensor | None = None  # [B, L - L', C] states of the pruned tokens at layer K


@dataclass
class _Glue:
    """What :func:`patch_model` installed on a LlavaModel besides the vision tower."""

    method: str
    image_tokens: int
    feature_layer: Any
    strategy: str
    handles: list = field(default_factory=list)
    lm_state: TowerState | None = None
    fastv: _FastV | None = None
    visionzip_layer: nn.Module | None = None


def _cache_len(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def _image_mask(base: hf.LlavaModel, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is not None:
        return ids == base.config.image_token_id
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    token = base.get_input_embeddings()(torch.tensor(base.config.image_token_id, device=embeds.device))
    return (embeds == token).all(-1)


_LLAVA_FORWARD = inspect.signature(hf.LlavaModel.forward)


def _on_llava_forward(base: hf.LlavaModel, glue: _Glue, args: tuple, kwargs: dict) -> None:
    """Pre-hook of ``LlavaModel.forward``: placeholder count, FastV's image positions."""
    if args:
        kwargs = {**_LLAVA_FORWARD.bind_partial(base, *args).arguments, **kwargs}
    for name, ref in (("vision_feature_layer", glue.feature_layer), ("vision_feature_select_strategy", glue.strategy)):
        if kwargs.get(name) is not None and kwargs[name] != ref:
            raise ValueError(f"the model was patched for {name}={ref!r}; re-patch it to use {kwargs[name]!r}")
    pixels, encoded = kwargs.get("pixel_values"), (kwargs.get("mm_encoder_outputs") or {}).get("image")
    n_images = pixels.shape[0] if pixels is not None else (len(encoded.pooler_output) if encoded is not None else 0)
    mask = _image_mask(base, kwargs) if n_images else None
    if mask is not None:
        found, need = int(mask.sum()), n_images * glue.image_tokens
        if found != need:
            raise ValueError(
                f"the prompts hold {found} image placeholder tokens for {n_images} image(s), but the model patched "
                f"with method={glue.method!r} gives {glue.image_tokens} visual tokens per image ({need} in all): build "
                f"prompts with crossget.adapt_processor(processor, model), or repeat the image token "
                f"crossget.image_tokens(model) times per image"
            )
    fv = glue.fastv
    if fv is None:
        return
    fv.image_mask = mask
    if mask is None:
        return
    length = mask.shape[1]
    # The ranking query is the last real prompt token. generate() without a cache feeds the
    # same encoded images with a longer sequence at every step: keep the prompt length of
    # their first forward so that every step ranks (and prunes) exactly as the prefill did.
    prompt = length
    if encoded is not None:
        prompt = encoded.__dict__.setdefault("_crossget_prompt_len", length)
    valid = kwargs.get("attention_mask")
    pos = torch.arange(length, device=mask.device).expand(mask.shape[0], length)
    ok = pos < prompt
    if isinstance(valid, torch.Tensor) and valid.dim() == 2:
        ok = ok & valid.bool()
    fv.query_pos = torch.where(ok, pos, -1).amax(-1)


def _install_lm_cross_tokens(base: hf.LlavaModel, glue: _Glue, theta: nn.Parameter | None) -> None:
    """The LM cross token: the first real token's state gets ``+ theta_l`` at every layer."""
    lm = base.language_model
    layers, width = len(lm.layers), lm.config.hidden_size
    if theta is None or theta.shape != (layers, width):
        ref = next(lm.parameters())
        theta = nn.Parameter(torch.zeros(layers, width, dtype=ref.dtype, device=ref.device))
    setattr(lm, CROSS_PARAM, theta)
    state = TowerState(
        settings=TowerSettings("text", [0] * layers, "crossget", prop_attn=False),
        heads=lm.config.num_attention_heads,
        causal=True,
    )
    state.cross_tokens = theta
    setattr(lm, STATE_ATTR, state)
    glue.lm_state = state

    def lm_pre_hook(_module, args, kwargs):
        # only a forward that starts at position 0 holds the first token (a cached decode
        # step reads its effect from the cache)
        state.anchor = None
        state.cross_outputs = []
        if _cache_len(kwargs.get("past_key_values")) == 0:
            x = kwargs.get("inputs_embeds")
            x = kwargs.get("input_ids", args[0] if args else None) if x is None else x
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                state.anchor = mask.int().argmax(-1)  # first real token (left padding)
            else:
                state.anchor = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def layer_pre_hook(layer: int):
        def hook(_module, args, kwargs):
            if state.anchor is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            rows = torch.arange(x.shape[0], device=x.device)
            # stopgrad(state) + theta_l: the value is unchanged while theta is zero
            x = x.index_put((rows, state.anchor), x[rows, state.anchor].detach() + theta[layer].to(x.dtype))
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def layer_hook(_module, _args, _kwargs, output):
        if state.anchor is not None:
            x = output[0] if isinstance(output, tuple) else output
            state.cross_outputs.append(x[torch.arange(x.shape[0], device=x.device), state.anchor])

    def lm_hook(_module, _args, _kwargs, _output):
        state.anchor = None  # layers called on their own afterwards are left alone

    glue.handles.append(lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True))
    glue.handles.append(lm.register_forward_hook(lm_hook, with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        glue.handles.append(layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
        glue.handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))


def _fastv_scores(fv: _FastV, attn: nn.Module, rope: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor | None):
    """``[B, L]`` attention of each row's ranking query (layer K-1, mean over heads)."""
    b, length, _ = fv.k.shape
    hd = attn.head_dim
    rows = torch.arange(b, device=fv.k.device)
    cos, sin = (t.expand(b, -1, -1) for t in rope)
    q = fv.q[rows, fv.query_pos].view(b, -1, hd)  # [B, H, hd]
    qc, qs = cos[rows, fv.query_pos].unsqueeze(1), sin[rows, fv.query_pos].unsqueeze(1)
    q = q * qc + rotate_half(q) * qs
    k = fv.k.view(b, length, -1, hd)  # [B, L, KV, hd]
    k = k * cos.unsqueeze(2) + rotate_half(k) * sin.unsqueeze(2)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=2)  # [B, L, H, hd]
    logits = torch.einsum("bhd,blhd->bhl", q.float(), k.float()) * attn.scaling
    pos = torch.arange(length, device=k.device)
    allowed = pos.unsqueeze(0) <= fv.query_pos.unsqueeze(1)  # causal
    if valid is not None:
        allowed = allowed & valid
    logits = logits.masked_fill(~allowed.unsqueeze(1), -math.inf)
    return logits.softmax(-1).mean(1)


def _gather_rope(rope, idx: torch.Tensor):
    b = idx.shape[0]
    return tuple(gather_tokens(t.expand(b, -1, -1), idx) for t in rope)


def _gather_mask(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """``mask`` ``[B, 1, Q, K]`` restricted to query rows ``rows`` and key columns ``cols`` (``[B, *]``)."""
    if not isinstance(mask, torch.Tensor):
        return mask  # None: causal on the pruned (still ordered) sequence is right
    b = cols.shape[0]
    mask = mask.expand(b, -1, -1, -1)
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _install_fastv(base: hf.LlavaModel, glue: _Glue, layer: int, keep: int) -> None:
    lm = base.language_model
    fv = _FastV(layer=layer, keep=keep, per_image=stock_image_tokens(base))
    glue.fastv = fv
    attn = lm.layers[layer - 1].self_attn

    def lm_pre_hook(_module, args, kwargs):
        fv.mode = None
        fv.q = fv.k = None
        cache = kwargs.get("past_key_values")
        mask = fv.image_mask
        if mask is not None and mask.any() and fv.keep < fv.per_image:
            if _cache_len(cache):
                raise ValueError("FastV prunes the prefill: a prompt with images cannot continue a filled KV cache")
            images = mask.sum(-1)
            if bool((images != images[0]).any()) or int(images[0]) % fv.per_image:
                raise ValueError(
                    f"FastV needs the same number of images in every prompt of a batch, {fv.per_image} "
                    f"placeholders each; got {images.tolist()} placeholders"
                )
            fv.mode = "prune"
            fv.keep_idx = None
            valid = kwargs.get("attention_mask")
            fv.valid = valid.bool() if isinstance(valid, torch.Tensor) and valid.dim() == 2 else None
        elif fv.keep_idx is not None and cache is not None and fv.cache is not None and fv.cache() is cache:
            fv.mode = "decode"
        elif _cache_len(cache) == 0:
            fv.keep_idx = fv.cache = None  # a new sequence without images

    def capture(name: str):
        def hook(_module, _args, output):
            if fv.mode == "prune":
                setattr(fv, name, output)

        return hook

    def prune(args, kwargs):
        x = args[0]
        b, length, c = x.shape
        scores = _fastv_scores(fv, attn, kwargs["position_embeddings"], fv.valid)
        img = fv.image_mask
        n_img = int(img[0].sum())
        img_pos = img.nonzero()[:, 1].view(b, n_img // fv.per_image, fv.per_image)
        img_scores = scores.gather(1, img_pos.flatten(1)).view(img_pos.shape)
        top = img_scores.topk(fv.keep, dim=-1).indices
        chosen = img_pos.gather(2, top).flatten(1)
        text = (~img).nonzero()[:, 1].view(b, length - n_img)
        keep_idx = torch.cat([text, chosen], 1).sort(-1).values
        kept = torch.zeros(b, length, dtype=torch.bool, device=x.device).scatter_(1, keep_idx, True)
        fv.keep_idx, fv.drop_idx, fv.full_len = keep_idx, (~kept).nonzero()[:, 1].view(b, -1), length
        fv.dropped = gather_tokens(x, fv.drop_idx)
        cache = kwargs.get("past_key_values")
        fv.cache = weakref.ref(cache) if cache is not None else None
        position_ids = kwargs.get("position_ids")
        fv.reduced = {
            "attention_mask": _gather_mask(kwargs.get("attention_mask"), keep_idx, keep_idx),
            "position_embeddings": _gather_rope(kwargs["position_embeddings"], keep_idx),
        }
        if position_ids is not None:
            fv.reduced["position_ids"] = position_ids.expand(b, -1).gather(1, keep_idx)
        fv.q = fv.k = None
        return (gather_tokens(x, keep_idx), *args[1:]), {**kwargs, **fv.reduced}

    def layer_pre_hook(index: int):
        def hook(_module, args, kwargs):
            if fv.mode == "prune":
                if index == fv.layer:
                    return prune(args, kwargs)
                return args, {**kwargs, **fv.reduced}
            if fv.mode == "decode":
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor):
                    # cached keys of the pruned prefill, then every later token
                    b, total = fv.keep_idx.shape[0], mask.shape[-1]
                    later = torch.arange(fv.full_len, total, device=mask.device).expand(b, -1)
                    return args, {**kwargs, "attention_mask": _gather_mask(mask, None, torch.cat([fv.keep_idx, later], 1))}
            return None

        return hook

    def lm_hook(_module, _args, _kwargs, output):
        mode, fv.mode = fv.mode, None  # layers called on their own afterwards are left alone
        if mode != "prune" or fv.keep_idx is None:
            return output
        # give every position its state back (pruned tokens: their layer-K input, normed)
        x = output.last_hidden_state
        b, _, c = x.shape
        full = x.new_empty(b, fv.full_len, c)
        full.scatter_(1, fv.keep_idx.unsqueeze(-1).expand(-1, -1, c), x)
        full.scatter_(1, fv.drop_idx.unsqueeze(-1).expand(-1, -1, c), lm.norm(fv.dropped))
        output.last_hidden_state = full
        fv.dropped, fv.reduced = None, {}
        return output

    glue.handles += [
        lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True),
        lm.register_forward_hook(lm_hook, with_kwargs=True),
        attn.q_proj.register_forward_hook(capture("q")),
        attn.k_proj.register_forward_hook(capture("k")),
    ]
    for i in range(layer, len(lm.layers)):
        glue.handles.append(lm.layers[i].register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))


def _install_visionzip(model: nn.Module, glue: _Glue, dominant: int, contextual: int) -> None:
    layer = _vision(model).encoder.layers[min(feature_layers(model)) - 1]
    layer._crossget_original_class = layer.__class__
    layer.self_attn._crossget_original_class = layer.self_attn.__class__
    layer.__class__ = VisionZipCLIPEncoderLayer
    layer.self_attn.__class__ = VisionZipCLIPAttention
    layer._crossget_visionzip = (dominant, contextual)
    glue.visionzip_layer = layer


def _uninstall_glue(model: nn.Module) -> nn.Parameter | None:
    """Remove what :func:`patch_model` put outside the vision tower; returns the LM cross tokens."""
    base = _base(model)
    glue = base.__dict__.pop(GLUE_ATTR, None)
    if glue is None:
        return None
    for h in glue.handles:
        h.remove()
    layer = glue.visionzip_layer
    if layer is not None:
        for m in (layer, layer.self_attn):
            m.__class__ = m.__dict__.pop("_crossget_original_class")
        layer.__dict__.pop("_crossget_visionzip", None)
    lm = base.language_model
    lm.__dict__.pop(STATE_ATTR, None)
    theta = getattr(lm, CROSS_PARAM, None)
    if theta is not None:
        delattr(lm, CROSS_PARAM)
    return theta


# --------------------------------------------------------------------------- family API
def towers(model: nn.Module) -> dict[str, Tower]:
    """``vision`` (the CLIP tower) and ``text`` (the language model, which only carries
    CrossGET's cross tokens: it is never merged)."""
    base = _base(model)
    lm = base.language_model
    layer = lm.layers[0]
    text = Tower(
        kind="text", module=lm, encoder=lm, layers=list(lm.layers), layer_class=type(layer),
        attention_class=type(layer.self_attn), attention_attr="self_attn", causal=True, restore_length=False,
        read_inputs=lambda args, kwargs: (None, None), hidden=lm.config.hidden_size, heads=lm.config.num_attention_heads,
    )
    return {"vision": _vision_tower_record(model), "text": text}


def encoder_cost(module: nn.Module, kind: str, text_len: int | None = None) -> EncoderCost:
    if kind != "vision":
        raise ValueError("the LLaVA language model is not an encoder: see crossget.families.llava.prefill_flops")
    return clip.encoder_cost(module, kind, text_len)


def joint_projection(model: nn.Module, kind: str):
    """``vision``: the multimodal projector with detached weights (into the LM's width);
    ``text``: identity (the LM's own space)."""
    if kind == "text":
        return lambda x: x
    proj = _base(model).multi_modal_projector

    def project(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.linear(x, proj.linear_1.weight.detach(), _detached(proj.linear_1.bias))
        return nn.functional.linear(proj.act(x), proj.linear_2.weight.detach(), _detached(proj.linear_2.bias))

    return project


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def cross_token_loss(model: nn.Module) -> torch.Tensor:
    """SPEC §3's alignment loss between the vision and language-model cross tokens of the last forward.

    Vision layer ``i``'s cross-token output, projected by the detached multimodal
    projector, is paired with LM layers ``[floor(i Lt / Lv), floor((i + 1) Lt / Lv))``
    (the authors' spreading of 24 vision layers over 32 LM layers). Add it to the LM loss
    with a small weight (:data:`CROSS_LOSS_WEIGHT`).

    Raises:
        ValueError: not patched with ``method="crossget"``, no forward ran, or several
            images per prompt (cross tokens pair one image with one prompt).
    """
    glue = getattr(_base(model), GLUE_ATTR, None)
    vision = _vision_tower_record(model).state
    if glue is None or glue.lm_state is None or vision is None or vision.cross_tokens is None:
        raise ValueError("cross_token_loss needs a LLaVA model patched with method='crossget'")
    vis, txt = vision.cross_outputs, glue.lm_state.cross_outputs
    if not vis or not txt:
        raise ValueError("run a forward with images through the patched model before cross_token_loss")
    if vis[0].shape[0] != txt[0].shape[0]:
        raise ValueError(
            f"cross_token_loss pairs one image with one prompt: got {vis[0].shape[0]} images, {txt[0].shape[0]} prompts"
        )
    lv, lt = len(vis), len(txt)
    pair = [i for i in range(lv) for _ in range((i + 1) * lt // lv - i * lt // lv)]
    u = joint_projection(model, "vision")(torch.stack(vis))[pair]
    from crossget.loss import cross_token_alignment  # crossget.loss imports this package

    return cross_token_alignment(u, torch.stack(txt))


def patch_model(
    model: nn.Module,
    r: RSpec | Mapping[str, RSpec] | None = None,
    *,
    flops: float | None = None,
    keep: int | None = None,
    method: str = "crossget",
    towers: Sequence[str] | None = None,
    prop_attn: bool = True,
    metric: str | None = None,
    text_len: int | None = None,
    trace_sources: bool = False,
    fastv_layer: int = FASTV_LAYER,
    contextual: int | None = None,
    importance: str = "cross",
) -> dict:
    """Patch a LLaVA model in place (``crossget.patch`` calls this); returns the config dict.

    Budgets (give one): ``r`` tokens per vision layer (int, or one per layer with zeros
    from the feature layer on), ``keep`` visual tokens per image for the LM, or ``flops``
    a target ratio of the estimated prefill FLOPs (:func:`prefill_flops`, ``text_len``
    prompt tokens besides the image, default 64). ``fastv``/``visionzip`` read ``r`` as
    the visual-token count CrossGET's schedule ``r`` gives. ``fastv_layer``: FastV's K;
    ``contextual``: VisionZip's contextual tokens (default 10/64 of ``keep``).
    ``importance`` (``method="crossget"``): ``"cross"`` or ``"attention"`` (the same for
    LLaVA: the authors' attention rule, cross tokens in the tower and the LM) or
    ``"none"`` (complete-graph matching without cross tokens: an ablation).

    Raises:
        TypeError: not a LLaVA model with a CLIP vision tower.
        ValueError: bad method, budget (more than exist, zero, negative), towers or metric.
    """
    base = _base(model)
    _vision(model)
    strategy = _strategy(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for LLaVA, got {method!r}")
    if importance not in ("cross", "attention", "none"):
        raise ValueError(f"importance must be 'cross', 'attention' or 'none', got {importance!r}")
    importance = "none" if importance == "none" else "attention"
    metric = metric or ("keys_mean" if method == "tome" else "keys")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if towers is not None and (isinstance(towers, str) or list(towers) not in (["vision"], [])):
        raise ValueError(f"LLaVA reduces its vision tower only: towers must be ('vision',) or None, got {towers!r}")
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
    n_lm = len(base.language_model.layers)
    if method == "fastv" and (isinstance(fastv_layer, bool) or not isinstance(fastv_layer, int) or not 1 <= fastv_layer < n_lm):
        raise ValueError(f"fastv_layer must be an int in [1, {n_lm - 1}] for this {n_lm}-layer LM, got {fastv_layer!r}")
    if method == "visionzip" and len(feature_layers(model)) > 1:
        raise ValueError("visionzip selects tokens of one feature layer; this model concatenates several")
    if method == "visionzip" and min(feature_layers(model)) == 0:
        raise ValueError("visionzip needs a tower layer before vision_feature_layer")

    estimate = None
    text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
    if flops is not None:
        keep, estimate = _solve_flops(model, flops, method, text_len, fastv_layer)
    if keep is not None:
        keep = _check_keep(model, keep)
        sched = _merge_schedule(model, keep) if method in MERGING else None
    else:
        sched = _resolve_r(model, r)
        keep = _keep_from_schedule(model, sched)
        sched = sched if method in MERGING else None
    if method == "none":
        sched, keep = [0] * len(_vision(model).encoder.layers), stock_image_tokens(model)
    if method == "visionzip" and keep == stock_image_tokens(model):
        method_keep = None  # nothing to select: leave the tower alone
    else:
        method_keep = keep

    # reconfiguring: remove everything, carry trained cross tokens over
    vision_record = _vision_tower_record(model)
    theta_vision = uninstall(vision_record)
    theta_text = _uninstall_glue(model)
    # FastV prunes inside the LM: the prompt still holds every visual token
    placeholders = stock_image_tokens(model) if method == "fastv" else keep
    glue = _Glue(method, placeholders, base.config.vision_feature_layer, strategy)
    if method in MERGING:
        settings = TowerSettings(
            "vision", sched, method, prop_attn, metric, trace_sources,
            importance=importance if method == "crossget" else "cross",
        )
        install(vision_record, settings, theta_vision)
        if method == "crossget" and importance != "none":
            _install_lm_cross_tokens(base, glue, theta_text)
    elif method == "fastv":
        _install_fastv(base, glue, fastv_layer, keep)
    elif method_keep is not None:
        _install_visionzip(model, glue, *_visionzip_split(model, keep, contextual))
    glue.handles.append(
        base.register_forward_pre_hook(lambda m, args, kwargs: _on_llava_forward(m, glue, args, kwargs), with_kwargs=True)
    )
    base.__dict__[GLUE_ATTR] = glue
    return {
        "method": method,
        "towers": ["vision"] if method in MERGING else [],
        "r": {"vision": list(sched)} if method in MERGING else {},
        "keep": keep,
        "flops": flops,
        "flops_estimate": estimate,
        "text_len": text_len,
        "prop_attn": prop_attn,
        "metric": metric,
        "trace_sources": trace_sources,
        "importance": importance if method == "crossget" else None,
        "fastv_layer": fastv_layer if method == "fastv" else None,
        "contextual": _visionzip_split(model, keep, contextual)[1] if method_keep and method == "visionzip" else None,
    }


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model`: stock classes, no hooks, no cross-token parameters."""
    uninstall(_vision_tower_record(model))
    _uninstall_glue(model)


def tokens_per_layer(model: nn.Module, text_len: int | None = None) -> dict[str, list[int]]:
    """Tokens after each vision layer (``vision``) and in each LM layer (``language``,
    for one image and ``text_len`` other prompt tokens, default 64)."""
    glue = getattr(_base(model), GLUE_ATTR, None)
    text_len = DEFAULT_TEXT_LEN if text_len is None else text_len
    n0, layers = _tokens_in(model), len(_vision(model).encoder.layers)
    n_lm = len(_base(model).language_model.layers)
    method = glue.method if glue is not None else "none"
    state = _vision_tower_record(model).state
    if state is not None and method in ("crossget", "tome"):
        vision = [m for _, m in token_counts(n0, state.settings.r, 1)]
    elif method == "visionzip" and glue.visionzip_layer is not None:
        cut = min(feature_layers(model)) - 1
        after = glue.image_tokens + (_strategy(model) == "default")
        vision = [n0] * cut + [after] * (layers - cut)
    else:
        vision = [n0] * layers
    lm_in = (glue.image_tokens if glue is not None else stock_image_tokens(model)) + text_len
    language = [lm_in] * n_lm
    if method == "fastv":
        language[glue.fastv.layer :] = [glue.fastv.keep + text_len] * (n_lm - glue.fastv.layer)
    return {"vision": vision, "language": language}
