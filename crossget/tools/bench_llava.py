"""LLaVA-1.5 benchmark: every method at equal visual-token budgets.

Two parts, one run (``crossget bench --model llava-1.5``):

- **FLOPs of the real LLaVA-1.5-7B and -13B** per method and budget, for one answer
  (one image, ``prompt_tokens`` text tokens, ``new_tokens`` generated). The vision tower
  is the real-size CLIP ViT-L/14-336 (random weights), run patched under
  ``FlopCounterMode``, so the count includes matching, merging and VisionZip's
  selection; the projector and the language model are built on the meta device (no
  weights) and counted the same way, FastV's deeper layers on the pruned sequence.
- **Measured** on a scaled-down LLaVA that fits a CPU: the same CLIP ViT-L/14-336 tower
  and projector, a Llama of LLaVA-1.5-7B's width with ``lm_layers`` layers (3: FastV
  keeps its K=2 and prunes the third; random weights): time to first token (vision +
  prefill), decode tokens/s and peak activation memory (:class:`crossget.tools.memory.PeakMemory`,
  KV cache included) of ``generate(max_new_tokens=new_tokens)`` at batch 1. A first,
  untimed round measures the memory (and warms up); then every timed round runs every
  config once, in a rotating order (drifting load hits all alike); speedups are ratios
  of medians from the same run.

Writes ``results.json``, ``results.md`` and ``tradeoff.png`` to ``out_dir``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from crossget import flops as _flops  # registers the CPU SDPA FLOP formulas
from crossget.api import config as patch_config
from crossget.config import METHODS as ALL_METHODS
from crossget.config import PatchConfig
from crossget.families.llava import FASTV_LAYER, image_tokens
from crossget.families.visual_site import LM_METHODS
from crossget.io import apply
from crossget.tools.common import save_figure, write_benchmark
from crossget.tools.memory import PeakMemory
from crossget.tools.zoo import llava15_config

__all__ = [
    "Clock", "budget_configs", "count_flops", "generate_answer", "lm_flops", "run_llava_benchmark", "scaled_llava",
    "timed_answer",
]

METHODS = tuple(m for m in ALL_METHODS if m != "none")  # every method, against the stock baseline
DEFAULT_KEEPS = (64, 128, 192, 288)
DEFAULT_RS = (13,)
_ = _flops


# --------------------------------------------------------------------------- configs and models
def budget_configs(methods: Sequence[str], keeps: Sequence[int], rs: Sequence[int]) -> list[dict]:
    """The stock model first, then every method at every budget (``keep`` visual tokens
    per image, or CrossGET's schedule ``r``; FastV / VisionZip read ``r`` as the token
    count that schedule gives)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods must be among {METHODS}, got {bad}")
    configs: list[dict] = [{"name": "baseline", "method": "none"}]
    for kind, values in (("keep", keeps), ("r", rs)):
        for v in values:
            for m in methods:
                configs.append({"name": f"{m} {kind}={v}", "method": m, kind: v})
    return configs


