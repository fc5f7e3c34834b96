"""Benchmark patched models against the stock model: FLOPs, tokens, speed, memory.

    from crossget.tools.bench import load_model, make_inputs, forward_for, run_benchmark
    model = load_model("clip-vit-b16", "vision")
    rows = run_benchmark(
        model, make_inputs(model, "vision", batch=8),
        [{"method": "tome", "r": 16}, {"method": "crossget", "flops": 0.58}],
        forward=forward_for(model, "vision"), out_dir="benchmarks/clip-vit-b16-vision",
    )

Timing is interleaved: every round times every config once (the stock model
included), in a rotating order, so drifting machine load hits all configs alike;
speedups are ratios of medians from the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from crossget.api import config, is_patched, patch_from_config, states, tokens_per_layer, unpatch
from crossget.flops import count_flops
from crossget.io import apply
from crossget.tools.common import ModelClock, sync
from crossget.tools.memory import PeakMemory

__all__ = [
    "ARCHITECTURES",
    "benchmark_model",
    "SUMMARY_KEYS",
    "TOWERS",
    "build_configs",
    "forward_for",
    "load_model",
    "make_inputs",
    "results_markdown",
    "run_benchmark",
    "write_results",
]

TOWERS = ("vision", "text", "both", "caption")  # caption: a captioning model's whole generate call
CONFIG_KEYS = ("name", "method", "r", "flops", "towers", "prop_attn", "metric", "text_len")
SUMMARY_KEYS = (
    "name",  # label of the config ("baseline" is the stock model)
    "method",  # "none" (stock model), "tome" or "crossget"
    "r",  # r as given (int, per-layer list, {tower: r}) or None
    "flops_target",  # FLOPs ratio asked for, or None
    "flops_estimate",  # the schedule solver's analytic ratio (flops configs), or None
    "schedule",  # {tower: per-layer r} as patched; {} for the stock model
    "tokens_per_layer",  # {tower: tokens after each layer}; {} for the stock model
    "gflops_per_sample",  # measured, FlopCounterMode (+ CPU SDPA formula)
    "gflops_ratio",  # vs the stock model
    "batch_ms",  # median ms per batch forward
    "samples_per_s",
    "speedup",  # stock median batch ms / this median batch ms
    "latency_ms",  # median ms of a batch-1 forward (None if not measured)
    "latency_speedup",
    "peak_act_mib",  # peak activation memory of one batch forward
    "match_share",  # share of the timed batch forward spent matching + merging (median over rounds)
)


# --------------------------------------------------------------------------- models
def _clip_vit_b16_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        ),
        text_config=dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
            max_position_embeddings=77,
        ),
        projection_dim=512,
    )


def _clip_tiny_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, vocab_size=100, bos_token_id=97, eos_token_id=98, pad_token_id=98,
        ),
        projection_dim=16,
    )


def _blip_vit_b16_config():
    """BLIP captioning base: ViT-B/16 at 384 px (577 tokens), BERT-base decoder."""
    from transformers import BlipConfig

    return BlipConfig(
        # BLIP's vision default initializer_range is 1e-10 (all keys ~0); use ViT's 0.02
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=384, patch_size=16, initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            encoder_hidden_size=768,
        ),
    )


def _blip2_vit_g_config():
    """BLIP-2's ViT-g/14 (1408 wide, 39 layers, 224 px: 257 tokens) and BERT-base Q-Former
    (32 queries), with an OPT-125m-sized language model instead of OPT-2.7b/6.7b (CPU)."""
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
            image_size=224, patch_size=14, qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            cross_attention_frequency=2, encoder_hidden_size=1408,
        ),
        text_config=dict(
            model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
            num_attention_heads=12, word_embed_proj_dim=768, max_position_embeddings=2048,
            bos_token_id=2, eos_token_id=2, pad_token_id=1,
        ),
        num_query_tokens=32,
        image_token_index=50265,
    )


def _blip_tiny_config():
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            encoder_hidden_size=32, max_position_embeddings=32, bos_token_id=97, sep_token_id=98, pad_token_id=0,
            eos_token_id=98,
        ),
    )


def _blip2_tiny_config():
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        qformer_config=dict(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            encoder_hidden_size=32, max_position_embeddings=32,
        ),
        text_config=dict(
            model_type="opt", vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
        ),
        num_query_tokens=4,
        image_token_index=99,
    )


# name -> config factory (CLIPConfig, BlipConfig or Blip2Config); random weights, nothing downloaded
ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "clip-vit-b16": _clip_vit_b16_config,
    "blip-vit-b16": _blip_vit_b16_config,
    "blip2-vit-g": _blip2_vit_g_config,
    "clip-tiny": _clip_tiny_config,  # for tests and smoke runs
    "blip-tiny": _blip_tiny_config,
    "blip2-tiny": _blip2_tiny_config,
}


def load_model(spec: str, tower: str = "vision", seed: int = 0) -> nn.Module:
    """A model in eval mode: a named architecture with random weights, or a local directory.

    Named architectures give the smallest model that runs ``tower``: ``CLIPVisionModel``
    (vision), ``CLIPTextModel`` (text) or ``CLIPModel`` (both); for BLIP / BLIP-2 names,
    ``Blip(2)VisionModel`` (vision) or ``Blip(2)ForConditionalGeneration`` (caption). A
    directory is loaded with ``transformers.AutoModel.from_pretrained``
    (``AutoModelForImageTextToText`` for caption).

    Raises:
        ValueError: unknown tower, or ``spec`` is neither a known name nor a directory.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if spec in ARCHITECTURES:
        cfg = ARCHITECTURES[spec]()
        torch.manual_seed(seed)
        model = _build(spec, cfg, tower)
    elif os.path.isdir(spec):
        from transformers import AutoModel, AutoModelForImageTextToText

        model = (AutoModelForImageTextToText if tower == "caption" else AutoModel).from_pretrained(spec)
    else:
        names = ", ".join(ARCHITECTURES)
        raise ValueError(f"model {spec!r} is neither a named architecture ({names}) nor a local directory")
    return model.eval()


