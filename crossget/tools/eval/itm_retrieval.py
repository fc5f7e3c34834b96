"""BLIP image-text retrieval as BLIP evaluates it: ITC ranking, then ITM re-ranking of the top k.

    from transformers import BlipForImageTextRetrieval
    model, processor = load_blip("models/blip-itm-base-coco", BlipForImageTextRetrieval)
    split = load_karpathy("coco/dataset_coco.json", image_root="coco", split="test")
    result = evaluate_itm_retrieval(model, processor, split, k=128)   # i2t_r1 ... t2i_r10, gflops, images_per_s

The protocol of BLIP's ``train_retrieval.py`` evaluation, on a Karpathy-format split
(:func:`crossget.tools.data.karpathy.load_karpathy`: Flickr30K, COCO):

1. ITC: image features ``normalize(vision_proj(CLS))`` of the vision encoder, text features
   ``normalize(text_proj(CLS))`` of the unimodal text encoder; ``sim = img @ txt.T`` ``[I, T]``
   (what ``BlipForImageTextRetrieval(use_itm_head=False)`` computes).
2. Image to text: for every image the ``k`` texts with the highest ``sim`` are scored by the ITM
   head (the text encoder cross-attending to the image tokens; what ``use_itm_head=True``
   computes) and get ``ITM match logit + sim``; all other texts get -100.
3. Text to image: the same with the ``k`` best images of every text.
4. Recall@1/5/10 both ways from the two score matrices (:func:`~crossget.tools.eval.retrieval.retrieval_metrics`,
   ties count against). The ITC-only recalls are reported too (``itc_*``).

Every image is encoded once; its (possibly merged) tokens are reused by all its ITM pairs. The
ITM text starts with ``[ENC]`` instead of ``[CLS]`` when the tokenizer knows ``[ENC]``, as in
BLIP's retrieval training and evaluation (``first_token="cls"`` keeps ``[CLS]``, as the
Hugging Face model card does). BLIP uses ``k=256`` on COCO and ``k=128`` on Flickr30K.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BlipForImageTextRetrieval

from crossget.api import is_patched
from crossget.families.blip import encoder_bias
from crossget.tools.common import ModelClock, device_dtype
from crossget.tools.data.karpathy import RetrievalSplit, image_loader, load_karpathy, processor_parts
from crossget.tools.eval.blip_common import check_model, gflops_of
from crossget.tools.eval.retrieval import KS, retrieval_metrics
from crossget.tools.eval.runner import run_task

FILL = -100.0  # score of pairs outside the top k (BLIP's value)
FIRST_TOKENS = ("enc", "cls")
MAX_LENGTH = 35  # caption tokens kept (BLIP's truncation)


# --------------------------------------------------------------------------- re-ranking (pure)
def rerank_scores(
    sim: torch.Tensor,
    k: int,
    score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pair_batch: int = 128,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM re-ranking of the ITC top ``k`` both ways.

    Args:
        sim: ``[I, T]`` ITC similarities.
        k: candidates re-scored per query (clamped to the number of candidates).
        score_pairs: ``(image index [P], text index [P]) -> ITM logits [P]``.
        pair_batch: pairs handed to ``score_pairs`` at once.

    Returns:
        ``(i2t [I, T], t2i [T, I])``: ``score_pairs + sim`` on each query's top ``k``, -100 elsewhere.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [n_images, n_texts], got shape {tuple(sim.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    sim = sim.float().cpu()
    out = []
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        kk = min(k, s.shape[1])
        top_sim, top_idx = s.topk(kk, dim=1)  # [Q, kk]
        queries = torch.arange(s.shape[0]).repeat_interleave(kk)
        cands = top_idx.reshape(-1)
        logits = torch.empty(len(cands))
        for p in tqdm(range(0, len(cands), pair_batch), desc=f"ITM {name}", disable=not progress, leave=False):
            q, c = queries[p : p + pair_batch], cands[p : p + pair_batch]
            img, txt = (q, c) if name == "i2t" else (c, q)
            logits[p : p + pair_batch] = score_pairs(img, txt).float().cpu()
        scores = torch.full_like(s, FILL)
        scores.scatter_(1, top_idx, logits.view(-1, kk) + top_sim)
        out.append(scores)
    return out[0], out[1]


def itm_recalls(
    i2t: torch.Tensor, t2i: torch.Tensor, txt2img: torch.Tensor, img2txts: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Recall@1/5/10 in percent: image to text ranked by ``i2t [I, T]``, text to image by ``t2i [T, I]``.

    Returns ``i2t_r*``, ``t2i_r*``, ``mean_r1`` and ``r_mean`` (the mean of all six, as BLIP reports).
    """
    rows = retrieval_metrics(i2t, txt2img, img2txts)
    cols = retrieval_metrics(t2i.T, txt2img, img2txts)
    out = {f"i2t_r{k}": rows[f"i2t_r{k}"] for k in KS} | {f"t2i_r{k}": cols[f"t2i_r{k}"] for k in KS}
    six = list(out.values())
    out["mean_r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["r_mean"] = sum(six) / len(six)
    return out


# --------------------------------------------------------------------------- model calls
def image_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ITC features [B, D] normalised, image tokens [B, N, C])`` of ``pixel_values [B, 3, H, W]``;
    ``N`` is the merged token count when the vision tower is patched."""
    embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return nn.functional.normalize(model.vision_proj(embeds[:, 0]), dim=-1), embeds


def image_mask(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """The cross-attention mask that goes with image tokens ``embeds [B, N, C]``, read right after
    the vision forward that made them: ones ``[B, N]``, or, on a patched model whose vision
    tower merged, the float ``[B, 1, 1, N]`` ``log(size)`` bias (proportional attention). The
    patch adds that bias itself only while the vision output is fed on as it is; cached and
    re-indexed tokens need it carried along."""
    if is_patched(model):
        bias = encoder_bias(model.vision_model, embeds, None, embeds.dtype)
        if bias is not None:
            return bias
    return torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised ITC features ``[B, D]`` of the unimodal text encoder (``[CLS]`` output)."""
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return nn.functional.normalize(model.text_proj(hidden[:, 0]), dim=-1)


