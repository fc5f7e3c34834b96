"""``crossget compare``: the stock model and every method at every budget on every task, in one
process (:func:`crossget.tools.compare.compare`)."""

from __future__ import annotations

import argparse

import torch

from crossget.tools.cli.options import command_line, device_argument, int_at_least, vars_meta
from crossget.tools.compare import LLAVA_LAYOUT, compare, describe_tasks, llava_layout_tasks, parse_task
from crossget.tools.eval.llava import TASKS


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local model folder with its processor: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                        "Qwen3-VL (config.json's model_type picks the class and the methods)")
    p.add_argument("--methods", default="all",
                   help="'all' (every method of the model's family; LLaVA-1.5: tome, crossget, fastv, visionzip, "
                        "divprune, dart) or a comma list; stock always runs")
    p.add_argument("--keep", default="64,128,192", help="visual tokens per image, comma list (default 64,128,192)")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="LLaVA's eval folder (playground/data/eval) for --tasks")
    p.add_argument("--tasks", default=None,
                   help=f"comma list of tasks in --data, laid out as LLaVA's scripts read them: {', '.join(LLAVA_LAYOUT)}")
    p.add_argument("--task", action="append", default=[], metavar="NAME=KIND:QUESTIONS:IMAGES[:ANNOTATIONS]",
                   help=f"any other set (repeatable); KIND one of {', '.join(TASKS)}; IMAGES may be empty (MMBench's TSV)")
    p.add_argument("--out", required=True, help="run files (OUT/runs/), results.json, results.md, tradeoff.png")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="questions per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N questions of every task")
    p.add_argument("--pad-square", action="store_true", help="pad images to squares first, as LLaVA-1.5 does")
    device_argument(p)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--no-answers", action="store_true", help="do not keep LLaVA's answers JSONL beside each run")
    p.add_argument("--refuse-changed", action="store_true",
                   help="stop if a stored run has other settings (default: recompute it)")


def run_compare(args: argparse.Namespace) -> int:
    """Every method at every budget against the stock model on every task, the model loaded once;
    resumable (one JSON per run in OUT/runs/); writes results.json, results.md and tradeoff.png."""
    if (args.data is None) != (args.tasks is None):
        raise ValueError("--data ROOT and --tasks NAMES go together (LLaVA's eval folder and the tasks in it)")
    tasks = llava_layout_tasks(args.data, [s.strip() for s in args.tasks.split(",") if s.strip()]) if args.data else []
    tasks += [parse_task(t) for t in args.task]
    if not tasks:
        raise ValueError("no tasks: give --data ROOT --tasks gqa,pope,... or --task NAME=KIND:QUESTIONS:IMAGES[:ANNOTATIONS]")
    torch.set_num_threads(args.threads)
    print(f"tasks: {describe_tasks(tasks)}")
    results = compare(
        args.model, tasks, args.methods, args.keep, args.out, batch_size=args.batch,
        max_new_tokens=args.max_new_tokens, limit=args.limit, pad_square=args.pad_square or None,
        device=args.device, dtype=args.dtype, answers=not args.no_answers,
        on_change="refuse" if args.refuse_changed else "rerun",
        meta={"command": command_line(), "threads": args.threads, "args": vars_meta(args)},
    )
    print(f"wrote {args.out}/results.md, results.json, tradeoff.png ({len(results['rows'])} rows)")
    return 0