def _build(spec: str, cfg, tower: str) -> nn.Module:
    import transformers as tf

    if isinstance(cfg, (tf.BlipConfig, tf.Blip2Config)):
        blip = isinstance(cfg, tf.BlipConfig)
        if tower == "vision":
            return (tf.BlipVisionModel if blip else tf.Blip2VisionModel)(cfg.vision_config)
        if tower == "caption":
            return (tf.BlipForConditionalGeneration if blip else tf.Blip2ForConditionalGeneration)(cfg)
        raise ValueError(f"{spec} benchmarks tower 'vision' or 'caption', got {tower!r}")
    if tower == "caption":
        raise ValueError(f"tower 'caption' needs a captioning architecture (blip-*, blip2-*), got {spec!r}")
    if tower == "vision":
        return tf.CLIPVisionModel(cfg.vision_config)
    if tower == "text":
        return tf.CLIPTextModel(cfg.text_config)
    return tf.CLIPModel(cfg)


def _sub_config(model: nn.Module, kind: str):
    cfg = model.config
    sub = getattr(cfg, f"{kind}_config", None)
    return sub if sub is not None else cfg


def make_inputs(model: nn.Module, tower: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for ``tower``: ``pixel_values`` at the model's image size (vision,
    both, caption) and/or full-length texts (``input_ids`` ending in the EOT token,
    ``attention_mask`` all ones)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    if tower in ("vision", "both", "caption"):
        vc = _sub_config(model, "vision")
        channels = getattr(vc, "num_channels", 3)  # BLIP's vision config has none (always RGB)
        inputs["pixel_values"] = torch.randn(batch, channels, vc.image_size, vc.image_size, generator=g)
    if tower in ("text", "both"):
        tc = _sub_config(model, "text")
        n, vocab, eos = tc.max_position_embeddings, tc.vocab_size, tc.eos_token_id
        # legacy configs (eos_token_id == 2) pool at argmax(input_ids): make EOT the largest id
        eot = vocab - 1 if eos == 2 else eos
        ids = torch.randint(0, vocab - 1, (batch, n), generator=g)
        ids[ids == eot] = 0
        ids[:, -1] = eot
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones(batch, n, dtype=torch.long)
    if not inputs:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return inputs


