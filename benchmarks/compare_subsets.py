"""Every variant minus ToMe on two disjoint subsets of one set (how much a difference moves
between them is its run-to-run spread), and every calibrated schedule minus the constant one
of the same variant, as markdown tables.

    python benchmarks/compare_subsets.py real > benchmarks/real-features/subsets.md
    python benchmarks/compare_subsets.py shapes > benchmarks/shapes-guidance/subsets.md
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SETS = {
    "real": ({"A (test images 0-299)": HERE / "real-features" / "dual-dinov2.json",
              "B (test images 300-599)": HERE / "real-features" / "second-subset.json"},
             {"nn10_retention": ("10-NN retention", 100, "x100"), "pooled_fidelity": ("pooled fidelity", 1000, "x1000"),
              "knn_acc": ("10-NN accuracy", 1, "points"), "mean_r1": ("dual-encoder mean R@1", 1, "points")}),
    "shapes": ({"A (test images 0-499)": HERE / "shapes-guidance" / "sweep.json",
                "B (test images 500-967)": HERE / "shapes-guidance" / "second-subset" / "sweep.json"},
               {"mean_r1": ("mean R@1", 1, "points"), "fidelity": ("fidelity", 1000, "x1000")}),
}


def rows(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(path.read_text())["results"]}


def level_of(name: str) -> str | None:
    return name.rsplit("flops=", 1)[1] if "flops=" in name else None


def table(title: str, columns: list[str], body: list[tuple[str, list[str]]]) -> str:
    head = f"| {title} | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(cells) + " |\n" for name, cells in body)


def main(which: str) -> None:
    paths, metrics = SETS[which]
    runs = {k: rows(p) for k, p in paths.items()}
    first = next(iter(runs.values()))
    levels = list(dict.fromkeys(lv for n in first if (lv := level_of(n))))
    names = [n.split(" flops=")[0] for n in first if level_of(n) == levels[0]]
    common = [v for v in names if v != "tome" and not v.endswith("+calibrated")
              and all(f"{v} flops={levels[0]}" in rs for rs in runs.values())]
    last = list(runs.values())[-1]
    calibrated = list(dict.fromkeys(n.split(" flops=")[0] for n in last if n.split(" flops=")[0].endswith("+calibrated")))
    out = [f"Subsets {' and '.join(runs)}; each cell A / B.\n"]
    for key, (label, scale, unit) in metrics.items():
        if not all(key in r for r in first.values()):
            continue
        def diff(rs, a, b, lv):
            if f"{a} flops={lv}" not in rs:
                return "–"  # not run on this subset
            return f"{(rs[f'{a} flops={lv}'][key] - rs[f'{b} flops={lv}'][key]) * scale:+.1f}"
        body = [(v, [" / ".join(diff(rs, v, "tome", lv) for rs in runs.values()) for lv in levels])
                for v in common + calibrated]
        out.append(table(f"{label} minus ToMe's constant schedule ({unit})", levels, body))
        body = [(v, [" / ".join(diff(rs, v, v.removesuffix("+calibrated"), lv) for rs in runs.values())
                     for lv in levels]) for v in calibrated]
        if body:
            out.append(table(f"{label}: calibrated minus constant schedule, same variant ({unit})", levels, body))
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
