"""Image-text retrieval: Recall@K both ways (Karpathy protocol), hard-negative twin accuracy, fidelity.

    img, txt = encode_split(model, split, processor)          # L2-normalised [I, D], [T, D]
    metrics = retrieval_metrics(img @ txt.T, split.txt2img, split.img2txts)
    metrics |= twin_accuracy(img @ txt.T, split)               # generated data only
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from crossget.tools.common import ModelClock, device_dtype
from crossget.tools.data.karpathy import RetrievalSplit, image_loader, text_loader, twin_pairs

KS = (1, 5, 10)
CHUNK = 1024  # rows/columns of the similarity matrix compared at once (bounds the bool temporaries)


def _own_mask(n_images: int, n_texts: int, txt2img: torch.Tensor, img2txts: Sequence[Sequence[int]], device) -> torch.Tensor:
    """``[I, T]`` bool, True where text t is a ground-truth caption of image i; checks the two maps agree."""
    rows = torch.tensor([i for i, ts in enumerate(img2txts) for _ in ts], dtype=torch.long)
    cols = torch.tensor([t for ts in img2txts for t in ts], dtype=torch.long)
    if len(cols) != n_texts or not torch.equal(cols.sort().values, torch.arange(n_texts)) or not torch.equal(
        txt2img.cpu()[cols], rows
    ):
        raise ValueError("img2txts must list every text exactly once, under the image txt2img gives it")
    own = torch.zeros(n_images, n_texts, dtype=torch.bool, device=device)
    own[rows.to(device), cols.to(device)] = True
    return own


def retrieval_ranks(
    sim: torch.Tensor, txt2img: torch.Tensor, img2txts: Sequence[Sequence[int]], ties: str = "pessimistic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks ``(i2t [I], t2i [T])`` of the ground truth under ``sim [I, T]`` (higher = more similar).

    i2t: the rank of the best-ranked of the image's own captions = how many other captions score above
    it. t2i: how many other images score above the caption's image. ``ties="pessimistic"`` also counts
    wrong items that tie (a constant ``sim`` ranks last); ``"optimistic"`` counts only strictly higher.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f'ties must be "pessimistic" or "optimistic", got {ties!r}')
    if sim.dim() != 2 or txt2img.shape != (sim.shape[1],) or len(img2txts) != sim.shape[0]:
        raise ValueError(
            f"sim must be [n_images, n_texts]; got sim {tuple(sim.shape)}, txt2img {tuple(txt2img.shape)}, "
            f"img2txts of {len(img2txts)} images"
        )
    if not torch.isfinite(sim).all():
        raise ValueError("sim has NaN or infinite entries")
    n_img, n_txt = sim.shape
    sim = sim.float()
    txt2img = txt2img.to(sim.device).long()
    own = _own_mask(n_img, n_txt, txt2img, img2txts, sim.device)
    above = torch.ge if ties == "pessimistic" else torch.gt
    i2t = torch.empty(n_img, dtype=torch.long, device=sim.device)
    for s in range(0, n_img, CHUNK):
        block, mine = sim[s : s + CHUNK], own[s : s + CHUNK]
        best = block.masked_fill(~mine, -torch.inf).amax(1, keepdim=True)  # [b, 1]
        i2t[s : s + CHUNK] = (above(block, best) & ~mine).sum(1)
    t2i = torch.empty(n_txt, dtype=torch.long, device=sim.device)
    cols = torch.arange(n_txt, device=sim.device)
    for s in range(0, n_txt, CHUNK):
        block = sim[:, s : s + CHUNK]  # [I, b]
        mine = sim[txt2img[s : s + CHUNK], cols[s : s + CHUNK]]  # [b]
        t2i[s : s + CHUNK] = above(block, mine).sum(0) - (1 if ties == "pessimistic" else 0)
    return i2t.cpu(), t2i.cpu()


def retrieval_metrics(
    sim: torch.Tensor, txt2img: torch.Tensor, img2txts: Sequence[Sequence[int]], ties: str = "pessimistic"
) -> dict[str, float]:
    """Recall@1/5/10 in percent both ways from ``sim [n_images, n_texts]`` (see :func:`retrieval_ranks`).

    Returns ``i2t_r{1,5,10}``, ``t2i_r{1,5,10}``, ``mean_r1`` (mean of the two R@1) and ``r_mean``
    (mean of all six, as ALBEF/BLIP report).
    """
    i2t, t2i = retrieval_ranks(sim, txt2img, img2txts, ties)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["mean_r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS) / 6
    return out


def _wins(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a > b, 0.5 on ties, 0 otherwise."""
    return (a > b).double() + 0.5 * (a == b).double()


