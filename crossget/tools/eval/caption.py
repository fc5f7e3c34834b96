"""Image captioning in the COCO-caption format: generate with BLIP, score BLEU-4 and CIDEr.

    model, processor = load_blip("models/blip-image-captioning-base", BlipForConditionalGeneration)
    data = load_coco_captions("coco/coco_karpathy_test_gt.json", image_root="coco/val2014")
    result = evaluate_caption(model, processor, data)       # bleu_4, cider, gflops, images_per_s, results

Files:
    annotation  {"images": [{"id": 1, "file_name": "x.jpg"}, ...],
                 "annotations": [{"image_id": 1, "caption": "a dog ..."}, ...]}
    results     [{"image_id": 1, "caption": "a dog on a couch"}, ...]   (what the COCO server takes)

Scores come from ``pycocoevalcap`` (the COCO caption evaluation code): ``Bleu(4)`` and ``Cider``
(CIDEr-D), on the images that have a result, reported x 100 as BLIP and CrossGET print them
(BLEU-4 39.7, CIDEr 133.3). Tokenizer: ``"ptb"`` (default) is pycocoevalcap's Stanford
PTBTokenizer (needs ``java`` on the PATH), which the official numbers use; ``"basic"`` lower-cases,
splits words from punctuation and drops the same punctuation tokens in Python, for machines
without java; its scores can differ from the official ones in rare tokenisation cases.

Generation follows BLIP's COCO captioning setup by default: the prompt "a picture of " is fed to
the decoder and cut from the output, beam search with 3 beams, ``min_length=5``,
``max_length=20`` (Hugging Face ``generate`` semantics: counted with the prompt tokens).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from torch import nn
from tqdm.auto import tqdm
from transformers import BlipForConditionalGeneration

from crossget.tools.common import ModelClock, device_dtype, read_json
from crossget.tools.eval.blip_common import check_images, check_model, gflops_of, malformed, open_rgb, require_fields
from crossget.tools.eval.runner import run_task

WHAT = "COCO-caption annotation file"
TOKENIZERS = ("ptb", "basic")
# the tokens pycocoevalcap's PTBTokenizer drops after tokenising
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])


@dataclass
class CaptionSet:
    """Images (``image_ids[i]`` at ``image_paths[i]``) and their reference captions by image id."""

    image_ids: list[int]
    image_paths: list[Path]
    references: dict[int, list[str]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.image_ids)


def load_coco_captions(
    annotation: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
    check: bool = True,
) -> CaptionSet:
    """Read a COCO-caption annotation file; image ``i`` is ``image_root / file_name`` (default root:
    the annotation's folder). ``limit`` keeps the first images.

    Raises:
        FileNotFoundError: the file or (with ``check``) images are missing.
        ValueError: malformed JSON, missing fields, an image without captions, a caption of an unknown image.
    """
    annotation = Path(annotation)
    data = read_json(annotation, WHAT)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise malformed(annotation, WHAT, 'expected an object with "images" and "annotations" lists')
    root = Path(image_root) if image_root is not None else annotation.parent
    refs: dict[int, list[str]] = {}
    ids, paths = [], []
    for n, im in enumerate(data["images"]):
        require_fields(im, ("id", "file_name"), annotation, WHAT, f"images[{n}]")
        ids.append(im["id"])
        paths.append(root / str(im["file_name"]))
        refs[im["id"]] = []
    for n, ann in enumerate(data["annotations"]):
        require_fields(ann, ("image_id", "caption"), annotation, WHAT, f"annotations[{n}]")
        if ann["image_id"] not in refs:
            raise malformed(annotation, WHAT, f"annotations[{n}] names image_id {ann['image_id']!r}, not in images")
        refs[ann["image_id"]].append(str(ann["caption"]))
    empty = [i for i in ids if not refs[i]]
    if empty:
        raise malformed(annotation, WHAT, f"{len(empty)} images have no caption, e.g. image_id {empty[0]!r}")
    if not ids:
        raise malformed(annotation, WHAT, "no images")
    ids, paths = ids[:limit], paths[:limit]
    if check:
        check_images(paths, annotation)
    return CaptionSet(ids, paths, {i: refs[i] for i in ids}, str(annotation))


# --------------------------------------------------------------------------- scoring
def _basic_tokenize(caption: str) -> str:
    words = re.findall(r"\w+|[^\w\s]+", caption.lower().replace("\n", " "))
    return " ".join(w for w in words if w not in PTB_PUNCTUATION)


def tokenize(captions: Mapping[Any, Sequence[str]], tokenizer: str = "ptb") -> dict[Any, list[str]]:
    """``{id: [caption, ...]}`` lower-cased, tokenised and without punctuation tokens (see the module doc)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "basic":
        return {k: [_basic_tokenize(c) for c in v] for k, v in captions.items()}
    if shutil.which("java") is None:
        raise OSError('the "ptb" caption tokenizer (pycocoevalcap\'s Stanford PTBTokenizer) needs java on the PATH; '
                      'install a JRE or use tokenizer "basic"')
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_scores(
    references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str], tokenizer: str = "ptb"
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr(-D) x 100 of one candidate per image against its references (pycocoevalcap).

    Only images with a candidate are scored; every candidate's image needs references.
    """
    if not candidates:
        raise ValueError("no candidate captions to score")
    unknown = [k for k in candidates if k not in references]
    if unknown:
        raise ValueError(f"{len(unknown)} candidates are for images without references, e.g. {unknown[0]!r}")
    gts = tokenize({k: list(references[k]) for k in candidates}, tokenizer)
    res = tokenize({k: [c] for k, c in candidates.items()}, tokenizer)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)}
    out["cider"] = 100 * float(cider)
    return out


def read_results(path: str | os.PathLike) -> dict[int, str]:
    """``{image_id: caption}`` of a COCO results file ``[{"image_id", "caption"}, ...]``."""
    what = "COCO-caption results file"
    data = read_json(path, what)
    if not isinstance(data, list):
        raise malformed(path, what, "expected a list of {image_id, caption} objects")
    out = {}
    for n, entry in enumerate(data):
        require_fields(entry, ("image_id", "caption"), path, what, f"entry {n}")
        out[entry["image_id"]] = str(entry["caption"])
    return out


def score_results(annotation: str | os.PathLike, results: str | os.PathLike, tokenizer: str = "ptb") -> dict[str, float]:
    """Scores of a results file against an annotation file (images need not exist)."""
    return caption_scores(load_coco_captions(annotation, check=False).references, read_results(results), tokenizer)


# --------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings (BLIP's COCO captioning defaults)."""

    prompt: str = "a picture of "
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5

    def kwargs(self) -> dict[str, int]:
        return {"num_beams": self.num_beams, "max_length": self.max_length, "min_length": self.min_length}


def prompt_ids(tokenizer: Any, prompt: str, batch: int) -> torch.Tensor:
    """``[batch, P]`` prompt ids as ``BlipForConditionalGeneration.generate`` takes them (``[CLS] ... [SEP]``;
    it swaps in BOS and drops the last token). An empty prompt gives ``[CLS] [SEP]``."""
    ids = tokenizer(prompt.strip(), return_tensors="pt")["input_ids"]
    return ids.expand(batch, -1).clone()


@torch.inference_mode()
def generate_captions(
    model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, settings: GenerationSettings = GenerationSettings()
) -> list[str]:
    """Captions of ``pixel_values [B, 3, H, W]``, the prompt cut off (by tokens, not characters)."""
    ids = prompt_ids(tokenizer, settings.prompt, pixel_values.shape[0]).to(pixel_values.device)
    out = model.generate(pixel_values=pixel_values, input_ids=ids, **settings.kwargs())
    # generate returns BOS + prompt words (the prompt minus its [SEP]) and then the new tokens
    return [c.strip() for c in tokenizer.batch_decode(out[:, ids.shape[1] - 1 :], skip_special_tokens=True)]


def caption_gflops(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor,
                   settings: GenerationSettings = GenerationSettings()) -> float:
    """GFLOPs of captioning one image with ``settings``, forced to ``max_length`` tokens so that the
    count does not depend on where a caption happens to stop."""
    px = pixel_values[:1]
    ids = prompt_ids(tokenizer, settings.prompt, 1).to(px.device)
    kwargs = settings.kwargs() | {"min_length": settings.max_length}
    return gflops_of(model.generate, pixel_values=px, input_ids=ids, **kwargs)


def _batches(data: CaptionSet, processor: Any, batch_size: int):
    for s in range(0, len(data), batch_size):
        images = [open_rgb(p) for p in data.image_paths[s : s + batch_size]]
        yield data.image_ids[s : s + batch_size], processor.image_processor(images=images, return_tensors="pt")[
            "pixel_values"]


def evaluate_caption(
    model: nn.Module,
    processor: Any,
    data: CaptionSet,
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 16,
    tokenizer: str = "ptb",
    progress: bool = True,
) -> dict[str, Any]:
    """Caption every image, score against the references; GFLOPs per image and images/s.

    Returns ``bleu_1..4``, ``cider`` (x 100), ``gflops`` (:func:`caption_gflops`), ``images_per_s``
    (images over model time: vision encoder + decoding), the settings and ``results``
    (``[{"image_id", "caption"}]``, the COCO results format).
    """
    check_model(model, BlipForConditionalGeneration)
    device, dtype = device_dtype(model)
    clock = ModelClock(device)
    results, first = [], None
    total = (len(data) + batch_size - 1) // batch_size
    for ids, px in tqdm(_batches(data, processor, batch_size), total=total, desc="captions", disable=not progress):
        px = px.to(device, dtype)
        first = px[:1] if first is None else first
        with clock:
            captions = generate_captions(model, processor.tokenizer, px, settings)
        results += [{"image_id": i, "caption": c} for i, c in zip(ids, captions)]
    scores = caption_scores(data.references, {r["image_id"]: r["caption"] for r in results}, tokenizer)
    return {
        **scores,
        "gflops": caption_gflops(model, processor.tokenizer, first, settings),
        "images_per_s": clock.rate(len(data)),
        "seconds": clock.seconds,
        "images": len(data),
        "tokenizer": tokenizer,
        "generation": {"prompt": settings.prompt, **settings.kwargs()},
        "results": results,
    }


@dataclass(frozen=True)
class CaptionTask:
    """COCO captions as a :class:`~crossget.tools.eval.runner.BlipTask`: ``options`` are
    :func:`evaluate_caption`'s (``settings``, ``batch_size``, ``tokenizer``)."""

    name = "caption"
    model_class = BlipForConditionalGeneration
    result_keys = ("bleu_4", "cider", "images_per_s")
    results_file = True  # the captions in the COCO results format

    def load(self, path: str | os.PathLike, image_root: str | os.PathLike | None, limit: int | None) -> CaptionSet:
        return load_coco_captions(path, image_root, limit)

    def describe(self) -> dict[str, Any]:
        return {}

    def sample_gflops(self, model: nn.Module, processor: Any, data: CaptionSet, options: Mapping[str, Any]) -> float:
        dev, dtype = device_dtype(model)
        first = next(_batches(data, processor, 1))[1].to(dev, dtype)
        return caption_gflops(model, processor.tokenizer, first, options.get("settings", GenerationSettings()))

    def evaluate(self, model: nn.Module, processor: Any, data: CaptionSet, progress: bool,
                 options: Mapping[str, Any]) -> dict[str, Any]:
        return evaluate_caption(model, processor, data, progress=progress, **options)


CAPTION = CaptionTask()


def run_caption(model_dir: str | os.PathLike, annotation: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Load a local ``BlipForConditionalGeneration`` and a COCO-caption file, evaluate one config
    (:func:`~crossget.tools.eval.runner.run_task`: ``image_root``, ``limit``, ``method``, ``r``,
    ``flops``, ``towers``, ``json_path``, ``device``, ``progress``; the rest, e.g. ``settings``, go to
    :func:`evaluate_caption`). With ``json_path`` the metrics go there and the captions to
    ``<stem>_results.json`` beside it (the COCO results format)."""
    return run_task(CAPTION, model_dir, annotation, **kwargs)
