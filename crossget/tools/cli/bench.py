"""``crossget bench``: FLOPs, tokens, speed and memory of every method against the stock model."""

from __future__ import annotations

import argparse
import os

from crossget.tools import bench_mllm
from crossget.tools.bench import benchmark_model
from crossget.tools.bench_llava import DEFAULT_KEEPS, DEFAULT_RS, METHODS, run_llava_benchmark
from crossget.tools.cli.options import (
    TOWER_KINDS,
    choice,
    comma_list,
    device_argument,
    int_at_least,
    non_negative_int,
    print_file,
    ratio,
)

ENCODER_METHODS = ("tome", "crossget")
LLAVA_PEERS = ("fastv", "visionzip", "divprune", "dart")  # visual-token reduction peers, multimodal LLMs only


def run_arguments(p: argparse.ArgumentParser, *, batch: int, rounds: int, out: str | None) -> None:
    p.add_argument("--batch", type=int_at_least(1), default=batch, help=f"batch size (default {batch})")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int_at_least(1), default=rounds, help=f"timed rounds (default {rounds})")
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed rounds first (default 1)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip batch-1 latency timing")
    device_argument(p)
    p.add_argument("--out", default=out, help="output directory for results.json and results.md"
                   + (f" (default {out})" if out else " (default benchmarks/<model>-<tower>)"))


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip-vit-b16",
                   help="named architecture with random weights (clip-vit-b16, blip-vit-b16, blip2-vit-g, "
                        "siglip-b16, dinov2-s14, "
                        "clip-tiny, blip-tiny, blip2-tiny) or a local model directory (from_pretrained); "
                        "llava-1.5, llava-next-7b, llava-onevision-7b, qwen2.5-vl-7b, qwen3-vl-8b: the multimodal LLM benchmarks "
                        "(real-size FLOPs, scaled-down timing); default clip-vit-b16")
    p.add_argument("--tower", choices=("vision", "text", "both", "caption"), default="vision",
                   help="what runs: image features, text features, the whole model, or a captioning "
                        "model's whole generate call (BLIP, BLIP-2) (default vision)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=10,
                   help="tokens each caption generates, exactly (--tower caption; default 10)")
    p.add_argument("--reduce", type=comma_list(choice(TOWER_KINDS), "towers"), default=None,
                   help="towers to reduce, e.g. vision,text (default: the benchmarked tower; vision for both)")
    p.add_argument("--methods", type=comma_list(choice(ENCODER_METHODS + LLAVA_PEERS + bench_mllm.TOWER_METHODS[:2]),
                                                "methods"), default=None,
                   help="comma-separated: tome, crossget (default both; the stock model always runs); "
                        "for the multimodal LLMs also fastv, divprune, dart, visionzip (llava-1.5, "
                        "llava-next-7b) and tome@tower, crossget@tower (llava-next-7b, llava-onevision-7b: "
                        "merged in the vision tower) (default every method the model takes)")
    p.add_argument("--r", type=comma_list(non_negative_int, "non-negative integers"), default=[],
                   help="tokens removed per layer; one config per value, e.g. 8,12,16")
    p.add_argument("--flops", type=comma_list(ratio, "ratios in (0, 1]"), default=[],
                   help="target FLOPs ratios solved into schedules, e.g. 0.58,0.69")
    p.add_argument("--attn", choices=("sdpa", "eager"), default=None, help="attention implementation")
    p.add_argument("--keep", type=comma_list(int_at_least(1), "positive integers"), default=[],
                   help="--model llava-1.5 / llava-next-7b / llava-onevision-7b / qwen2.5-vl-7b / qwen3-vl-8b: visual tokens "
                        "per image for the LM, one config per value (default 64,128,192,288; llava-1.5 with --r 13)")
    p.add_argument("--time-keep", type=comma_list(int_at_least(1), "positive integers"), default=[],
                   help="--model llava-next-7b / llava-onevision-7b / qwen2.5-vl-7b / qwen3-vl-8b: the keeps timed on the "
                        "scaled-down model (default 64,128)")
    p.add_argument("--vision-layers", type=int_at_least(1), default=None,
                   help="--model llava-next-7b / llava-onevision-7b / qwen2.5-vl-7b / qwen3-vl-8b: layers of the timed "
                        "vision tower, at real width (default: all)")
    p.add_argument("--lm-layers", type=int_at_least(1), default=None,
                   help="the multimodal LLMs: layers of the timed scaled-down LM (default K + 1: FastV / DART "
                        "prune before the last; K = 2, 3 for qwen3-vl-8b)")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=64,
                   help="--model llava-1.5: prompt text tokens besides the image (default 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights and inputs (bfloat16 on a GPU; default float32)")
    run_arguments(p, batch=8, rounds=5, out=None)