def twin_accuracy(sim: torch.Tensor, split: RetrievalSplit) -> dict[str, float]:
    """Hard-negative accuracy in percent (chance 50) on the twin pairs of generated data.

    For each (base, twin) pair, differing only in ``variant``: ``twin_t2i`` is the share of the two
    images' captions that score higher with their own image than with the other one; ``twin_i2t`` the
    share of (image, caption k) where the image prefers its own k-th caption to the other's k-th.
    Ties count half. Per variant (``twin_t2i_swap``, ...) and overall; ``twin_mean`` averages both.
    Empty when the split has no twins.
    """
    base, twin, variants = twin_pairs(split)
    if not variants:
        return {}
    sim = sim.float().cpu()
    t2i, i2t, labels = [], [], []
    for a, b, v in zip(base.tolist(), twin.tolist(), variants):
        ta, tb = split.img2txts[a], split.img2txts[b]
        t2i.append(torch.cat([_wins(sim[a, ta], sim[b, ta]), _wins(sim[b, tb], sim[a, tb])]).mean())
        k = min(len(ta), len(tb))
        i2t.append(torch.cat([_wins(sim[a, ta[:k]], sim[a, tb[:k]]), _wins(sim[b, tb[:k]], sim[b, ta[:k]])]).mean())
        labels.append(v)
    t2i_t, i2t_t = torch.stack(t2i), torch.stack(i2t)
    out = {"twin_t2i": 100 * t2i_t.mean().item(), "twin_i2t": 100 * i2t_t.mean().item()}
    out["twin_mean"] = (out["twin_t2i"] + out["twin_i2t"]) / 2
    for v in sorted(set(labels)):
        sel = torch.tensor([label == v for label in labels])
        out[f"twin_t2i_{v}"] = 100 * t2i_t[sel].mean().item()
        out[f"twin_i2t_{v}"] = 100 * i2t_t[sel].mean().item()
    return out


def fidelity(emb_reduced: torch.Tensor, emb_reference: torch.Tensor) -> float:
    """Mean cosine similarity between corresponding rows of ``[N, D]`` embeddings (1.0 = unchanged)."""
    if emb_reduced.shape != emb_reference.shape:
        raise ValueError(f"shapes differ: {tuple(emb_reduced.shape)} vs {tuple(emb_reference.shape)}")
    return torch.cosine_similarity(emb_reduced.double(), emb_reference.double(), dim=-1).mean().item()


def _normalise(chunks: list[torch.Tensor]) -> torch.Tensor:
    return nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu()


@torch.inference_mode()
def encode_split(
    model: nn.Module,
    split: RetrievalSplit,
    processor: Any,
    batch_size: int = 64,
    progress: bool = True,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings ``(images [I, D], texts [T, D])`` (float32, CPU) of a HF ``CLIPModel``.

    Images and captions go through ``processor`` (``CLIPProcessor`` or ``(image_processor, tokenizer)``)
    and ``model.get_image_features`` / ``get_text_features`` (projected ``.pooler_output``), in split
    order. ``max_length`` pads/truncates captions (default: pad to the longest in a batch, truncate at
    the tokenizer's ``model_max_length``).
    """
    device, dtype = device_dtype(model)
    images, texts = [], []
    loader = image_loader(split, processor, batch_size)
    for batch in tqdm(loader, desc="images", disable=not progress, leave=False):
        images.append(_features(model.get_image_features(pixel_values=batch["pixel_values"].to(device, dtype))))
    loader = text_loader(split, processor, batch_size, max_length)
    for batch in tqdm(loader, desc="texts", disable=not progress, leave=False):
        texts.append(_features(model.get_text_features(**{k: v.to(device) for k, v in batch.items()})))
    return _normalise(images), _normalise(texts)


def _features(out: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4.x, ``.pooler_output`` in 5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def encode(
    model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 64, progress: bool = True
) -> dict[str, torch.Tensor | float]:
    """Embeddings of already processed tensors (see :func:`~crossget.tools.data.karpathy.preprocess`).

    Returns ``image [I, D]`` and ``text [T, D]`` (L2-normalised, float32, CPU) and ``image_seconds``,
    the wall time of the image side alone (model time, no image decoding), for images/s.
    """
    device, dtype = device_dtype(model)
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    img, txt = [], []
    with ModelClock(device) as clock:
        for s in tqdm(range(0, len(pixels), batch_size), desc="images", disable=not progress, leave=False):
            img.append(_features(model.get_image_features(pixel_values=pixels[s : s + batch_size].to(device, dtype))))
    image_seconds = clock.seconds
    for s in tqdm(range(0, len(ids), batch_size), desc="texts", disable=not progress, leave=False):
        batch = {"input_ids": ids[s : s + batch_size].to(device), "attention_mask": mask[s : s + batch_size].to(device)}
        txt.append(_features(model.get_text_features(**batch)))
    return {"image": _normalise(img), "text": _normalise(txt), "image_seconds": image_seconds}


@torch.inference_mode()
def evaluate(
    model: nn.Module, split: RetrievalSplit, processor: Any, batch_size: int = 64, progress: bool = True
) -> dict[str, float]:
    """:func:`retrieval_metrics` plus :func:`twin_accuracy` (generated data) of a CLIP-style model on a split."""
    img, txt = encode_split(model, split, processor, batch_size, progress)
    sim = img @ txt.T
    return {**retrieval_metrics(sim, split.txt2img, split.img2txts), **twin_accuracy(sim, split)}
