"""Interleaved timing of BLIP VQA answering, unreduced vs CrossGET r=24, in one process (3 rounds, 1 thread):

    python benchmarks/blip-eval/paired_vqa.py [INPUTS_DIR]   (inputs from make_inputs.py, default /tmp/blip-eval)

The harness runs configs one after another; on a loaded machine only timings taken side by side
in one process, in alternating order, compare.
"""

import statistics
import sys
import time

import torch
from transformers import BlipForQuestionAnswering

from crossget.tools.eval.blip_common import apply_method, load_blip, open_rgb
from crossget.tools.eval.vqa import generate_answers, load_vqa, vqa_inputs

root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/blip-eval"
torch.set_num_threads(1)
model, proc = load_blip(f"{root}/vqa", BlipForQuestionAnswering)
data = load_vqa(f"{root}/data/questions.json", image_root=f"{root}/data", limit=2)
inputs = vqa_inputs(model, proc, [open_rgb(p) for p in data.image_paths], data.questions)
times: dict[str, list[float]] = {"none": [], "crossget": []}
for rnd in range(3):
    for m in ["none", "crossget"] if rnd % 2 == 0 else ["crossget", "none"]:
        apply_method(model, m, r=24)
        t = time.perf_counter()
        generate_answers(model, proc.tokenizer, inputs)
        times[m].append(time.perf_counter() - t)
print({m: [round(x, 2) for x in v] for m, v in times.items()})
print("median speedup", statistics.median(times["none"]) / statistics.median(times["crossget"]))
