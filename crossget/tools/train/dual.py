"""A real-weights dual encoder, LiT-style: a pretrained vision tower and a pretrained text
tower, both frozen, joined by ``VisionTextDualEncoderModel``'s two linear projections, which
alone are trained with the contrastive (CLIP) loss on a Karpathy-format split.

Frozen towers make the training exact on cached features: every image and caption is encoded
once (``get_image_features``'s input, the vision ``pooler_output``, and the text one), and the
projections and the temperature are trained on those, which is what makes it feasible on a
CPU. The saved folder is an ordinary ``VisionTextDualEncoderModel`` with its processor parts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

from crossget.tools.common import write_json
from crossget.tools.data.karpathy import RetrievalSplit, image_loader, load_karpathy, text_loader
from crossget.tools.eval.retrieval import retrieval_metrics


def build_dual_encoder(vision: str | os.PathLike, text: str | os.PathLike, projection_dim: int = 256,
                       seed: int = 0) -> tuple[VisionTextDualEncoderModel, tuple[Any, Any]]:
    """``VisionTextDualEncoderModel`` from two local model folders (projections random, seeded)
    and its ``(image_processor, tokenizer)``."""
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel.from_vision_text_pretrained(
        str(vision), str(text), projection_dim=projection_dim
    ).eval()
    return model, (AutoImageProcessor.from_pretrained(vision), AutoTokenizer.from_pretrained(text))


@torch.no_grad()
def tower_features(model: VisionTextDualEncoderModel, processor: tuple[Any, Any], split: RetrievalSplit,
                   batch_size: int = 32, max_length: int = 64, progress: bool = True) -> dict[str, torch.Tensor]:
    """The frozen towers' pooled outputs of every image ``[I, Cv]`` and caption ``[T, Ct]``
    (what the projections read)."""
    images = [model.vision_model(pixel_values=b["pixel_values"]).pooler_output
              for b in tqdm(image_loader(split, processor, batch_size), desc="images", disable=not progress,
                            mininterval=10)]
    texts = [model.text_model(**b).pooler_output
             for b in tqdm(text_loader(split, processor, 4 * batch_size, max_length), desc="captions",
                           disable=not progress, mininterval=10)]
    return {"image": torch.cat(images), "text": torch.cat(texts)}


def _similarity(model: VisionTextDualEncoderModel, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    u = nn.functional.normalize(model.visual_projection(image), dim=-1)
    v = nn.functional.normalize(model.text_projection(text), dim=-1)
    return u @ v.T  # [I, T]


def train_projections(
    model: VisionTextDualEncoderModel, train: dict[str, torch.Tensor], txt2img: torch.Tensor, *, steps: int = 2000,
    batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0, progress: bool = True,
) -> list[float]:
    """Train ``visual_projection``, ``text_projection`` and ``logit_scale`` on cached features
    ``train`` (``image [I, Cv]``, ``text [T, Ct]``; caption ``t`` shows image ``txt2img[t]``)
    with the symmetric contrastive loss over batches of captions (one per image); returns the losses."""
    params = [*model.visual_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="projections", disable=not progress, mininterval=10):
        captions = torch.randperm(len(txt2img), generator=g)
        # one caption per image in a batch: two captions of one image are not negatives
        keep = torch.zeros(len(captions), dtype=torch.bool)
        seen = set()
        for i, img in enumerate(txt2img[captions].tolist()):
            if img not in seen and len(seen) < batch_size:
                seen.add(img)
                keep[i] = True
        t = captions[keep]
        i = txt2img[t]
        logits = _similarity(model, train["image"][i], train["text"][t]) * model.logit_scale.exp().clamp(max=100)
        target = torch.arange(len(t))
        loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_dual_encoder(
    vision: str | os.PathLike, text: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike, *,
    projection_dim: int = 256, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """``crossget train-dual``: build the dual encoder, cache the frozen towers' features on the
    train and test splits of ``data``, train the projections, evaluate retrieval (Recall@1/5/10
    both ways) on the held-out test split, and save the model, its processor parts and
    ``training.json`` (settings, losses, time, test recall) to ``out_dir``; returns that record."""
    t0 = time.perf_counter()
    model, processor = build_dual_encoder(vision, text, projection_dim, seed)
    train_split = load_karpathy(data, split="train", captions_per_image=None)
    test_split = load_karpathy(data, split="test", captions_per_image=None)
    feats = {name: tower_features(model, processor, s, progress=progress)
             for name, s in (("train", train_split), ("test", test_split))}
    encoded = time.perf_counter() - t0
    with torch.no_grad():
        before = retrieval_metrics(_similarity(model, feats["test"]["image"], feats["test"]["text"]),
                                   test_split.txt2img, test_split.img2txts)
    losses = train_projections(model, feats["train"], train_split.txt2img, steps=steps, batch_size=batch_size, lr=lr,
                               seed=seed, progress=progress)
    with torch.no_grad():
        after = retrieval_metrics(_similarity(model, feats["test"]["image"], feats["test"]["text"]),
                                  test_split.txt2img, test_split.img2txts)
    out = Path(out_dir)
    model.save_pretrained(out)
    for part in processor:
        part.save_pretrained(out)
    record = {
        "vision": str(vision), "text": str(text), "data": str(data), "projection_dim": projection_dim,
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "frozen_towers": True,
        "train_images": len(train_split), "train_captions": len(train_split.captions),
        "test_images": len(test_split), "test_captions": len(test_split.captions),
        "encode_seconds": encoded, "train_seconds": time.perf_counter() - t0 - encoded,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "test_untrained_projections": before, "test": after, "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "training.json", record)
    return record


__all__ = ["build_dual_encoder", "tower_features", "train_dual_encoder", "train_projections"]
