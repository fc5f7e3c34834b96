"""Table of the small trained BLIPs' shapes results (run.sh): python benchmarks/blip-shapes/table.py [DIR]."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
NAMES = {"none": "unreduced", "tome": "ToMe", "crossget": "CrossGET (training-free)"}
lines = ["| task | config | score | GFLOPs | GFLOPs ratio | throughput | speedup |", "|---|---|---|---:|---:|---:|---:|"]
for task, rate in (("caption", "images_per_s"), ("vqa", "questions_per_s")):
    base = None
    for m in NAMES:
        f = out / f"{task}-{m}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        base = base or r[rate]
        if task == "caption":
            score = f"BLEU-4 {r['bleu_4']:.1f}, CIDEr {r['cider']:.1f} ({r['images']} images)"
        else:
            per = ", ".join(f"{k} {v:.1f}" for k, v in r["accuracy_per_answer_type"].items())
            score = f"accuracy {r['accuracy']:.1f} ({per}; {r['questions']} questions)"
        target = "" if m == "none" else f" flops={r['flops_target']}"
        lines.append(f"| {task} | {NAMES[m]}{target} | {score} | {r['gflops']:.3f} | {r['gflops_ratio']:.3f} "
                     f"| {r[rate]:.1f} {rate.split('_')[0]}/s | {r[rate] / base:.2f}x |")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
