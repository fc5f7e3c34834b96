"""Benchmark of the multimodal LLMs after LLaVA-1.5: every method at equal visual-token budgets.

``crossget bench --model llava-next-7b | llava-onevision-7b | qwen2.5-vl-7b | qwen3-vl-8b`` (docs/mllm.md for
the families; :mod:`crossget.tools.bench_llava` is LLaVA-1.5's benchmark, whose public helpers
this one reuses). Two parts, one run:

- **Prefill FLOPs of the real 7B architecture** (built on the meta device from
  :data:`crossget.tools.zoo.MLLM_CONFIGS`: no weights) for one image of :attr:`Spec.flops_image`
  and ``text_len`` other prompt tokens, stock and every method at every ``keep`` (visual tokens
  per image reaching the LM; FastV / DART: after LM layer K), by the family's analytic
  ``prefill_flops`` (vision tower on every tile / the whole grid, projector, the projector-site
  matching rounds or DivPrune's distance matrix, DART's pivot similarities, every LM layer; no
  LM head). Cross-check: the language model's layers are
  counted by ``FlopCounterMode`` on the meta device (:func:`crossget.tools.bench_llava.lm_flops`,
  eager attention, FastV's / DART's layers after K on the pruned sequence), on a Llama decoder of the
  LM's exact matmul shapes (widths, heads, KV heads, head_dim: Qwen2's q/k/v biases and M-RoPE
  are elementwise / bias adds, which ``FlopCounterMode`` does not count either way), the LM
  head on the last token taken out; the relative difference to the analytic LM part is reported.
- **Measured** on a scaled-down model that fits a CPU: the real vision side (tower with
  ``vision_layers`` of its layers, all by default, real width) and projector / merger, an LM of
  real width with ``lm_layers`` layers (default K + 1: FastV and DART prune before the last;
  K = :attr:`Spec.fastv_layer`, 2, or 3 for Qwen3-VL's three deep-stack levels), random
  weights, fp32, batch 1: time to first token and decode tokens/s of
  ``generate(max_new_tokens=new_tokens)`` for one image of :attr:`Spec.time_image`, stock vs
  every method at every ``time_keeps``. One untimed answer of the stock model warms up; then
  every timed round runs every config once in a rotating order; medians; speedups are ratios of
  medians of the same run.

Writes ``results.json``, ``results.md`` and ``tradeoff.png`` (left: the 7B's prefill FLOPs
ratio against ``keep``; right: measured time-to-first-token speedup against the scaled model's
analytic prefill FLOPs ratio, one line per method) to ``out_dir``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
import transformers as tf
from torch import nn

import crossget
from crossget.families import llava_next, llava_onevision, qwen3_vl, qwen_vl
from crossget.families.visual_site import site_and_lm_flops
from crossget.methods import fastv
from crossget.tools.bench_llava import budget_configs, count_flops, generate_answer, lm_flops, timed_answer
from crossget.tools.common import save_figure, write_benchmark
from crossget.tools.zoo import MLLM_CONFIGS

__all__ = [
    "DEFAULT_KEEPS", "DEFAULT_TIME_KEEPS", "METHODS", "MODELS", "SPECS", "Spec", "flops_rows", "meta_model",
    "prompt_inputs", "run_mllm_benchmark", "scaled_model", "write_results",
]

# every method the four families take, against the stock model: site merging / selection, then LM pruning
METHODS = ("tome", "crossget", "divprune", "fastv", "dart")
LM_PRUNING = ("fastv", "dart")  # pruned inside the LM before layer K: the prompt keeps the stock count
# merged / selected inside the vision tower of LLaVA-NeXT and OneVision (site="tower"), every tile alike:
# a row's keep is the image's budget, each of its tiles keeps keep // tiles (docs/mllm.md)
TOWER_METHODS = ("tome@tower", "crossget@tower", "visionzip")
DEFAULT_KEEPS = (64, 128, 192, 288)
DEFAULT_TIME_KEEPS = (64, 128)
TEXT_LEN = 64  # prompt tokens besides the visual ones (as for LLaVA-1.5)


# --------------------------------------------------------------------------- what each family needs
@dataclass(frozen=True)
class Spec:
    """One benchmarked architecture: its name in :data:`crossget.tools.zoo.MLLM_CONFIGS`, the HF
    class, the crossget family module, the image the FLOPs are counted for and the one timed."""

    title: str
    model_class: type
    family: ModuleType
    flops_image: tuple[int, int]
    time_image: tuple[int, int]
    kind: str  # "anyres" (LLaVA-NeXT / OneVision inputs) or "qwen"
    note: str = ""
    fastv_layer: int = fastv.DEFAULT_LAYER  # FastV's / DART's K (Qwen3-VL: at least its deep-stack levels)


SPECS: dict[str, Spec] = {
    "llava-next-7b": Spec(
        "LLaVA-NeXT-7B (llava-v1.6-vicuna-7b)", tf.LlavaNextForConditionalGeneration, llava_next, (672, 672),
        (336, 672), "anyres", "672x672: the 2x2 pinpoint, 5 tiles"),
    "llava-onevision-7b": Spec(
        "LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov)", tf.LlavaOnevisionForConditionalGeneration,
        llava_onevision, (768, 768), (384, 384), "anyres", "768x768: the 2x2 pinpoint, 5 tiles, not downsampled"),
    "qwen2.5-vl-7b": Spec(
        "Qwen2.5-VL-7B", tf.Qwen2_5_VLForConditionalGeneration, qwen_vl, (896, 896), (448, 448), "qwen",
        "896x896: a 64x64 patch grid, 1024 merged tokens"),
    "qwen3-vl-8b": Spec(
        "Qwen3-VL-8B", tf.Qwen3VLForConditionalGeneration, qwen3_vl, (1024, 1024), (512, 512), "qwen",
        "1024x1024: a 64x64 patch grid of 16 px, 1024 merged tokens; K=3 (three deep-stack levels)", fastv_layer=3),
    "llava-next-tiny": Spec("tiny LLaVA-NeXT", tf.LlavaNextForConditionalGeneration, llava_next, (112, 112),
                            (56, 112), "anyres"),
    "llava-onevision-tiny": Spec("tiny LLaVA-OneVision", tf.LlavaOnevisionForConditionalGeneration, llava_onevision,
                                 (112, 112), (56, 112), "anyres"),
    "qwen2.5-vl-tiny": Spec("tiny Qwen2.5-VL", tf.Qwen2_5_VLForConditionalGeneration, qwen_vl, (64, 64), (56, 64),
                            "qwen"),
    "qwen3-vl-tiny": Spec("tiny Qwen3-VL", tf.Qwen3VLForConditionalGeneration, qwen3_vl, (256, 256), (256, 320),
                          "qwen", fastv_layer=2),
}
MODELS = ("llava-next-7b", "llava-onevision-7b", "qwen2.5-vl-7b", "qwen3-vl-8b")  # what `crossget bench --model` takes


def methods_of(spec: Spec) -> tuple[str, ...]:
    """What ``spec``'s model is benchmarked with: :data:`METHODS`, and for the families with a
    tower site the :data:`TOWER_METHODS` their tower takes (OneVision's SigLIP: no VisionZip)."""
    tower = getattr(spec.family.FAMILY, "tower_methods", ())
    return METHODS + tuple(m for m in TOWER_METHODS if m.removesuffix("@tower") in tower)


def tower_configs(model: nn.Module, spec: Spec, methods: Sequence[str], keeps: Sequence[int],
                  image: tuple[int, int]) -> list[dict]:
    """The tower-site configs of ``methods`` at every image budget in ``keeps``: ``keep // tiles``
    tokens per tile, named ``"<method> keep=<image budget>"``; a budget whose tiles would keep
    fewer tokens than the layers before the feature layer can merge down to is left out."""
    if not any(m in TOWER_METHODS for m in methods):
        return []
    fam = spec.family.FAMILY
    tiles = fam.tiles(model, image)
    configs = []
    for k in keeps:
        try:
            fam.tower_schedule(model, k // tiles)
        except ValueError:  # fewer than one token per tile, or out of the layers' reach
            continue
        configs += [{"name": f"{m} keep={k}", "method": m.removesuffix("@tower"), "label": m, "site": "tower",
                     "image_keep": k, "keep": k // tiles, "tiles": tiles} for m in methods if m in TOWER_METHODS]
    return configs


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"model must be one of {tuple(SPECS)}, got {name!r}")
    return SPECS[name]


def meta_model(name: str) -> nn.Module:
    """The real architecture ``name`` on the meta device (no weights): for the families' FLOPs models."""
    with torch.device("meta"):
        return _spec(name).model_class(MLLM_CONFIGS[name]())


def scaled_model(name: str, lm_layers: int | None = None, vision_layers: int | None = None, seed: int = 0) -> nn.Module:
    """``name`` with its real-width vision side and LM (real vocabulary), the LM cut to
    ``lm_layers`` layers (None: K + 1, :attr:`Spec.fastv_layer`) and the tower to ``vision_layers``
    (None: all; Qwen2.5-VL keeps the full-attention blocks below that depth, Qwen3-VL the
    deep-stack levels below it); random weights, eval mode."""
    lm_layers = lm_layers or _spec(name).fastv_layer + 1
    cfg = MLLM_CONFIGS[name]()
    cfg.text_config.num_hidden_layers = lm_layers
    if getattr(cfg.text_config, "layer_types", None) is not None:
        cfg.text_config.layer_types = cfg.text_config.layer_types[:lm_layers]
    v = cfg.vision_config
    if vision_layers is not None:
        if hasattr(v, "depth"):  # Qwen2.5-VL, Qwen3-VL
            v.depth = vision_layers
            if hasattr(v, "fullatt_block_indexes"):
                v.fullatt_block_indexes = [i for i in v.fullatt_block_indexes if i < vision_layers]
            if hasattr(v, "deepstack_visual_indexes"):
                v.deepstack_visual_indexes = [i for i in v.deepstack_visual_indexes if i < vision_layers]
        else:
            v.num_hidden_layers = vision_layers
    torch.manual_seed(seed)
    return _spec(name).model_class(cfg).eval()


def _special_ids(cfg: Any) -> list[int]:
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(cfg, k)) for k in keys if getattr(cfg, k, None) is not None]


def prompt_inputs(model: nn.Module, spec: Spec, image: tuple[int, int], text_len: int = TEXT_LEN,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt (batch 1) with one random image of ``image`` ``(h, w)`` pixels and ``text_len``
    other tokens, with as many placeholders as ``crossget.image_tokens`` says for the model as
    patched now."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    high = min([cfg.text_config.vocab_size] + _special_ids(cfg))
    count = crossget.image_tokens(model, image)
    if spec.kind == "anyres":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tile = cfg.vision_config.image_size
        tiles = image_size_to_num_patches(list(image), cfg.image_grid_pinpoints, tile)
        text = torch.randint(3, high, (text_len - 1,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((count,), cfg.image_token_id), text])[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(1, tiles, 3, tile, tile, generator=g), "image_sizes": torch.tensor([image])}
    v = cfg.vision_config
    t, h, w = 1, image[0] // v.patch_size, image[1] // v.patch_size
    if spec.family.stock_image_tokens(model, image) != t * h * w // v.spatial_merge_size**2:
        raise ValueError(f"the image processor would resize a {image} image: give sides multiple of "
                         f"{v.patch_size * v.spatial_merge_size} within its pixel bounds")
    text = torch.randint(3, high, (text_len - 2,), generator=g)
    ids = torch.cat([text[:2], torch.tensor([cfg.vision_start_token_id]), torch.full((count,), cfg.image_token_id),
                     torch.tensor([cfg.vision_end_token_id]), text[2:]])[None]
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == cfg.image_token_id).long(),
            "pixel_values": torch.randn(t * h * w, patch_dim, generator=g), "image_grid_thw": torch.tensor([[t, h, w]])}