def itm_logits(
    model: nn.Module,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_atts: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITM "match" logits ``[P]`` of ``P`` pairs: texts ``[P, L]`` cross-attending to image tokens ``[P, N, C]``
    (``BlipForImageTextRetrieval.forward(use_itm_head=True)`` without re-running the vision tower).
    ``image_atts``: the cross-attention mask from :func:`image_mask` (default ones)."""
    if image_atts is None:
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask,
        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
    ).last_hidden_state
    return model.itm_head(hidden[:, 0])[:, 1]


def itm_input_ids(input_ids: torch.Tensor, tokenizer: Any, first_token: str) -> tuple[torch.Tensor, str]:
    """Input ids for the ITM pass and the first token used: ``[ENC]`` (``first_token="enc"``, when the
    tokenizer has it) or the tokenizer's own ``[CLS]``."""
    if first_token not in FIRST_TOKENS:
        raise ValueError(f"first_token must be one of {FIRST_TOKENS}, got {first_token!r}")
    if first_token == "enc":
        enc = tokenizer.convert_tokens_to_ids("[ENC]")
        if enc is not None and enc != tokenizer.unk_token_id:
            ids = input_ids.clone()
            ids[:, 0] = enc
            return ids, "[ENC]"
    return input_ids, tokenizer.convert_ids_to_tokens(int(input_ids[0, 0])) if len(input_ids) else "[CLS]"


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """All captions at once, padded to the longest, truncated at ``max_length`` (BLIP: 35)."""
    out = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def unit_gflops(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                itm_ids: torch.Tensor | None = None) -> dict[str, float]:
    """GFLOPs of one image (vision + projection), one caption (ITC text) and one ITM pair, on the first
    row of each input, and their sum ``gflops`` (scoring one image-caption pair the BLIP way)."""
    px, ids, mask = pixel_values[:1], input_ids[:1], attention_mask[:1]
    itm_ids = ids if itm_ids is None else itm_ids[:1]
    image = gflops_of(image_features, model, px)
    text = gflops_of(text_features, model, ids, mask)
    with torch.inference_mode():
        _, embeds = image_features(model, px)
        atts = image_mask(model, embeds)
    pair = gflops_of(itm_logits, model, embeds, itm_ids, mask, atts)
    return {"gflops_image": image, "gflops_text": text, "gflops_itm_pair": pair, "gflops": image + text + pair}


@torch.inference_mode()
def retrieval_scores(
    model: nn.Module,
    processor: Any,
    split: RetrievalSplit,
    k: int = 128,
    batch_size: int = 32,
    pair_batch: int = 128,
    max_length: int = MAX_LENGTH,
    first_token: str = "enc",
    progress: bool = True,
) -> dict[str, Any]:
    """The score matrices of the protocol (see the module doc) and what it took to make them.

    Returns ``sim [I, T]`` (ITC), ``i2t [I, T]`` and ``t2i [T, I]`` (ITM + ITC on each query's top
    ``k``, -100 elsewhere), ``seconds`` of model time per stage (images, texts, itm), the
    ``texts`` as tokenised, ``itm_first_token``, ``image_tokens`` (after merging) and
    ``first_pixels`` (the first image, for GFLOPs).
    """
    check_model(model, BlipForImageTextRetrieval)
    _, tokenizer = processor_parts(processor)
    device, dtype = device_dtype(model)
    texts = tokenize_captions(tokenizer, split.captions, max_length)
    ids_itm, first = itm_input_ids(texts["input_ids"], tokenizer, first_token)
    clocks = {stage: ModelClock(device) for stage in ("images", "texts", "itm")}

    img_feats, img_embeds, img_masks, first_pixels = [], [], [], None
    for batch in tqdm(image_loader(split, processor, batch_size), desc="images", disable=not progress, leave=False):
        px = batch["pixel_values"].to(device, dtype)
        first_pixels = px[:1] if first_pixels is None else first_pixels
        with clocks["images"]:
            feats, embeds = image_features(model, px)
        img_feats.append(feats.float().cpu())
        img_embeds.append(embeds)
        img_masks.append(image_mask(model, embeds))
    embeds_all, masks_all = torch.cat(img_embeds), torch.cat(img_masks)  # [I, N, C], [I, N] | [I, 1, 1, N]
    txt_feats = []
    for s in tqdm(range(0, split.n_texts, batch_size), desc="texts", disable=not progress, leave=False):
        with clocks["texts"]:
            feats = text_features(model, texts["input_ids"][s : s + batch_size].to(device),
                                  texts["attention_mask"][s : s + batch_size].to(device))
        txt_feats.append(feats.float().cpu())
    sim = torch.cat(img_feats) @ torch.cat(txt_feats).T

    def score_pairs(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img = img.to(device)
        with clocks["itm"]:
            return itm_logits(model, embeds_all[img], ids_itm[txt].to(device), texts["attention_mask"][txt].to(device),
                              masks_all[img])

    i2t, t2i = rerank_scores(sim, k, score_pairs, pair_batch, progress)
    return {
        "sim": sim, "i2t": i2t, "t2i": t2i, "seconds": {stage: c.seconds for stage, c in clocks.items()},
        "texts": texts, "itm_ids": ids_itm, "itm_first_token": first, "image_tokens": int(embeds_all.shape[1]),
        "first_pixels": first_pixels,
    }


def evaluate_itm_retrieval(model: nn.Module, processor: Any, split: RetrievalSplit, k: int = 128, *,
                           max_length: int = MAX_LENGTH, **options: Any) -> dict[str, Any]:
    """Recall@1/5/10 both ways (ITC + ITM re-ranking of the top ``k``), GFLOPs and throughput.

    ``model`` is a ``BlipForImageTextRetrieval`` (patched or not), ``processor`` its ``BlipProcessor``.
    Returns the recalls (``i2t_r1`` ... ``r_mean``), ITC-only recalls (``itc_i2t_r1`` ...), GFLOPs
    per image / caption / ITM pair and their sum ``gflops`` (see :func:`unit_gflops`), ``gflops_total``
    (the whole evaluation: every image and caption once, ``k`` ITM pairs per query both ways),
    ``images_per_s`` (images over all model time: encoding both sides and both ITM passes) and
    ``seconds`` per stage. ``options`` go to :func:`retrieval_scores` (``batch_size``, ``pair_batch``,
    ``first_token``, ``progress``).
    """
    sc = retrieval_scores(model, processor, split, k, max_length=max_length, **options)
    n_img, n_txt = split.n_images, split.n_texts
    result: dict[str, Any] = itm_recalls(sc["i2t"], sc["t2i"], split.txt2img, split.img2txts)
    itc = retrieval_metrics(sc["sim"], split.txt2img, split.img2txts)
    result |= {f"itc_{name}": v for name, v in itc.items()}
    device = sc["first_pixels"].device
    units = unit_gflops(model, sc["first_pixels"], sc["texts"]["input_ids"].to(device),
                        sc["texts"]["attention_mask"].to(device), sc["itm_ids"].to(device))
    result |= units
    result["gflops_total"] = (n_img * units["gflops_image"] + n_txt * units["gflops_text"]
                              + (n_img * min(k, n_txt) + n_txt * min(k, n_img)) * units["gflops_itm_pair"])
    seconds = sum(sc["seconds"].values())
    result |= {
        "images_per_s": n_img / seconds if seconds else 0.0,
        "seconds": sc["seconds"],
        "images": n_img, "texts": n_txt, "k": k, "itm_first_token": sc["itm_first_token"], "max_length": max_length,
        "image_tokens": sc["image_tokens"],
    }
    return result


@dataclass(frozen=True)
class ITMRetrievalTask:
    """Karpathy-split retrieval as a :class:`~crossget.tools.eval.runner.BlipTask`: the ``split``
    to read; ``options`` are :func:`evaluate_itm_retrieval`'s (``k``, ``batch_size``, ...)."""

    split: str = "test"

    name = "itm-retrieval"
    model_class = BlipForImageTextRetrieval
    result_keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "images_per_s")
    results_file = False  # no per-item results

    def load(self, path: str | os.PathLike, image_root: str | os.PathLike | None, limit: int | None) -> RetrievalSplit:
        return load_karpathy(path, image_root, split=self.split, limit=limit)

    def describe(self) -> dict[str, Any]:
        return {"split": self.split}

    def sample_gflops(self, model: nn.Module, processor: Any, data: RetrievalSplit, options: Mapping[str, Any]) -> float:
        dev, dtype = device_dtype(model)
        first = next(iter(image_loader(data, processor, 1)))["pixel_values"].to(dev, dtype)
        # the same padding as the evaluation: all captions, padded to the longest
        text = tokenize_captions(processor_parts(processor)[1], data.captions, options.get("max_length", MAX_LENGTH))
        return unit_gflops(model, first, text["input_ids"].to(dev), text["attention_mask"].to(dev))["gflops"]

    def evaluate(self, model: nn.Module, processor: Any, data: RetrievalSplit, progress: bool,
                 options: Mapping[str, Any]) -> dict[str, Any]:
        return evaluate_itm_retrieval(model, processor, data, progress=progress, **options)


def run_itm_retrieval(model_dir: str | os.PathLike, annotation: str | os.PathLike, *, split: str = "test",
                      **kwargs: Any) -> dict[str, Any]:
    """Load a local ``BlipForImageTextRetrieval`` and a Karpathy split, evaluate one config
    (:func:`~crossget.tools.eval.runner.run_task`: ``image_root``, ``limit``, ``method``, ...; the
    unreduced GFLOPs are measured first), and write the result JSON if ``json_path`` is given. The
    other ``kwargs`` go to :func:`evaluate_itm_retrieval` (``k``, ``batch_size``, ...)."""
    return run_task(ITMRetrievalTask(split), model_dir, annotation, **kwargs)
