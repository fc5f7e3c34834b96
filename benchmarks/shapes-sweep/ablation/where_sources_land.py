"""Layer-0 importance cos(q_cls, k_i) on object vs background patches, and where the first layer's
sources land: training-free CrossGET vs the unguided complete graph, 64 shapes test images, flops=0.58.

    .venv/bin/python benchmarks/shapes-sweep/ablation/where_sources_land.py [MODEL_DIR]

Object patches: any pixel with max - min channel > 60 (the background is grey noise).
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

import crossget
import crossget.methods.crossget as st  # the state calls the matcher through this module

MODEL = sys.argv[1] if len(sys.argv) > 1 else "crossget/assets/default"
torch.set_num_threads(1)
d = json.load(open("data/shapes/dataset_shapes.json"))
ims = [i for i in d["images"] if i["split"] == "test"][:64]
pil = [Image.open(f"data/shapes/{i['filepath']}/{i['filename']}").convert("RGB") for i in ims]
arr = np.stack([np.asarray(p, dtype=np.int16) for p in pil])  # [B, 96, 96, 3]
saturated = (arr.max(-1) - arr.min(-1)) > 60
obj = torch.from_numpy(saturated.reshape(len(ims), 12, 8, 12, 8).any(axis=(2, 4)).reshape(len(ims), 144))
obj_tokens = torch.cat([torch.zeros(len(ims), 1, dtype=torch.bool), obj], 1)  # CLS first
model = CLIPModel.from_pretrained(MODEL).eval()
px = CLIPProcessor.from_pretrained(MODEL)(images=pil, return_tensors="pt")["pixel_values"]
calls = []
spec_matching = st.complete_graph_soft_matching


def spy(metric, r, importance=None, protected=None, groups=None):
    merge = spec_matching(metric, r, importance, protected, groups)
    calls.append((importance, merge.src))
    return merge


st.complete_graph_soft_matching = spy
print("object patch share", obj.float().mean().item())
for importance in ("cross", "none"):
    crossget.patch(model, flops=0.58, method="crossget", importance=importance)
    calls.clear()
    with torch.no_grad():
        model.get_image_features(pixel_values=px)
    imp, src = calls[0]  # layer 0
    if imp is not None:
        patches = imp[:, 1:]
        print(f"layer-0 importance: objects {patches[obj].mean():.3f} +- {patches[obj].std():.3f}, "
              f"background {patches[~obj].mean():.3f} +- {patches[~obj].std():.3f}")
    share = torch.gather(obj_tokens, 1, src).float().mean()
    print(f"importance={importance}: layer-0 sources r={src.shape[1]}, share on object patches {share:.3f}")
    crossget.unpatch(model)