# --------------------------------------------------------------------------- FLOPs
def _llama_shapes(text_config: Any) -> SimpleNamespace:
    """A config whose ``text_config`` is a Llama with the LM's matmul shapes (what
    :func:`~crossget.tools.bench_llava.lm_flops` builds)."""
    tc = text_config
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    llama = tf.LlamaConfig(hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                           num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
                           num_key_value_heads=tc.num_key_value_heads, head_dim=hd, vocab_size=tc.vocab_size,
                           max_position_embeddings=max(tc.max_position_embeddings, 8192))
    return SimpleNamespace(text_config=llama)


def counted_lm_flops(text_config: Any, segments: Sequence[tuple[int, int]]) -> float:
    """FLOPs of the LM's layers on ``segments`` ``(layers, tokens)`` of one prefill, counted by
    ``FlopCounterMode`` on the meta device, the LM head (last token) taken out."""
    out = lm_flops(_llama_shapes(text_config), segments, new_tokens=1)
    return out["prefill"] * 1e9 - 2 * text_config.hidden_size * text_config.vocab_size


def counted_vision_flops(model: nn.Module, spec: Spec, image: tuple[int, int]) -> float | None:
    """FLOPs of the vision side (``get_image_features``: tower on every tile, projector, packing)
    for one image, counted by ``FlopCounterMode`` on the meta device (eager attention); None for
    Qwen2.5-VL and Qwen3-VL, whose towers compute their window, rotary and position-interpolation
    indices from CPU tensors that cannot meet meta ones (their analytic towers are checked against
    a measured count in tests/test_qwen_vl.py and tests/test_qwen3_vl.py)."""
    if spec.kind != "anyres":
        return None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    impl = cfg._attn_implementation
    model.set_attn_implementation("eager")
    try:
        tile = cfg.vision_config.image_size
        tiles = image_size_to_num_patches(list(image), cfg.image_grid_pinpoints, tile)
        px = torch.empty(1, tiles, 3, tile, tile, device="meta")
        with torch.no_grad():
            return float(count_flops(spec.family.base_model(model).get_image_features, pixel_values=px,
                                     image_sizes=torch.tensor([image])))
    finally:
        model.set_attn_implementation(impl)


