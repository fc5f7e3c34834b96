"""What the tiny shapes LLaVA can tell apart: the majority-answer baseline, what the stock model
answers per question type, accuracy per type, and each run's paired difference from the stock
model (same questions) with its standard error.

    .venv/bin/python benchmarks/compare-shapes-llava/noise.py runs/compare-shapes-llava > benchmarks/compare-shapes-llava/noise.md
"""

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from crossget.tools.eval.llava.metrics import vqa_accuracy


def main(out: Path) -> None:
    train = json.loads(Path("data/shapes-qa/train/annotations.json").read_text())["annotations"]
    test = {a["question_id"]: a for a in json.loads(Path("data/shapes-qa/test/annotations.json").read_text())["annotations"]}
    commonest = defaultdict(Counter)
    for a in train:
        commonest[a["question_type"]][a["multiple_choice_answer"]] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in commonest.items()}

    def scores(path: Path) -> dict:
        """Per question: (question type, VQA accuracy of the answer)."""
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["question_id"]: (test[r["question_id"]]["question_type"],
                                   vqa_accuracy(r["text"], [x["answer"] for x in test[r["question_id"]]["answers"]]))
                for r in rows}

    runs = out / "runs" / "shapes"
    stock = scores(runs / "none.answers.jsonl")
    n = len(stock)
    prior = [vqa_accuracy(guess[test[q]["question_type"]], [x["answer"] for x in test[q]["answers"]]) for q in stock]
    types = sorted(guess)
    said = defaultdict(Counter)  # what the stock model answers per question type
    for r in (json.loads(line) for line in (runs / "none.answers.jsonl").read_text().splitlines()):
        said[test[r["question_id"]]["question_type"]][r["text"]] += 1
    print("Stock model's commonest answer per question type (share of that type's questions): " + ", ".join(
        f"{t} '{said[t].most_common(1)[0][0]}' ({100 * said[t].most_common(1)[0][1] / sum(said[t].values()):.0f}%)"
        for t in types) + ".\n")
    print(f"{n} questions. Majority answer per question type (train set's commonest: "
          + ", ".join(f"{t} '{guess[t]}'" for t in types) + f"): {100 * sum(prior) / n:.1f}%.\n")
    print("| run | accuracy | " + " | ".join(types) + " | minus stock | paired SE |")
    print("|---|---:|" + "---:|" * (len(types) + 2))
    for path in [runs / "none.answers.jsonl"] + sorted(p for p in runs.glob("*.answers.jsonl") if p.name != "none.answers.jsonl"):
        run = scores(path)
        by_type = defaultdict(list)
        for t, s in run.values():
            by_type[t].append(s)
        d = [run[q][1] - stock[q][1] for q in stock]
        mean = sum(d) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
        name = path.name.removesuffix(".answers.jsonl")
        print(f"| {name} | {100 * sum(s for _, s in run.values()) / n:.1f} | "
              + " | ".join(f"{100 * sum(by_type[t]) / len(by_type[t]):.1f}" for t in types)
              + f" | {100 * mean:+.1f} | {100 * se:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compare-shapes-llava"))
