"""Can a model's text tower learn *where* the caption puts things? The scene loss on captions alone.

Trains the text tower of MODEL_DIR with a fresh :class:`~crossget.tools.train.clip.SceneHead` on its pooled EOT
state (each grid cell's colour, shape, size, texture and count, the image's scene targets) for STEPS
steps of 64 training captions, no CLIP loss, one thread; prints the batch loss and the loss on 500
held-out captions every 100 steps. A loss near 0.855 is the plateau of naming the objects but not
their places (README, stage 6).

    python benchmarks/shapes-probe/text_scene_probe.py MODEL_DIR [--steps 600 --lr 1e-3]
"""

import argparse
import time

import torch
from transformers import CLIPModel, CLIPProcessor

from crossget.tools.data.karpathy import load_karpathy
from crossget.tools.data.shapes import scene_targets
from crossget.tools.train.clip import SceneHead, text_pooled_state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--data", default="data/shapes/dataset_shapes.json")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, processor = CLIPModel.from_pretrained(args.model), CLIPProcessor.from_pretrained(args.model)
    text_model = model.text_model
    split = load_karpathy(args.data, split="train")
    tok = processor.tokenizer(split.captions, padding="max_length", max_length=48, truncation=True,
                              return_tensors="pt")
    targets = torch.from_numpy(scene_targets(split.scenes))[split.txt2img]
    n = len(split.captions)
    train, test = torch.arange(n)[:-2000], torch.arange(n)[-2000:]  # the last 400 training images' captions
    head = SceneHead(text_model.config.hidden_size)
    opt = torch.optim.AdamW(list(text_model.parameters()) + list(head.parameters()), lr=args.lr, weight_decay=0.0)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        out = text_model(input_ids=tok.input_ids[idx], attention_mask=tok.attention_mask[idx])
        return head(text_pooled_state(text_model, out.last_hidden_state, tok.input_ids[idx]), targets[idx])

    start = time.time()
    for step in range(args.steps):
        loss = loss_of(train[torch.randint(len(train), (64,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                held_out = loss_of(test[:500]).item()
            print(f"step {step}: loss {loss.item():.3f}, held-out {held_out:.3f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