def _lm_segments(method: str, n_lm: int, stock: int, keep: int, text_len: int, k: int) -> list[tuple[int, int]]:
    if method in LM_PRUNING:
        return [(k, stock + text_len), (n_lm - k, keep + text_len)]
    return [(n_lm, (keep if method != "none" else stock) + text_len)]


def flops_rows(model: nn.Module, spec: Spec, image: tuple[int, int], methods: Sequence[str] | None = None,
               keeps: Sequence[int] = DEFAULT_KEEPS, text_len: int = TEXT_LEN, counted: bool = True,
               fastv_layer: int | None = None) -> list[dict]:
    """Stock, then every method at every keep (no more than the image's stock count): analytic
    prefill FLOPs and their parts, the LM part counted (``counted``), and the ratio to stock;
    then the tower-site methods (:func:`tower_configs`; their merging is in the vision column).
    ``methods``: None, :func:`methods_of`. ``fastv_layer``: FastV's / DART's K (None:
    :attr:`Spec.fastv_layer`)."""
    fam = spec.family
    methods = methods_of(spec) if methods is None else methods
    fastv_layer = spec.fastv_layer if fastv_layer is None else fastv_layer
    tcfg = fam.base_model(model).config.text_config
    n_lm = tcfg.num_hidden_layers
    stock = fam.stock_image_tokens(model, image)
    base = fam.prefill_flops(model, "none", None, image, text_len)
    rows = []
    keeps = [k for k in keeps if k < stock]
    for cfg in budget_configs([m for m in methods if m in METHODS], keeps, ()):
        m, keep = cfg["method"], cfg.get("keep", stock)
        total = fam.prefill_flops(model, m, keep, image, text_len, fastv_layer)
        prunes = m in LM_PRUNING
        lm = site_and_lm_flops(tcfg, "fastv" if prunes else "none", stock if prunes else keep, keep, text_len, fastv_layer)
        after_vision = site_and_lm_flops(tcfg, m, stock, keep, text_len, fastv_layer)
        row = {
            "name": cfg["name"], "method": m, "keep": cfg.get("keep"),
            "visual_tokens": stock if prunes else keep,
            "lm_visual_tokens": keep, "vision_gflops": (total - after_vision) / 1e9,
            "matching_gflops": (after_vision - lm) / 1e9, "lm_gflops": lm / 1e9, "prefill_gflops": total / 1e9,
            "ratio": total / base,
        }
        if counted:
            c = counted_lm_flops(tcfg, _lm_segments(m, n_lm, stock, keep, text_len, fastv_layer))
            row["lm_counted_gflops"] = c / 1e9
            row["lm_rel_diff"] = (c - lm) / lm
        rows.append(row)
    for cfg in tower_configs(model, spec, methods, keeps, image):
        total = fam.prefill_flops(model, cfg["method"], cfg["keep"], image, text_len, fastv_layer, site="tower")
        visual = cfg["tiles"] * cfg["keep"]
        lm = site_and_lm_flops(tcfg, "none", visual, visual, text_len, fastv_layer)
        row = {"name": cfg["name"], "method": cfg["label"], "keep": cfg["image_keep"], "tile_keep": cfg["keep"],
               "visual_tokens": visual, "lm_visual_tokens": visual, "vision_gflops": (total - lm) / 1e9,
               "matching_gflops": 0.0, "lm_gflops": lm / 1e9, "prefill_gflops": total / 1e9, "ratio": total / base}
        if counted:
            c = counted_lm_flops(tcfg, [(n_lm, visual + text_len)])
            row["lm_counted_gflops"] = c / 1e9
            row["lm_rel_diff"] = (c - lm) / lm
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the run
def _patch(model: nn.Module, cfg: dict, fastv_layer: int) -> None:
    crossget.unpatch(model)
    if cfg.get("site") == "tower":
        crossget.patch(model, keep=cfg["keep"], method=cfg["method"], site="tower")
    elif cfg["method"] in LM_PRUNING:
        crossget.patch(model, keep=cfg["keep"], method=cfg["method"], fastv_layer=fastv_layer)
    elif cfg["method"] != "none":
        crossget.patch(model, keep=cfg["keep"], method=cfg["method"])


