"""The markdown table of run.sh's result JSONs: python benchmarks/blip-eval/table.py [DIR]."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
rate = {"itm-retrieval": "images_per_s", "caption": "images_per_s", "vqa": "questions_per_s", "nlvr2": "examples_per_s"}
rows = ["| task | config | image tokens out | GFLOPs | GFLOPs ratio | throughput (model time) | speedup |",
        "|---|---|---:|---:|---:|---:|---:|"]
for task, key in rate.items():
    base = None
    for m in ("none", "tome", "crossget"):
        r = json.loads((out / f"{task}-{m}.json").read_text())
        base = base or r[key]
        name = "unreduced" if m == "none" else f"{m} r={r['r']}"
        tokens = 577 - sum(r["schedule"].get("vision", [])) if m != "none" else 577
        rows.append(f"| {task} | {name} | {tokens} | {r['gflops']:.1f} | {r['gflops_ratio']:.3f} "
                    f"| {r[key]:.3g} {key.split('_')[0]}/s | {r[key] / base:.2f}x |")
(out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