def scaled_llava(lm_layers: int = 3, size: str = "7b", seed: int = 0) -> nn.Module:
    """LLaVA-1.5 with its real CLIP ViT-L/14-336 tower and projector and a Llama of the
    real width cut to ``lm_layers`` layers; random weights, eval mode."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava15_config(size)
    cfg.text_config.num_hidden_layers = lm_layers
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def _apply(model: nn.Module, cfg: dict) -> None:
    apply(model, {k: cfg[k] for k in ("method", "keep", "r") if k in cfg})


def _prompt(model: nn.Module, prompt_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    high = min(cfg.image_token_id, cfg.text_config.vocab_size)  # LLaVA-1.5: Llama's 32000 words
    text = torch.randint(3, high, (prompt_tokens - 1,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((image_tokens(model),), cfg.image_token_id), text])[None]
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels}


# --------------------------------------------------------------------------- FLOPs of the real models
def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs ``FlopCounterMode`` counts for ``fn(*args, **kwargs)``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def lm_flops(
    config: Any, segments: Sequence[tuple[int, int]], new_tokens: int = 1, batch: int = 1
) -> dict[str, float]:
    """GFLOPs of the language model (prefill with the first token's logits, then
    ``new_tokens - 1`` cached decoding steps), built on the meta device.

    ``segments``: ``(layers, prefill tokens)`` in order, e.g. ``[(32, 640)]``, or FastV's
    ``[(2, 640), (30, 352)]``: each run of layers sees its own sequence (and keeps its own
    KV cache) while the layers add up to the model's depth.
    """
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    tc = config.text_config
    if sum(n for n, _ in segments) != tc.num_hidden_layers:
        raise ValueError(f"segments cover {sum(n for n, _ in segments)} layers, the model has {tc.num_hidden_layers}")
    parts, caches = [], []
    with torch.device("meta"):
        for layers, _ in segments:
            part = LlamaConfig.from_dict({**tc.to_dict(), "num_hidden_layers": layers})
            lm = LlamaModel(part)
            lm.set_attn_implementation("eager")  # every attention matmul explicit and counted
            parts.append(lm)
            caches.append(DynamicCache(config=part))
        head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)

    def step(lengths: Sequence[int]) -> None:
        out = None
        for lm, cache, n in zip(parts, caches, lengths):
            x = torch.empty(batch, n, tc.hidden_size, device="meta")
            out = lm(inputs_embeds=x, past_key_values=cache, use_cache=True)
        head(out.last_hidden_state[:, -1:])

    with torch.no_grad():
        prefill = count_flops(step, [n for _, n in segments])
        decode = sum(count_flops(step, [1] * len(segments)) for _ in range(new_tokens - 1))
    return {"prefill": prefill / 1e9, "decode": decode / 1e9}


def _projector_flops(config: Any, visual: int) -> float:
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        proj = LlavaMultiModalProjector(config)
    with torch.no_grad():
        return count_flops(proj, torch.empty(1, visual, config.vision_config.hidden_size, device="meta")) / 1e9


def _fastv_rank_gflops(text_config: Any, tokens: int) -> float:
    """FastV's ranking: one query row against every key of layer K - 1 (2 x H x head_dim x L)."""
    hd = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_attention_heads * hd * tokens / 1e9


def _lm_parts(config: Any, lm_visual: Sequence[tuple[int, int]], prompt_tokens: int, new_tokens: int) -> dict:
    """LM GFLOPs for ``(layers, visual tokens)`` segments; several segments are a prune inside
    the LM (FastV, DART), whose selection is counted with the prefill as FastV's ranking (one
    query row against every key; DART's pivot similarities are of the same order)."""
    out = lm_flops(config, [(n, v + prompt_tokens) for n, v in lm_visual], new_tokens)
    if len(lm_visual) > 1:
        out["prefill"] += _fastv_rank_gflops(config.text_config, lm_visual[0][1] + prompt_tokens)
    return out


def real_model_flops(
    size: str, vision_gflops: float, visual: int, lm_visual: Sequence[tuple[int, int]], prompt_tokens: int,
    new_tokens: int,
) -> dict[str, float]:
    """One answer of LLaVA-1.5-``size``: the measured tower, projector and LM on meta.
    ``lm_visual``: ``(layers, visual tokens)`` segments of the LM."""
    cfg = llava15_config(size)
    out = {"vision": vision_gflops, "projector": _projector_flops(cfg, visual)}
    out |= _lm_parts(cfg, lm_visual, prompt_tokens, new_tokens)
    out["ttft"] = out["vision"] + out["projector"] + out["prefill"]  # up to the first token
    out["total"] = out["ttft"] + out["decode"]
    return out


# --------------------------------------------------------------------------- timing
class Clock:
    """A generate() streamer that only notes when each token batch arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_answer(model: nn.Module, inputs: dict, new_tokens: int, streamer=None):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (the image token suppressed)."""
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=[model.config.image_token_id], streamer=streamer,
        )


def timed_answer(model: nn.Module, inputs: dict, new_tokens: int) -> dict[str, float]:
    """One timed :func:`generate_answer`: ms to the prompt's streamer put and to the first
    token, and decode tokens/s over the rest."""
    clock = Clock()
    start = time.perf_counter()
    generate_answer(model, inputs, new_tokens, clock)
    # puts: the prompt (after the images are encoded), then one per new token
    encoded, first, last = clock.times[0], clock.times[1], clock.times[-1]
    return {
        "vision_ms": (encoded - start) * 1e3,
        "ttft_ms": (first - start) * 1e3,
        "decode_tok_s": (new_tokens - 1) / (last - first) if new_tokens > 1 else float("nan"),
    }