def run_mllm_benchmark(
    name: str,
    methods: Sequence[str] | None = None,
    keeps: Sequence[int] = DEFAULT_KEEPS,
    time_keeps: Sequence[int] = DEFAULT_TIME_KEEPS,
    text_len: int = TEXT_LEN,
    new_tokens: int = 8,
    rounds: int = 3,
    threads: int = 2,
    lm_layers: int | None = None,
    vision_layers: int | None = None,
    timing: bool = True,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    flops_image: tuple[int, int] | None = None,
    time_image: tuple[int, int] | None = None,
) -> dict:
    """FLOPs of the real ``name`` and (``timing``) timings of its scaled-down version (module
    docstring); writes the three files to ``out_dir`` (default ``benchmarks/<name>-bench``) and
    returns what ``results.json`` holds. ``methods``: None, every one :func:`methods_of` gives."""
    spec = _spec(name)
    methods = methods_of(spec) if methods is None else tuple(methods)
    bad = [m for m in methods if m not in methods_of(spec)]
    if bad:
        raise ValueError(f"methods must be among {methods_of(spec)} for {name}, got {bad}")
    if new_tokens < 2 or rounds < 1 or text_len < 3:
        raise ValueError(f"need new_tokens >= 2, rounds >= 1, text_len >= 3; got {new_tokens}, {rounds}, {text_len}")
    torch.set_num_threads(threads)
    out_dir = out_dir or os.path.join("benchmarks", f"{name}-bench")
    flops_image, time_image = tuple(flops_image or spec.flops_image), tuple(time_image or spec.time_image)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}: {msg}", flush=True)

    real = meta_model(name)
    rows = flops_rows(real, spec, flops_image, methods, keeps, text_len)
    say(f"FLOPs of {len(rows)} configs (analytic, LM counted on meta)")
    vision = counted_vision_flops(real, spec, flops_image)
    results: dict = {
        "meta": {
            "model": name, "title": spec.title, "flops_image": list(flops_image), "flops_image_note": spec.note,
            "stock_visual_tokens": spec.family.stock_image_tokens(real, flops_image), "text_len": text_len,
            "fastv_layer": spec.fastv_layer, "keeps": list(keeps), "methods": list(methods),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": tf.__version__, "vision_counted_gflops": None if vision is None else vision / 1e9,
            "vision_rel_diff": None if vision is None else (vision / 1e9 - rows[0]["vision_gflops"]) / rows[0]["vision_gflops"],
        },
        "flops": rows,
    }
    if timing:
        results["timing"] = _timing(name, spec, methods, time_keeps, time_image, text_len, new_tokens, rounds, threads,
                                    lm_layers, vision_layers, say)
    results["meta"]["seconds"] = time.perf_counter() - t0
    write_results(results, out_dir)
    return results


