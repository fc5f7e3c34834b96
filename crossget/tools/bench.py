"""Benchmark patched models against the stock model: FLOPs, tokens, speed, memory.

    from crossget.tools.bench import make_inputs, forward_for, run_benchmark
    from crossget.tools.zoo import load_model
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
from crossget.tools.zoo import TOWERS, load_model

__all__ = [
    "benchmark_model",
    "SUMMARY_KEYS",
    "TOWERS",
    "build_configs",
    "forward_for",
    "make_inputs",
    "results_markdown",
    "run_benchmark",
    "write_results",
]

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
    with torch.inference_mode(), ModelClock(device) as clock:
        forward(model, inputs)
    return clock.seconds * 1e3


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
        f"batch {meta.get('batch')}, {meta.get('threads')} threads, {meta.get('device')}, {meta.get('dtype', 'float32')}, "
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    dtype: str = "float32",
    attn: str | None = None,
    max_new_tokens: int = 10,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """``crossget bench``: build or load ``model_spec`` (:func:`load_model`), benchmark every
    method at every ``r`` and FLOPs target (:func:`build_configs`, :func:`run_benchmark`) on one
    generated batch, and write ``results.json`` / ``results.md`` to ``out_dir`` (default
    ``benchmarks/<model>-<tower>``); returns the folder. ``dtype``: the weights' and the floating
    inputs' type (``bfloat16`` on a GPU; token sizes stay float32, docs/method.md §5)."""
    torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_model(model_spec, tower).to(device=device, dtype=DTYPES[dtype])
    if attn:
        model.set_attn_implementation(attn)
    name = os.path.basename(os.path.normpath(model_spec))
    out = Path(out_dir or os.path.join("benchmarks", f"{name}-{tower}"))
    meta = {"model": model_spec, "tower": tower, "reduce": list(reduce) if reduce else None, "dtype": dtype}
    inputs = {k: v.to(DTYPES[dtype]) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in make_inputs(model, tower, batch).items()}
    if tower == "caption":
        meta["max_new_tokens"] = max_new_tokens
    run_benchmark(
        model, inputs, build_configs(methods, rs, flops, reduce),
        rounds=rounds, warmup=warmup, threads=threads, forward=forward_for(model, tower, max_new_tokens),
        latency=latency, out_dir=out, meta=meta,
    )
    return out
