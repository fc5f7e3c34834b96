"""Table and plot of the tiny LLaVA's shapes-VQA results (run.sh): python benchmarks/llava-small/table.py [DIR].

Accuracy against the visual tokens the language model receives, every method at every budget.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
rows = []
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())["results"]
    keep = json.loads(f.read_text())["meta"].get("keep")
    rows.append({"method": r["method"], "keep": keep, "tokens": r["visual_tokens"], "acc": r["score"]["accuracy"],
                 "gflops": r["gflops_prefill"], "rate": r["samples_per_s"], "n": r["n"]})
base = next(r for r in rows if r["method"] == "none")
rows.sort(key=lambda r: (r["method"] != "none", r["method"], -(r["keep"] or 0)))
lines = [f"Tiny LLaVA (shipped CLIP tower, 4 x 256 Llama) on {base['n']} shapes test questions; VQA accuracy (%).", "",
         "| method | visual tokens (budget) | accuracy | prefill GFLOPs | ratio | questions/s |",
         "|---|---:|---:|---:|---:|---:|"]
for r in rows:
    tokens = str(r["tokens"]) if r["keep"] is None else f"{r['tokens']} ({r['keep']})"
    lines.append(f"| {'unreduced' if r['method'] == 'none' else r['method']} | {tokens} | {r['acc']:.1f} "
                 f"| {r['gflops']:.3f} | {r['gflops'] / base['gflops']:.3f} | {r['rate']:.1f} |")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

fig, ax = plt.subplots(figsize=(6, 4))
for m in sorted({r["method"] for r in rows} - {"none"}):
    rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["keep"])
    ax.plot([r["keep"] for r in rs], [r["acc"] for r in rs], marker="o", label=m)
ax.axhline(base["acc"], color="k", linestyle="--", label=f"unreduced ({base['tokens']} tokens)")
ax.set_xlabel("visual tokens into the language model")
ax.set_ylabel("shapes VQA accuracy (%)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out / "accuracy.png", dpi=120)