def forward_for(
    model: nn.Module, tower: str, max_new_tokens: int = 10
) -> Callable[[nn.Module, Mapping[str, Any]], Any]:
    """``forward(model, inputs)`` that runs ``tower``: ``get_image_features`` /
    ``get_text_features`` of a dual encoder, the whole model for ``both`` or a single tower;
    for ``caption`` a greedy ``generate`` of exactly ``max_new_tokens`` tokens (so every
    config decodes the same amount, whatever the random weights predict)."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if tower == "caption":
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return lambda m, inputs: m.generate(**inputs, **gen)
    method = {"vision": "get_image_features", "text": "get_text_features"}.get(tower)
    if method is not None and hasattr(model, method):
        return lambda m, inputs: getattr(m, method)(**inputs)
    return lambda m, inputs: m(**inputs)


# --------------------------------------------------------------------------- configs
def _describe(cfg: Mapping[str, Any]) -> str:
    if cfg["method"] == "none":
        return "baseline"
    if cfg.get("flops") is not None:
        return f"{cfg['method']} flops={cfg['flops']:g}"
    r = cfg.get("r")
    if isinstance(r, Sequence) and len(set(r)) == 1:
        r = f"{r[0]}x{len(r)}"
    return f"{cfg['method']} r={r}"


def _normalize(cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(cfg) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown benchmark config keys {sorted(unknown)}; allowed: {CONFIG_KEYS}")
    out = dict(cfg)
    out.setdefault("method", "crossget")
    if out["method"] == "none" and (out.get("flops") is not None or out.get("r") not in (None, 0)):
        raise ValueError(f"method 'none' is the stock (unpatched) model and takes no r or flops: {dict(cfg)}")
    out.setdefault("name", _describe(out))
    return out


def build_configs(
    methods: Sequence[str],
    rs: Sequence[Any] = (),
    flops: Sequence[float] = (),
    towers: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One config per (method, r) and per (method, flops target)."""
    configs = []
    for method in methods:
        for r in rs:
            configs.append({"method": method, "r": r})
        for f in flops:
            configs.append({"method": method, "flops": f})
    if towers is not None:
        for c in configs:
            c["towers"] = tuple(towers)
    return configs


