"""Karpathy-split retrieval annotations (Flickr30K, COCO, the generated shapes) from local files.

    split = load_karpathy("data/shapes/dataset_shapes.json", split="test")
    split = load_karpathy("coco/dataset_coco.json", image_root="coco", split="test")  # coco/val2014/...
    split = load_karpathy("flickr/dataset_flickr30k.json", image_root="flickr/flickr30k-images")

Images, captions and the two index maps are kept apart; turning them into tensors is the job of the
model's own processor (``CLIPProcessor``, or any object with ``image_processor`` and ``tokenizer``),
through :func:`image_loader`, :func:`text_loader`, :class:`PairCollator` or :func:`preprocess`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class RetrievalSplit:
    """One split of a retrieval set.

    ``image_paths[i]`` is image ``i``; ``captions[t]`` describes image ``txt2img[t]`` (``[T]`` long);
    ``img2txts[i]`` lists the caption indices of image ``i`` (5 per image in the standard sets).
    Generated data adds ``families`` (``[I]`` long: twins share an id), ``variants`` ("base" or how a
    twin differs from its base) and ``scenes`` (each image's ``objects`` list); all None for Flickr30K / COCO.
    """

    image_paths: list[Path]
    captions: list[str]
    txt2img: torch.Tensor
    img2txts: list[list[int]]
    families: torch.Tensor | None = None
    variants: list[str] | None = None
    scenes: list[list[dict]] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_texts(self) -> int:
        return len(self.captions)


def _bad(annotation: Path, what: str) -> ValueError:
    return ValueError(f"{annotation} is not a Karpathy-format annotation file: {what}")


def read_annotation(annotation: Path) -> list[dict]:
    if not annotation.is_file():
        raise FileNotFoundError(f"annotation file not found: {annotation}")
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(annotation, f"invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _bad(annotation, 'expected an object with an "images" list')
    for n, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise _bad(annotation, f"images[{n}] is not an object")
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise _bad(annotation, f'images[{n}] has no "{key}"')
        if not isinstance(entry["sentences"], list) or not all(isinstance(s, dict) and "raw" in s for s in entry["sentences"]):
            raise _bad(annotation, f'images[{n}]["sentences"] must be a list of objects with "raw"')
    return data["images"]


def load_karpathy(
    annotation: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str | Sequence[str] = "test",
    limit: int | None = None,
    captions_per_image: int | None = 5,
    check_images: bool = True,
    skip: int = 0,
) -> RetrievalSplit:
    """Read a ``dataset_{flickr30k,coco,shapes}.json`` split.

    Args:
        annotation: the JSON file.
        image_root: image ``i`` is ``image_root / filepath / filename`` (COCO: ``filepath`` "val2014";
            Flickr30K has none). Defaults to the annotation's folder.
        split: "train", "val", "test", "restval" or several; "train" includes COCO's "restval".
        limit: keep only the first ``limit`` images of the split.
        captions_per_image: keep the first k captions of each image (5 is the standard protocol;
            a few COCO images have 6-7); None keeps all.
        check_images: fail up front if an image of the split is missing.
        skip: leave out the first ``skip`` images of the split (before ``limit``): a second,
            disjoint subset.

    Raises:
        FileNotFoundError: the annotation file or images of the split are missing (names the paths).
        ValueError: malformed JSON or missing fields, unknown split, image without captions.
    """
    annotation = Path(annotation)
    entries = read_annotation(annotation)
    root = Path(image_root) if image_root is not None else annotation.parent
    wanted = {split} if isinstance(split, str) else set(split)
    if "train" in wanted:
        wanted.add("restval")
    present = sorted({str(e["split"]) for e in entries})
    if not wanted & set(present):
        raise ValueError(f"split {split!r} not in {annotation}; it has {present}")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be a non-negative int, got {skip!r}")
    entries = [e for e in entries if e["split"] in wanted][skip:][:limit]
    paths, captions, txt2img, img2txts = [], [], [], []
    for i, e in enumerate(entries):
        paths.append(root / str(e.get("filepath", "")) / str(e["filename"]))
        raws = [str(s["raw"]).strip() for s in e["sentences"]][:captions_per_image]
        if not raws:
            raise _bad(annotation, f"image {e['filename']} has no captions")
        img2txts.append(list(range(len(captions), len(captions) + len(raws))))
        captions += raws
        txt2img += [i] * len(raws)
    if check_images:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise FileNotFoundError(
                f"{len(missing)} of {len(paths)} images of split {split!r} in {annotation} are missing "
                f"under image_root {root}: {shown}{', ...' if len(missing) > 3 else ''}"
            )
    has_family = all("family" in e for e in entries)
    return RetrievalSplit(
        image_paths=paths,
        captions=captions,
        txt2img=torch.tensor(txt2img, dtype=torch.long),
        img2txts=img2txts,
        families=torch.tensor([int(e["family"]) for e in entries], dtype=torch.long) if has_family else None,
        variants=[str(e.get("variant", "base")) for e in entries] if has_family else None,
        scenes=[list(e["objects"]) for e in entries] if all("objects" in e for e in entries) else None,
        source=f"{annotation}:{split}",
    )


def twin_pairs(split: RetrievalSplit) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Hard-negative pairs of generated data: ``(base [P], twin [P], variants)`` image indices.

    Each twin is paired with the base image of its family; ``variants[p]`` says what differs.
    Empty when the split has no families.
    """
    if split.families is None or split.variants is None:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), []
    base_of = {int(f): i for i, (f, v) in enumerate(zip(split.families, split.variants)) if v == "base"}
    pairs = [
        (base_of[int(f)], i, v)
        for i, (f, v) in enumerate(zip(split.families, split.variants))
        if v != "base" and int(f) in base_of
    ]
    return (
        torch.tensor([p[0] for p in pairs], dtype=torch.long),
        torch.tensor([p[1] for p in pairs], dtype=torch.long),
        [p[2] for p in pairs],
    )