_count, _generate, _timed = count_flops, generate_answer, timed_answer  # the former private names


# --------------------------------------------------------------------------- the run
def run_llava_benchmark(
    methods: Sequence[str] = METHODS,
    keeps: Sequence[int] = DEFAULT_KEEPS,
    rs: Sequence[int] = DEFAULT_RS,
    sizes: Sequence[str] = ("7b", "13b"),
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    rounds: int = 2,
    threads: int = 2,
    lm_layers: int = 3,
    out_dir: str | os.PathLike = "benchmarks/llava",
    progress: bool = True,
    model: nn.Module | None = None,
) -> dict:
    """Measure every config (see the module docstring); returns what ``results.json`` holds.

    ``model``: the LLaVA to time (default :func:`scaled_llava` with ``lm_layers``); its
    vision tower's counted FLOPs stand for the real models' tower.
    """
    if prompt_tokens < 1 or new_tokens < 2 or rounds < 1:
        raise ValueError(f"need prompt_tokens >= 1, new_tokens >= 2, rounds >= 1; got {prompt_tokens}, {new_tokens}, {rounds}")
    torch.set_num_threads(threads)
    configs = budget_configs(methods, keeps, rs)
    scaled = model is None
    model = scaled_llava(lm_layers) if scaled else model
    n_lm = {s: llava15_config(s).text_config.num_hidden_layers for s in sizes}
    rows: list[dict] = []
    t0 = time.perf_counter()

    # budgets and FLOPs: the tower really runs (counted), projector and LMs on meta
    for cfg in configs:
        _apply(model, cfg)
        pc = patch_config(model) if cfg["method"] != "none" else PatchConfig(method="none")
        visual = image_tokens(model)
        prunes_in_lm = cfg["method"] in LM_METHODS  # FastV, DART: the prompt holds every visual token
        lm_keep = pc.keep if prunes_in_lm else visual
        with torch.inference_mode():
            pixels = _prompt(model, prompt_tokens)["pixel_values"]
            vision = count_flops(model.model.vision_tower, pixels, output_hidden_states=True) / 1e9
        row = {
            "name": cfg["name"], "method": cfg["method"], "budget": {k: cfg[k] for k in ("keep", "r") if k in cfg},
            "visual_tokens": visual, "lm_visual_tokens": lm_keep, "schedule": list(pc.r["vision"]) if pc.r else None,
            "vision_gflops": vision, "times": [],
        }
        n_scaled = model.config.text_config.num_hidden_layers
        k = min(FASTV_LAYER, n_scaled) if prunes_in_lm else n_scaled
        scaled = [(k, visual)] + ([(n_scaled - k, lm_keep)] if k < n_scaled else [])
        parts = _lm_parts(model.config, scaled, prompt_tokens, new_tokens)
        row["scaled_gflops"] = vision + _projector_flops(model.config, visual) + parts["prefill"] + parts["decode"]
        for size in sizes:
            k = FASTV_LAYER if prunes_in_lm else n_lm[size]
            segments = [(k, visual)] + ([(n_lm[size] - k, lm_keep)] if k < n_lm[size] else [])
            row[size] = real_model_flops(size, vision, visual, segments, prompt_tokens, new_tokens)
        rows.append(row)
    if progress:
        print(f"[{time.perf_counter() - t0:6.0f}s] FLOPs of {len(rows)} configs counted", flush=True)

    # round 0: untimed, peak memory (and warm-up); then the timed rounds
    for rnd in range(rounds + 1):
        order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
        for cfg in order:
            _apply(model, cfg)
            row = next(r for r in rows if r["name"] == cfg["name"])
            inputs = _prompt(model, prompt_tokens)
            if rnd == 0:
                with PeakMemory() as mem:
                    generate_answer(model, inputs, new_tokens)
                row["peak_act_mib"] = mem.peak_mib
            else:
                row["times"].append(timed_answer(model, inputs, new_tokens))
        if progress:
            note = " (memory, untimed)" if rnd == 0 else ""
            print(f"[{time.perf_counter() - t0:6.0f}s] round {rnd}/{rounds} done{note}", flush=True)
    apply(model, None)

    base = rows[0]
    for row in rows:
        for key in ("vision_ms", "ttft_ms", "decode_tok_s"):
            row[key] = statistics.median(t[key] for t in row["times"])
        row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        for size in sizes:
            row[size]["ttft_ratio"] = row[size]["ttft"] / base[size]["ttft"]
            row[size]["total_ratio"] = row[size]["total"] / base[size]["total"]
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "rounds": rounds,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "sizes": list(sizes),
            "scaled_model": (
                f"CLIP ViT-L/14-336 + projector + Llama width 4096, {lm_layers} layers (random weights, fp32)"
                if scaled else f"{type(model).__name__} as given"
            ),
            "fastv_layer": FASTV_LAYER, "seconds": time.perf_counter() - t0,
        },
        "rows": rows,
    }
    write_results(results, out_dir)
    return results