def bench(args: argparse.Namespace) -> int:
    """Benchmark merging configs against the stock model."""
    if args.model in bench_mllm.MODELS:
        return bench_mllm_model(args)
    if args.time_keep or args.vision_layers:
        raise ValueError("--time-keep and --vision-layers are for --model "
                         + ", ".join(bench_mllm.MODELS))
    if args.model.startswith("llava"):
        return bench_llava(args)
    if set(args.methods or ()) & set(LLAVA_PEERS + bench_mllm.TOWER_METHODS) or args.keep:
        raise ValueError("--methods fastv/visionzip/divprune/dart and --keep are for the multimodal LLMs "
                         "(--model llava-1.5, " + ", ".join(bench_mllm.MODELS) + ")")
    if not args.r and not args.flops:
        raise ValueError("give --r and/or --flops (e.g. --r 8,12,16 or --flops 0.58)")
    reduce = args.reduce
    if reduce is None and args.tower not in ("both", "caption"):
        reduce = [args.tower]

    out = benchmark_model(
        args.model, args.tower, args.methods or list(ENCODER_METHODS), args.r, args.flops, reduce,
        batch=args.batch, rounds=args.rounds, warmup=args.warmup, threads=args.threads, latency=args.latency,
        device=args.device, dtype=args.dtype, attn=args.attn, max_new_tokens=args.max_new_tokens, out_dir=args.out,
    )
    print_file(out / "results.md")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def bench_llava(args: argparse.Namespace) -> int:
    """LLaVA-1.5: FLOPs of the real 7B/13B and timings of a scaled-down model, every method
    at every visual-token budget (see crossget.tools.bench_llava)."""
    if args.model not in ("llava-1.5", "llava-1.5-7b"):
        raise ValueError(f"the LLaVA benchmark builds LLaVA-1.5 itself: --model llava-1.5, got {args.model!r}")
    if args.flops:
        raise ValueError("--flops is not a LLaVA budget here: give --keep and/or --r")
    keeps, rs = (args.keep, args.r) if (args.keep or args.r) else (DEFAULT_KEEPS, DEFAULT_RS)
    out = args.out or os.path.join("benchmarks", "llava")
    run_llava_benchmark(
        methods=args.methods or METHODS, keeps=keeps, rs=rs, prompt_tokens=args.prompt_tokens,
        new_tokens=args.max_new_tokens, rounds=args.rounds, threads=args.threads, lm_layers=args.lm_layers or 3, out_dir=out,
    )
    md = os.path.join(out, "results.md")
    print_file(md)
    print(f"wrote {md}, {os.path.join(out, 'results.json')} and {os.path.join(out, 'tradeoff.png')}")
    return 0


def bench_mllm_model(args: argparse.Namespace) -> int:
    """LLaVA-NeXT-7B, LLaVA-OneVision-7B, Qwen2.5-VL-7B: prefill FLOPs of the real architecture
    and timings of a scaled-down model, every method at every visual-token budget (see
    crossget.tools.bench_mllm)."""
    if args.flops or args.r:
        raise ValueError(f"--model {args.model} takes visual-token budgets: give --keep (not --flops / --r)")
    takes = bench_mllm.methods_of(bench_mllm.SPECS[args.model])
    methods = args.methods or takes
    bad = [m for m in methods if m not in takes]
    if bad:
        raise ValueError(f"--model {args.model} takes --methods among {', '.join(takes)}, got {bad}")
    out = args.out or os.path.join("benchmarks", f"{args.model}-bench")
    bench_mllm.run_mllm_benchmark(
        args.model, methods=methods, keeps=args.keep or bench_mllm.DEFAULT_KEEPS,
        time_keeps=args.time_keep or bench_mllm.DEFAULT_TIME_KEEPS, text_len=args.prompt_tokens,
        new_tokens=args.max_new_tokens, rounds=args.rounds, threads=args.threads, lm_layers=args.lm_layers,
        vision_layers=args.vision_layers, timing=args.latency, out_dir=out,
    )
    md = os.path.join(out, "results.md")
    print_file(md)
    print(f"wrote {md}, {os.path.join(out, 'results.json')} and {os.path.join(out, 'tradeoff.png')}")
    return 0
