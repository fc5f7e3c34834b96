"""Which part of the cross-guided importance costs accuracy on the shapes model? (diagnostic)

    .venv/bin/python benchmarks/shapes-sweep/ablation/importance_parts.py MODEL_DIR N_IMAGES LEVEL

Swaps crossget.state's matcher for two variants of training-free CrossGET: the importance only
in the matching scores (plain size-weighted ensemble), or only in the ensemble weights
(unguided matching); ToMe, the unguided complete graph and CrossGET as specified beside them.
"""

import sys

import torch

import crossget.methods.crossget as st  # the state calls the matcher through this module
from crossget.tools.default import load_retrieval
from crossget.tools.eval.harness import evaluate_configs

spec_matching = st.complete_graph_soft_matching
MODE = {"v": "spec"}


def variant(metric, r, importance=None, protected=None, groups=None):
    if importance is None or MODE["v"] == "spec":
        return spec_matching(metric, r, importance, protected, groups)
    if MODE["v"] == "match_only":  # importance in the scores, plain size-weighted ensemble
        merge = spec_matching(metric, r, importance, protected, groups)
        merge.weight = None
        return merge
    # ensemble_only: unguided matching, importance-weighted ensemble
    merge = spec_matching(metric, r, None, protected, groups)
    merge.weight = importance.exp().unsqueeze(-1)
    return merge


st.complete_graph_soft_matching = variant
model_dir, limit, level = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
job = load_retrieval(model_dir, "data/shapes/dataset_shapes.json", "test", int(limit))
model, split, inputs = job.model, job.split, job.inputs
for mode, cfg in [("spec", {"method": "tome", "flops": level}),
                  ("spec", {"method": "crossget", "flops": level, "importance": "none"}),
                  ("spec", {"method": "crossget", "flops": level}),
                  ("match_only", {"method": "crossget", "flops": level}),
                  ("ensemble_only", {"method": "crossget", "flops": level})]:
    MODE["v"] = mode
    base, row = evaluate_configs(model, inputs, split, [cfg], progress=False)
    name = f"{cfg['method']} {cfg.get('importance', '')} {mode}"
    print(f"{name:40s} R@1 {row['mean_r1']:.1f} (unreduced {base['mean_r1']:.1f}) "
          f"fid {row['fidelity_image']:.4f} ratio {row['gflops_ratio']:.3f}", flush=True)
