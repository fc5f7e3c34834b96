"""Markdown table of GPU recipe runs from results/NAME/{training,sweep}.json.

    python benchmarks/gpu-recipes/table.py r4_ r5_      (runs whose names start with these prefixes)
"""

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("move", "swap", "count", "colour")


def option(command: str, name: str, default: str) -> str:
    """The value of the last ``--name`` in the command (argparse keeps the last)."""
    found = re.findall(rf"--{name} (\S+)", command)
    return found[-1] if found else default


def row(run: Path) -> str:
    log = json.loads((run / "training.json").read_text())
    sweep = {r["name"]: r for r in json.loads((run / "sweep.json").read_text())["results"]}
    base = sweep["unreduced"]
    data = Path(option(log["command"], "data", "data/shapes/dataset_shapes.json")).parent.name
    delta = [sweep[f"{m} flops=0.58"]["mean_r1"] - base["mean_r1"] for m in ("tome", "crossget")]
    twins = [(base[f"twin_t2i_{v}"] + base[f"twin_i2t_{v}"]) / 2 for v in VARIANTS]
    cells = [run.name, data, log["epochs"], log["text_warmup_steps"], log["seed"],
             round(log["text_warmup_seconds"] + log["train_seconds"]),
             f"{base['mean_r1']:.1f}", f"{base['i2t_r1']:.1f}", f"{base['t2i_r1']:.1f}",
             *(f"{d:+.1f}" for d in delta), *(f"{t:.0f}" for t in twins)]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(prefixes: list[str]) -> None:
    head = ["run", "data", "epochs", "text warm-up steps", "seed", "GPU s", "mean R@1", "i2t R@1", "t2i R@1",
            "ToMe 0.58 Δ", "CrossGET 0.58 Δ", *(f"{v} twins" for v in VARIANTS)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    for run in sorted(RESULTS.iterdir()):
        if run.name.startswith(tuple(prefixes)):
            print(row(run))


if __name__ == "__main__":
    main(sys.argv[1:] or [""])