# --------------------------------------------------------------------------- output
def results_markdown(results: dict) -> str:
    meta, rows = results["meta"], results["rows"]
    sizes = meta["sizes"]
    lines = [
        f"FLOPs per answer of LLaVA-1.5 ({', '.join(s.upper() for s in sizes)}): one 336 px image, "
        f"{meta['prompt_tokens']} prompt text tokens, {meta['new_tokens']} new tokens. GFLOPs up to the first token "
        "(vision + projector + LM prefill) and for the whole answer; vision counted on the real-size tower, "
        "projector and LM on the meta device (FastV's layers after K on the pruned sequence).",
        "",
        "| config | visual tokens | vision | " + " | ".join(
            f"{s.upper()} to 1st token | ratio | {s.upper()} answer | ratio" for s in sizes) + " |",
        "|---|---:|---:|" + "---:|" * 4 * len(sizes),
    ]
    for r in rows:
        tokens = f"{r['visual_tokens']}" if r["lm_visual_tokens"] == r["visual_tokens"] else (
            f"{r['visual_tokens']} → {r['lm_visual_tokens']}")
        cells = [f"{r['name']}", tokens, f"{r['vision_gflops']:.0f}"]
        for s in sizes:
            f = r[s]
            cells += [f"{f['ttft']:.0f}", f"{f['ttft_ratio']:.3f}", f"{f['total']:.0f}", f"{f['total_ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Measured on the scaled model ({meta['scaled_model']}), batch 1, threads: {meta['threads']}, "
        f"interleaved timed rounds: {meta['rounds']} (medians), generate(max_new_tokens={meta['new_tokens']}):",
        "",
        "| config | visual tokens | GFLOPs (scaled) | vision ms | 1st token ms | speedup | decode tok/s | speedup "
        "| peak act. MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens = f"{r['visual_tokens']}" if r["lm_visual_tokens"] == r["visual_tokens"] else (
            f"{r['visual_tokens']} → {r['lm_visual_tokens']}")
        lines.append(
            f"| {r['name']} | {tokens} | {r['scaled_gflops']:.0f} | {r['vision_ms']:.0f} | {r['ttft_ms']:.0f} | "
            f"{r['ttft_speedup']:.2f}x | {r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x | {r['peak_act_mib']:.0f} |"
        )
    lines += ["", f"FastV prunes after LM layer {meta['fastv_layer']} (\"a → b\": tokens before → after); "
              f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['cpus']} CPUs, "
              f"{meta['seconds']:.0f} s, {meta['date']}."]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, size = results["rows"], results["meta"]["sizes"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r["method"] for r in rows} - {"none"})
    for m in methods:
        pts = sorted((r["lm_visual_tokens"], r[size]["ttft_ratio"], r["ttft_speedup"]) for r in rows if r["method"] == m)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    axes[0].set(xlabel="visual tokens in the LM (FastV: after layer K)", ylabel=f"{size.upper()} GFLOPs to 1st token / stock",
                title=f"LLaVA-1.5-{size.upper()} FLOPs (counted)")
    axes[1].set(xlabel="visual tokens in the LM (FastV: after layer K)", ylabel="time to 1st token speedup",
                title="scaled LLaVA on CPU (measured)")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=120)


def write_results(results: dict, out_dir: str | os.PathLike) -> None:
    """``results.json``, ``results.md`` and ``tradeoff.png`` in ``out_dir``."""
    write_benchmark(results, out_dir, results_markdown, plot_results)