# ------------------------------------------------------------------------------------- processor side
def processor_parts(processor: Any) -> tuple[Any, Any]:
    """``(image_processor, tokenizer)`` of a ``CLIPProcessor``-like object or of such a pair."""
    if isinstance(processor, tuple) and len(processor) == 2:
        return processor
    image_processor, tokenizer = getattr(processor, "image_processor", None), getattr(processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise TypeError(
            f"expected a processor with .image_processor and .tokenizer (e.g. CLIPProcessor) or an "
            f"(image_processor, tokenizer) pair, got {type(processor).__name__}"
        )
    return image_processor, tokenizer


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class ImageDataset(Dataset):
    """The images of a split as PIL RGB images, in split order."""

    def __init__(self, split: RetrievalSplit):
        self.paths = split.image_paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return _open_rgb(self.paths[i])


class PairDataset(Dataset):
    """One item per caption: ``(PIL image, caption, image index)``, for contrastive training."""

    def __init__(self, split: RetrievalSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.n_texts

    def __getitem__(self, t: int):
        i = int(self.split.txt2img[t])
        return _open_rgb(self.split.image_paths[i]), self.split.captions[t], i


class ImageCollator:
    """PIL images -> ``{"pixel_values": [B, 3, H, W]}`` through the processor's image processor."""

    def __init__(self, processor: Any):
        self.image_processor = processor_parts(processor)[0]

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}


class TextCollator:
    """Captions -> ``input_ids``/``attention_mask`` ``[B, L]`` (padded to ``max_length`` if given, else longest)."""

    def __init__(self, processor: Any, max_length: int | None = None):
        self.tokenizer = processor_parts(processor)[1]
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        padding = "max_length" if self.max_length is not None else "longest"
        out = self.tokenizer(list(captions), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class PairCollator:
    """``PairDataset`` items -> pixel_values ``[B, 3, H, W]``, input_ids/attention_mask ``[B, L]``, image_index ``[B]``."""

    def __init__(self, processor: Any, max_length: int | None = None):
        self.images, self.texts = ImageCollator(processor), TextCollator(processor, max_length)

    def __call__(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        images, captions, index = zip(*batch)
        return {**self.images(list(images)), **self.texts(list(captions)), "image_index": torch.tensor(index)}


def image_loader(split: RetrievalSplit, processor: Any, batch_size: int = 64, num_workers: int = 0) -> DataLoader:
    """Batches ``{"pixel_values"}`` of the split's images in order."""
    return DataLoader(ImageDataset(split), batch_size=batch_size, collate_fn=ImageCollator(processor), num_workers=num_workers)


def text_loader(split: RetrievalSplit, processor: Any, batch_size: int = 256, max_length: int | None = None) -> DataLoader:
    """Batches ``{"input_ids", "attention_mask"}`` of the split's captions in order."""
    return DataLoader(split.captions, batch_size=batch_size, collate_fn=TextCollator(processor, max_length))


def preprocess(
    split: RetrievalSplit, processor: Any, max_length: int, batch_size: int = 256, progress: bool = True
) -> dict[str, torch.Tensor]:
    """All images and captions of ``split`` as tensors (small sets that fit in memory).

    Returns ``pixel_values [I, 3, H, W]`` and ``input_ids``/``attention_mask`` ``[T, max_length]``.
    """
    from tqdm.auto import tqdm

    batches = tqdm(image_loader(split, processor, batch_size), desc="images", disable=not progress, leave=False)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    text = TextCollator(processor, max_length)(split.captions)
    return {"pixel_values": pixels, **text}