def _apply(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    apply(model, {k: v for k, v in cfg.items() if k != "name"})


def _snapshot(model: nn.Module):
    """What it takes to give the caller's model back as it came: settings and cross tokens."""
    if not is_patched(model):
        return None
    thetas = {k: s.cross_tokens.detach().clone() for k, s in states(model).items() if s.cross_tokens is not None}
    return config(model), thetas


def _restore(model: nn.Module, snap) -> None:
    if snap is None:
        unpatch(model)
        return
    saved, thetas = snap
    patch_from_config(model, saved)
    with torch.no_grad():
        for kind, state in states(model).items():
            if kind in thetas and state.cross_tokens is not None:
                state.cross_tokens.copy_(thetas[kind])


# --------------------------------------------------------------------------- measuring
def _time_ms(forward, model, inputs, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        forward(model, inputs)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def _peak_activation_mib(forward, model, inputs, device) -> float:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            forward(model, inputs)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.inference_mode(), PeakMemory() as mem:
        forward(model, inputs)
    return mem.peak_mib


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters that do not require grad, for the duration (then as they were).

    FlopCounterMode's module tracker hooks the gradients of module inputs that require
    grad; a view of a parameter taken without grad (BLIP-2's expanded query tokens) has
    none to hook and fails.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _match_clocks(model: nn.Module, device: torch.device) -> list[ModelClock]:
    """Time matching + merging in every patched tower (TowerState.match_observer)."""
    clocks = []
    for state in states(model).values() if is_patched(model) else ():
        state.match_observer = clock = ModelClock(device)
        clocks.append(clock)
    return clocks


def _environment(model: nn.Module, device: torch.device, threads: int) -> dict[str, Any]:
    import transformers

    from crossget import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "crossget": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "model_class": type(model).__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def run_benchmark(
    model: nn.Module | Callable[[], nn.Module],
    inputs: Mapping[str, Any],
    configs: Sequence[Mapping[str, Any]],
    rounds: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    *,
    forward: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None,
    latency: bool = True,
    out_dir: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``configs`` against the stock model; returns one summary row per config.

    Args:
        model: the model, or a function that builds it. It is patched, unpatched and
            finally given back as it came (its patch settings and cross tokens too).
        inputs: one batch of keyword inputs (tensors are moved to the model's device);
            the batch-1 latency uses the first sample of every tensor.
        configs: dicts with ``method`` ("none" | "tome" | "crossget"), ``r`` (int, per-layer
            list or ``{tower: r}``) or ``flops`` (target ratio), and optionally ``towers``,
            ``prop_attn``, ``metric``, ``text_len`` (passed to :func:`crossget.patch`) and
            ``name``. The stock model (``{"method": "none"}``, name "baseline") is added
            first unless a config already has method "none".
        rounds / warmup: timed rounds, and untimed rounds before them. Every round
            times each config once (batch, then batch 1), interleaved.
        threads: ``torch.set_num_threads`` for the whole run (None: leave it).
        forward: ``forward(model, inputs)``, default ``model(**inputs)``; see :func:`forward_for`.
        latency: also time batch-1 forwards.
        out_dir: if given, write ``results.json`` (environment, configs, raw timings,
            summary) and ``results.md`` (a table) there.
        meta: extra fields for the JSON's ``meta`` (model name, tower, ...).
        progress: show a tqdm bar over rounds x configs.

    Returns:
        Summary rows with the keys in :data:`SUMMARY_KEYS`, the stock model first.

    Raises:
        ValueError / TypeError: a bad config (checked by patching every config once
        before anything is timed) or an unsupported model.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if not isinstance(model, nn.Module):
        model = model()
    forward = forward or (lambda m, x: m(**x))
    configs = [_normalize(c) for c in configs]
    if not any(c["method"] == "none" for c in configs):
        configs.insert(0, _normalize({"method": "none"}))
    configs.sort(key=lambda c: c["method"] != "none")  # stock model first (stable)
    names = [c["name"] for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark config names must be unique, got {names}")

    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    single = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch_size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    previous_threads = torch.get_num_threads()
    snap = _snapshot(model)
    try:
        if threads is not None:
            torch.set_num_threads(threads)

        # untimed measurements, one config at a time (also validates every config)
        static = []
        for cfg in configs:
            _apply(model, cfg)
            patched = is_patched(model)
            with torch.inference_mode(), _frozen(model):
                gflops = count_flops(forward, model, single) / 1e9
            static.append({
                "schedule": config(model).to_dict()["r"] if patched else {},
                "flops_estimate": config(model).flops_estimate if patched else None,
                "tokens_per_layer": tokens_per_layer(model) if patched else {},
                "gflops_per_sample": gflops,
                "peak_act_mib": _peak_activation_mib(forward, model, batch, device),
            })

        raw = {c["name"]: {"batch_ms": [], "latency_ms": [], "match_ms": []} for c in configs}
        total = (warmup + rounds) * len(configs)
        with tqdm(total=total, desc="benchmark", disable=not progress, leave=False) as bar:
            for rnd in range(warmup + rounds):
                shift = rnd % len(configs)
                for cfg in configs[shift:] + configs[:shift]:
                    _apply(model, cfg)
                    clocks = _match_clocks(model, device)
                    t_batch = _time_ms(forward, model, batch, device)
                    t_match = 1e3 * sum(c.seconds for c in clocks)
                    t_single = _time_ms(forward, model, single, device) if latency else None
                    if rnd >= warmup:
                        raw[cfg["name"]]["batch_ms"].append(t_batch)
                        raw[cfg["name"]]["match_ms"].append(t_match)
                        if latency:
                            raw[cfg["name"]]["latency_ms"].append(t_single)
                    bar.set_postfix_str(cfg["name"])
                    bar.update()
    finally:
        _restore(model, snap)
        torch.set_num_threads(previous_threads)

    rows = _summarize(configs, static, raw, batch_size)
    if out_dir is not None:
        env = {**_environment(model, device, torch.get_num_threads() if threads is None else threads),
               "batch": batch_size, "rounds": rounds, "warmup": warmup, **(meta or {})}
        write_results(out_dir, env, configs, raw, rows)
    return rows


def _summarize(configs, static, raw, batch_size) -> list[dict[str, Any]]:
    base_i = next(i for i, c in enumerate(configs) if c["method"] == "none")
    med = {n: {k: statistics.median(v) if v else None for k, v in t.items()} for n, t in raw.items()}
    base = med[configs[base_i]["name"]]
    base_gflops = static[base_i]["gflops_per_sample"]
    rows = []
    for cfg, st in zip(configs, static):
        m = med[cfg["name"]]
        lat = m["latency_ms"]
        row = {
            "name": cfg["name"],
            "method": cfg["method"],
            "r": cfg.get("r"),
            "flops_target": cfg.get("flops"),
            "flops_estimate": st["flops_estimate"],
            "schedule": st["schedule"],
            "tokens_per_layer": st["tokens_per_layer"],
            "gflops_per_sample": st["gflops_per_sample"],
            "gflops_ratio": st["gflops_per_sample"] / base_gflops if base_gflops else None,
            "batch_ms": m["batch_ms"],
            "samples_per_s": batch_size / m["batch_ms"] * 1e3,
            "speedup": base["batch_ms"] / m["batch_ms"],
            "latency_ms": lat,
            "latency_speedup": base["latency_ms"] / lat if lat else None,
            "peak_act_mib": st["peak_act_mib"],
            "match_share": statistics.median(
                m_ms / b_ms for m_ms, b_ms in zip(raw[cfg["name"]]["match_ms"], raw[cfg["name"]]["batch_ms"])
            ),
        }
        rows.append({k: row[k] for k in SUMMARY_KEYS})
    return rows


# --------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _tokens(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v[0]}…{v[-1]}" for k, v in row["tokens_per_layer"].items()) or "stock"


def results_markdown(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    head = (
        f"# crossget benchmark: {meta.get('model', meta.get('model_class', 'model'))}"
        f"{' (' + meta['tower'] + ')' if meta.get('tower') else ''}\n\n"
        f"batch {meta.get('batch')}, {meta.get('threads')} threads, {meta.get('device')}, "
        f"{meta.get('rounds')} rounds (+{meta.get('warmup')} warm-up), medians; torch {meta.get('torch')}, "
        f"transformers {meta.get('transformers')}, {meta.get('date')}\n\n"
        "| config | tokens (after layer 1…last) | GFLOPs/sample | GFLOPs ratio | ms/batch | samples/s "
        "| speedup | latency ms (bs 1) | latency speedup | peak act. MiB | match share |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['name']} | {_tokens(r)} | {r['gflops_per_sample']:#.4g} | {_fmt(r['gflops_ratio'], '.3f')} "
        f"| {r['batch_ms']:.1f} | {r['samples_per_s']:.1f} | {r['speedup']:.2f}x "
        f"| {_fmt(r['latency_ms'], '.1f')} | {_fmt(r['latency_speedup'], '.2f')} "
        f"| {r['peak_act_mib']:#.4g} | {r['match_share']:.1%} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def write_results(out_dir, meta, configs, raw, rows) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` to ``out_dir`` (created); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": dict(meta), "configs": [dict(c) for c in configs], "raw": raw, "summary": list(rows)}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(doc, indent=2, default=list) + "\n")
    md_path.write_text(results_markdown(meta, rows))
    return json_path, md_path


def benchmark_model(
    model_spec: str,
    tower: str,
    methods: Sequence[str],
    rs: Sequence[int],
    flops: Sequence[float],
    reduce: Sequence[str] | None,
    *,
    batch: int = 8,
    rounds: int = 5,
    warmup: int = 1,
    threads: int = 2,
    latency: bool = True,
    device: str = "cpu",
    attn: str | None = None,
    max_new_tokens: int = 10,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """``crossget bench``: build or load ``model_spec`` (:func:`load_model`), benchmark every
    method at every ``r`` and FLOPs target (:func:`build_configs`, :func:`run_benchmark`) on one
    generated batch, and write ``results.json`` / ``results.md`` to ``out_dir`` (default
    ``benchmarks/<model>-<tower>``); returns the folder."""
    torch.set_num_threads(threads)
    model = load_model(model_spec, tower).to(device)
    if attn:
        model.set_attn_implementation(attn)
    name = os.path.basename(os.path.normpath(model_spec))
    out = Path(out_dir or os.path.join("benchmarks", f"{name}-{tower}"))
    meta = {"model": model_spec, "tower": tower, "reduce": list(reduce) if reduce else None}
    if tower == "caption":
        meta["max_new_tokens"] = max_new_tokens
    run_benchmark(
        model, make_inputs(model, tower, batch), build_configs(methods, rs, flops, reduce),
        rounds=rounds, warmup=warmup, threads=threads, forward=forward_for(model, tower, max_new_tokens),
        latency=latency, out_dir=out, meta=meta,
    )
    return out
