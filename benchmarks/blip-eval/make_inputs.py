"""Inputs for timing the BLIP evaluation harnesses without downloads: random-weight BLIP models
and a few generated images in every data format the harnesses read.

    python benchmarks/blip-eval/make_inputs.py --out /tmp/blip-eval [--size base|tiny] [--images 8]

Writes ``OUT/{itm,caption,vqa}`` (``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration``,
``BlipForQuestionAnswering``, each with its ``BlipProcessor``) and ``OUT/data/`` with
``dataset_shapes.json`` (Karpathy), ``captions_gt.json`` (COCO caption), ``questions.json`` +
``annotations.json`` (VQAv2, images ``COCO_val2014_%012d.jpg``) and ``dev.json`` (NLVR2). ``base``
is BLIP-base (ViT-B/16 at 384 px, BERT-base text, the 30524-token vocabulary size); the weights
are random, so scores mean nothing, while GFLOPs and throughput are those of the real sizes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")
WORDS = ("a an the picture of photo small big on left right is there what color shape how many two one yes no "
         "are both images in . , ? !").split() + list(COLORS) + list(SHAPES)


def processor(vocab_size: int, image_size: int) -> BlipProcessor:
    """A BERT tokenizer with BLIP's special-token ids ([CLS] 101, [SEP] 102, [DEC] 30522, [ENC] 30523 in the
    base vocabulary) and a few real words; the other ids are filler tokens."""
    vocab = [f"[unused{i}]" for i in range(vocab_size)]
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]",
               vocab_size - 2: "[DEC]", vocab_size - 1: "[ENC]"}
    if vocab_size < 200:  # tiny: the specials first
        special = {0: "[PAD]", 1: "[UNK]", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]", vocab_size - 2: "[DEC]",
                   vocab_size - 1: "[ENC]"}
    for i, tok in special.items():
        vocab[i] = tok
    start = 1000 if vocab_size >= 2000 else 5
    for i, w in enumerate(WORDS):
        vocab[start + i] = w
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]",
                        additional_special_tokens=["[ENC]"], model_max_length=512)
    return BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tok), tok


def config(size: str, tok: BertTokenizer) -> BlipConfig:
    ids = dict(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.sep_token_id, vocab_size=len(tok))
    if size == "base":
        # BlipVisionConfig's initializer_range of 1e-10 would make the vision tower output ~0
        return BlipConfig(text_config=ids, vision_config=dict(initializer_range=0.02))
    return BlipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),
        image_text_hidden_size=16,
    )


def draw(path: Path, color: str, shape: str, size: int, rng: random.Random) -> None:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    a, b = rng.randint(0, size // 3), rng.randint(2 * size // 3, size)
    (d.rectangle if shape == "square" else d.ellipse)((a, a, b, b), fill=COLORS[color])
    im.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=("base", "tiny"), default="base")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    image_size = 384 if args.size == "base" else 32
    proc, tok = processor(30524 if args.size == "base" else 64, image_size)
    cfg = config(args.size, tok)
    for name, cls in (("itm", BlipForImageTextRetrieval), ("caption", BlipForConditionalGeneration),
                      ("vqa", BlipForQuestionAnswering)):
        torch.manual_seed(0)
        cls(cfg).eval().save_pretrained(out / name)
        proc.save_pretrained(out / name)

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    scenes = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(args.images)]
    karpathy, coco_images, coco_anns, questions, answers, nlvr = [], [], [], [], [], []
    for i, (color, shape) in enumerate(scenes):
        name = f"COCO_val2014_{i:012d}.jpg"
        draw(data / name, color, shape, 2 * image_size, rng)
        caps = [f"a {color} {shape}", f"a picture of a big {color} {shape} ."]
        karpathy.append({"filename": name, "split": "test", "sentences": [{"raw": c} for c in caps]})
        coco_images.append({"id": i, "file_name": name})
        coco_anns += [{"id": 2 * i + j, "image_id": i, "caption": c} for j, c in enumerate(caps)]
        questions.append({"question_id": 10 * i, "image_id": i, "question": "what color is the shape?"})
        answers.append({"question_id": 10 * i, "image_id": i, "question_type": "what color", "answer_type": "other",
                        "multiple_choice_answer": color,
                        "answers": [{"answer": color, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]})
        left, right = f"dev-{i}-0-img0.png", f"dev-{i}-0-img1.png"
        other = scenes[(i + 1) % len(scenes)]
        draw(data / left, color, shape, 2 * image_size, rng)
        draw(data / right, *other, 2 * image_size, rng)
        nlvr.append({"identifier": f"dev-{i}-0-0", "sentence": f"there is a {color} {shape}", "label": "True"})
    (data / "dataset_shapes.json").write_text(json.dumps({"images": karpathy}))
    (data / "captions_gt.json").write_text(json.dumps({"images": coco_images, "annotations": coco_anns}))
    (data / "questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (data / "annotations.json").write_text(json.dumps({"annotations": answers}))
    (data / "dev.json").write_text("".join(json.dumps(e) + "\n" for e in nlvr))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