def _timing(name: str, spec: Spec, methods: Sequence[str], keeps: Sequence[int], image: tuple[int, int], text_len: int,
            new_tokens: int, rounds: int, threads: int, lm_layers: int | None, vision_layers: int | None,
            say: Callable[[str], None]) -> dict:
    lm_layers = lm_layers or spec.fastv_layer + 1
    model = scaled_model(name, lm_layers, vision_layers)
    fam = spec.family
    cfg0 = fam.base_model(model).config
    stock = fam.stock_image_tokens(model, image)
    keeps = [k for k in keeps if k < stock]
    configs = budget_configs([m for m in methods if m in METHODS], keeps, ())
    configs += tower_configs(model, spec, methods, keeps, image)
    k = min(spec.fastv_layer, lm_layers - 1)
    base_flops = fam.prefill_flops(model, "none", None, image, text_len, k)
    rows = []
    for cfg in configs:
        site = {"site": cfg["site"]} if "site" in cfg else {}
        f = fam.prefill_flops(model, cfg["method"], cfg.get("keep", stock), image, text_len, k, **site)
        rows.append({"name": cfg["name"], "method": cfg.get("label", cfg["method"]),
                     "keep": cfg.get("image_keep", cfg.get("keep")), "prefill_gflops": f / 1e9,
                     "flops_ratio": f / base_flops, "times": []})
    say(f"scaled model built ({len(configs)} configs, {stock} stock visual tokens at {image[0]}x{image[1]})")
    load = []
    for rnd in range(rounds + 1):  # round 0: one untimed warm-up answer of the stock model
        order = configs[rnd % len(configs):] + configs[: rnd % len(configs)] if rnd else configs[:1]
        for cfg in order:
            _patch(model, cfg, k)
            row = next(r for r in rows if r["name"] == cfg["name"])
            inputs = prompt_inputs(model, spec, image, text_len)
            if rnd == 0:
                generate_answer(model, inputs, new_tokens)
            else:
                row["times"].append(timed_answer(model, inputs, new_tokens))
        load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        say(f"round {rnd}/{rounds} done{' (warm-up, untimed)' if rnd == 0 else ''}, load average {load[-1]:.2f}")
        if rnd == 0:
            load.pop()  # the load averages reported are those of the timed rounds
    crossget.unpatch(model)
    base = rows[0]
    for row in rows:
        for key in ("ttft_ms", "decode_tok_s"):
            row[key] = statistics.median(t[key] for t in row["times"])
        row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        for t in row["times"]:
            t.pop("vision_ms", None)  # the streamer's first put is before the images are encoded: not a vision time
    v = cfg0.vision_config
    depth = getattr(v, "depth", None) or v.num_hidden_layers
    return {
        "image": list(image), "stock_visual_tokens": stock, "rounds": rounds, "threads": threads, "new_tokens": new_tokens,
        "lm_layers": lm_layers, "vision_layers": depth, "vision_layers_real": _real_depth(name),
        "vocab": cfg0.text_config.vocab_size, "fastv_layer": k, "load_average_per_round": load,
        "model": (f"{spec.title} vision side at real width with {depth} of {_real_depth(name)} tower layers, "
                  f"LM of real width with {lm_layers} layers, vocabulary {cfg0.text_config.vocab_size}, "
                  "random weights, fp32"),
        "rows": rows,
    }


