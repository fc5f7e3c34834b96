"""Does a model's image embedding know *where* things are? Linear probes for each grid cell's occupancy.

For each of the 9 cells of the generated scenes, a logistic-regression probe is fitted on frozen
features of N training images and scored on M test images: the vision tower's pooled CLS state and
the projected image embedding. Compared with always answering the cell's majority class.

    python benchmarks/shapes-probe/occupancy_probe.py MODEL_DIR [MODEL_DIR ...] [--train 1500 --test 500]
"""

import argparse
import json

import torch

from crossget.tools.data.karpathy import image_loader, load_karpathy
from crossget.tools.data.shapes import scene_targets
from crossget.tools.default import load_default


@torch.no_grad()
def features(model, processor, data: str, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pooled ``[n, W]``, projected embeddings ``[n, D]``, occupancy ``[n, 9]`` (0/1)."""
    s = load_karpathy(data, split=split, limit=n)
    pooled = torch.cat([model.vision_model(**b).pooler_output for b in image_loader(s, processor, batch_size=250)])
    occupied = torch.from_numpy(scene_targets(s.scenes))[..., 0] > 0
    return pooled, model.visual_projection(pooled), occupied.long()


def probe_accuracy(xa: torch.Tensor, ya: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, steps: int = 400) -> float:
    """Test accuracy of a linear classifier (AdamW, standardised features)."""
    mu, sd = xa.mean(0), xa.std(0) + 1e-6
    xa, xb = (xa - mu) / sd, (xb - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xa.shape[1], 2)
    opt = torch.optim.AdamW(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(xa), ya)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (lin(xb).argmax(-1) == yb).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--data", default="data/shapes/dataset_shapes.json")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for path in a.models:
        model, processor = load_default(path)
        pa, ea, ya = features(model, processor, a.data, "train", a.train)
        pb, eb, yb = features(model, processor, a.data, "test", a.test)
        majority = torch.maximum(yb.float().mean(0), 1 - yb.float().mean(0)).mean().item()
        row = {"model": path, "majority": round(majority, 3)}
        for name, xa, xb in (("pooled", pa, pb), ("image_embeds", ea, eb)):
            row[name] = round(sum(probe_accuracy(xa, ya[:, c], xb, yb[:, c]) for c in range(9)) / 9, 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