def _real_depth(name: str) -> int:
    v = MLLM_CONFIGS[name]().vision_config
    return getattr(v, "depth", None) or v.num_hidden_layers


# --------------------------------------------------------------------------- output
def results_markdown(results: dict) -> str:
    meta, rows = results["meta"], results["flops"]
    h, w = meta["flops_image"]
    lines = [
        f"# {meta['title']}: prefill FLOPs and CPU timing per method",
        "",
        f"Prefill FLOPs of the real architecture (meta device, no weights) for one {h}x{w} image "
        f"({meta['flops_image_note'] or 'the stated size'}: {meta['stock_visual_tokens']} stock visual tokens) and "
        f"{meta['text_len']} other prompt tokens. Analytic: the family's `prefill_flops` (vision = tower on every "
        "tile / the whole grid + projector or merger; matching = the projector-site rounds; LM = every decoder "
        "layer, no head). LM counted: `FlopCounterMode` on the meta device (Llama decoder of the LM's matmul "
        f"shapes, eager attention; FastV / DART: layers from K={meta['fastv_layer']} on the pruned sequence). "
        "keep = visual tokens per image in the LM (FastV / DART: after layer K; DART's `keep` counts its "
        "image pivots). Matching: ToMe's / CrossGET's rounds at the projector site, DivPrune's distance "
        "matrix, DART's pivot similarities. `@tower` and `visionzip` rows: inside the vision tower "
        "(`site=\"tower\"`), every tile keeps `keep // tiles` tokens (tiles x per tile in the LM, flat "
        "layout), the merging and the shorter tower in the vision column.",
        "",
        (f"Vision side counted by `FlopCounterMode` on the meta device (`get_image_features`, eager attention): "
         f"{meta['vision_counted_gflops']:.0f} GFLOPs, {meta['vision_rel_diff']:+.1e} relative to the analytic "
         "vision column (the same for every config: the tower and projector run unreduced)."
         if meta.get("vision_counted_gflops") is not None else
         "Vision side: not counted on the meta device (Qwen's towers mix CPU index tensors with their "
         "inputs); the analytic model is checked against a measured count in tests/test_qwen_vl.py / "
         "tests/test_qwen3_vl.py. The vision column is the same for every config: the tower and merger run "
         "unreduced."),
        "",
        "| config | visual tokens in the LM | vision GFLOPs | matching | LM analytic | LM counted | diff | "
        "prefill GFLOPs | ratio to stock |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens = (f"{r['visual_tokens']} → {r['lm_visual_tokens']}" if r["method"] in LM_PRUNING
                  else f"{r['lm_visual_tokens']} ({r['lm_visual_tokens'] // r['tile_keep']} x {r['tile_keep']})"
                  if "tile_keep" in r else str(r["lm_visual_tokens"]))
        counted = f"{r['lm_counted_gflops']:.0f} | {r['lm_rel_diff']:+.1e}" if "lm_counted_gflops" in r else "– | –"
        lines.append(f"| {r['name']} | {tokens} | {r['vision_gflops']:.0f} | {r['matching_gflops']:.2f} | "
                     f"{r['lm_gflops']:.0f} | {counted} | {r['prefill_gflops']:.0f} | {r['ratio']:.3f} |")
    t = results.get("timing")
    if t is None:
        lines += ["", "Timing: not run (`--no-latency`, or the machine was not quiet)."]
    else:
        loads = ", ".join(f"{x:.2f}" for x in t["load_average_per_round"])
        lines += [
            "",
            f"Measured on the scaled model ({t['model']}), one {t['image'][0]}x{t['image'][1]} image "
            f"({t['stock_visual_tokens']} stock visual tokens), {meta['text_len']} other prompt tokens, batch 1, "
            f"{t['threads']} threads, generate(max_new_tokens={t['new_tokens']}), {t['rounds']} interleaved timed "
            f"rounds in rotating order after one untimed stock answer (medians; speedups are ratios of medians "
            f"of this run; 1-minute load average after each round: {loads}). FLOPs ratio: the scaled model's "
            f"analytic prefill FLOPs to stock (FastV / DART K={t['fastv_layer']}).",
            "",
            "| config | prefill GFLOPs (scaled) | FLOPs ratio | 1st token ms | speedup | decode tok/s | speedup |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["rows"]:
            lines.append(f"| {r['name']} | {r['prefill_gflops']:.0f} | {r['flops_ratio']:.3f} | {r['ttft_ms']:.0f} | "
                         f"{r['ttft_speedup']:.2f}x | {r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x |")
    lines += ["", f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['cpus']} CPUs, "
              f"{meta['seconds']:.0f} s, {meta['date']}."]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, t = results["flops"], results.get("timing")
    fig, axes = plt.subplots(1, 2 if t else 1, figsize=(11 if t else 5.5, 4), squeeze=False)
    axes = axes[0]
    methods = [m for m in results["meta"]["methods"] if any(r["method"] == m for r in rows)]
    for m in methods:
        pts = sorted((r["keep"], r["ratio"]) for r in rows if r["method"] == m)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    axes[0].set(xlabel="keep (visual tokens per image in the LM)", ylabel="prefill FLOPs / stock",
                title=f"{results['meta']['model']}: prefill FLOPs (analytic)")
    if t:
        for m in methods:
            pts = sorted((r["flops_ratio"], r["ttft_speedup"]) for r in t["rows"] if r["method"] == m)
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        xs = [r["flops_ratio"] for r in t["rows"]]
        grid = [min(xs) + (1 - min(xs)) * i / 20 for i in range(21)]
        axes[1].plot(grid, [1 / x for x in grid], ":", color="grey", label="1 / FLOPs ratio")
        axes[1].set(xlabel="prefill FLOPs ratio (scaled model, analytic)", ylabel="time to 1st token speedup",
                    title="scaled model on CPU (measured)")
        axes[1].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=100)


def write_results(results: dict, out_dir: str | os.PathLike) -> None:
    """``results.json``, ``results.md`` and ``tradeoff.png`` in ``out_dir``."""
    write_benchmark(results, out_dir, results_markdown, plot_results)
