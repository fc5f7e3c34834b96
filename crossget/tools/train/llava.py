"""Training LLaVA-1.5 on LLaVA's instruction-tuning conversations, through ``accelerate``.

- :class:`LlavaConversations`: LLaVA's JSON (``[{"id", "image", "conversations": [{"from":
  "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}]``), images
  relative to a folder.
- :class:`LlavaCollator`: LLaVA-1.5 prompts (``USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...``),
  as many ``<image>`` placeholders as the (patched) model gives features, labels only on
  the answers.
- :func:`train_llava`: ``(1 - w) L_LM + w L_cross`` (docs/method.md §3; ``L_cross`` only for a model
  patched with crossget's cross tokens), training the cross tokens, LoRA adapters or the
  projector and language model through :class:`~crossget.tools.train.loop.TrainLoop`; resumable
  safetensors checkpoints (:class:`~crossget.tools.train.loop.TrainableCheckpoint`).

The same code runs on one CPU or, under ``accelerate launch``, on several GPUs (each
process takes its own rows of every global batch).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crossget.api import config, cross_token_loss, is_patched, states
from crossget.families.llava import CROSS_LOSS_WEIGHT, adapt_processor
from crossget.io import save_cross_tokens
from crossget.tools.common import read_json
from crossget.tools.eval.llava.generate import build_prompt
from crossget.tools.train.loop import TrainableCheckpoint, TrainLoop, load_named

__all__ = [
    "DEFAULT_LR",
    "TRAINABLE",
    "Conversation",
    "LlavaCollator",
    "LlavaConversations",
    "add_lora",
    "load_lora",
    "train_llava",
]

TRAINABLE = ("cross", "lora", "projector+lm")
DEFAULT_LR = {"cross": 1e-2, "lora": 2e-4, "projector+lm": 2e-5}  # LLaVA-1.5: 2e-4 LoRA, 2e-5 full fine-tuning
IMAGE = "<image>"
IGNORE = -100  # label of tokens the LM loss skips
# the language model's attention projections (never the CLIP tower's, which has the same names)
LORA_TARGETS = r".*language_model.*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
LORA_ATTR = "_crossget_lora"


# --------------------------------------------------------------------------- data
@dataclass
class Conversation:
    """One training sample: an image and its ``(question, answer)`` turns, ``<image>`` removed."""

    id: str
    image: str
    turns: list[tuple[str, str]]


def _parse_record(obj: Any, where: str) -> Conversation | None:
    """A :class:`Conversation` of one JSON record, ``None`` for a text-only one (no ``image``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    where = f"{where} (id {obj['id']!r})" if "id" in obj else where
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    if not obj.get("image"):
        return None
    if not isinstance(obj["image"], str):
        raise ValueError(f"{where}: 'image' must be one file name (several images per sample are not supported)")
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("from") not in ("human", "gpt") or not isinstance(msg.get("value"), str):
            raise ValueError(f"{where}: message {j} must be {{'from': 'human'|'gpt', 'value': str}}, got {msg!r}")
    if conv[0]["from"] != "human":
        conv = conv[1:]  # as LLaVA's preprocessing: the conversation starts with the user
    if sum(m["value"].count(IMAGE) for m in conv) > 1:
        raise ValueError(f"{where}: more than one {IMAGE} (one image per sample)")
    turns = []
    for j in range(0, len(conv) - 1, 2):
        q, a = conv[j], conv[j + 1]
        if (q["from"], a["from"]) != ("human", "gpt"):
            raise ValueError(f"{where}: messages {j + 1} and {j + 2} must be a human question and a gpt answer")
        # LLaVA moves the image to the start of the first question; so do we
        turns.append((q["value"].replace(IMAGE, "").strip(), a["value"].strip()))
    if not turns:
        raise ValueError(f"{where}: no gpt answer")
    return Conversation(str(obj.get("id", where)), obj["image"], turns)


class LlavaConversations(torch.utils.data.Dataset):
    """LLaVA's instruction-tuning JSON with its images (``llava_v1_5_mix665k.json`` layout).

    Records without an image (LLaVA-1.5's text-only ShareGPT part) are skipped and counted
    in ``skipped``. Items are ``{"id", "image": PIL RGB image, "turns": [(q, a), ...]}``.

    Raises:
        FileNotFoundError: no JSON file; with ``check_images``, a missing image (named with its record).
        ValueError: invalid JSON, a malformed record (file, index and id), no samples.
    """

    def __init__(self, path: str | os.PathLike, images: str | os.PathLike, check_images: bool = True):
        self.path, self.images = Path(path), Path(images)
        what = "LLaVA conversation file"
        data = read_json(self.path, what)
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: a {what} must be a JSON list of records, got {type(data).__name__}")
        parsed = [(i, _parse_record(obj, f"{self.path} item {i}")) for i, obj in enumerate(data)]
        self.samples = [c for _, c in parsed if c is not None]
        self.skipped = len(parsed) - len(self.samples)
        if not self.samples:
            raise ValueError(f"{self.path}: no samples with an image ({self.skipped} text-only records skipped)")
        if check_images:
            for i, c in parsed:
                if c is not None and not (self.images / c.image).is_file():
                    raise FileNotFoundError(f"image not found: {self.images / c.image} ({self.path} item {i}, id {c.id!r})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        c = self.samples[index]
        path = self.images / c.image
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path} ({self.path}, id {c.id!r})") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"not a readable image: {path} ({self.path}, id {c.id!r}: {err})") from None
        return {"id": c.id, "image": image, "turns": c.turns}


def conversation_text(processor: Any, turns: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA-1.5's training text of one conversation and the character spans of its answers.

    The first turn is :func:`crossget.tools.eval.llava.build_prompt` (the prompt the evaluations
    use: ``USER: <image>\\n{q} ASSISTANT:``), later ones ``USER: {q} ASSISTANT:``; each answer
    follows after a space and ends with EOS (LLaVA's ``conv_vicuna_v1`` separators, without
    its system line, as the llava-hf chat template). Spans cover answer text and EOS.
    """
    eos = processor.tokenizer.eos_token or ""
    text, spans = "", []
    for i, (q, a) in enumerate(turns):
        text += build_prompt(processor, q) if i == 0 else f"USER: {q} ASSISTANT:"
        text += " "
        spans.append((len(text), len(text) + len(a) + len(eos)))
        text += a + eos
    return text, spans


class LlavaCollator:
    """Batches of :class:`LlavaConversations` items for a LLaVA model, patched or not.

    Works on a copy of ``processor`` adapted to the model (:func:`crossget.adapt_processor`)
    as it is patched now: build it after patching. Returns ``input_ids``, ``attention_mask``,
    ``labels`` ``[B, L]`` (right-padded; labels ``-100`` except on the answers and their EOS)
    and ``pixel_values`` ``[B, 3, H, W]``. ``max_length`` cuts the text (never the image).
    """

    def __init__(self, processor: Any, model: nn.Module, max_length: int = 2048, pad_square: bool | None = None):
        self.processor = adapt_processor(copy.copy(processor), model)  # the caller's processor stays stock
        tok = self.processor.tokenizer
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        self.image_token = getattr(self.processor, "image_token", IMAGE)
        self.image_id = self.processor.tokenizer.convert_tokens_to_ids(self.image_token)
        self.max_length = max_length
        self.image_kwargs = {} if pad_square is None else {"do_pad": pad_square}

    def encode(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` ``[L]`` and ``pixel_values`` ``[1, 3, H, W]`` of one item."""
        text, spans = conversation_text(self.processor, item["turns"])
        try:
            enc = self.processor(images=[item["image"]], text=[text], return_offsets_mapping=True, return_tensors="pt",
                                 **self.image_kwargs)
        except NotImplementedError as err:  # slow tokenizers have no offsets
            raise TypeError(f"training needs a fast tokenizer (offsets of tokens): {err}") from None
        ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
        # offsets refer to the text with each <image> repeated n times: move the spans along
        n = int((ids == self.image_id).sum())
        grow = (n - 1) * len(self.image_token)
        spans = [(s + grow * text[:s].count(self.image_token), e + grow * text[:s].count(self.image_token)) for s, e in spans]
        answer = torch.zeros(len(ids), dtype=torch.bool)
        for s, e in spans:  # a token is an answer token where its characters overlap an answer's
            answer |= (offsets[:, 1] > s) & (offsets[:, 0] < e)
        labels = ids.masked_fill(~answer | (ids == self.image_id), IGNORE)
        if (ids[self.max_length :] == self.image_id).any():
            raise ValueError(f"sample {item['id']!r}: max_length {self.max_length} would cut its image placeholders")
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length], "pixel_values": enc["pixel_values"]}

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [self.encode(item) for item in items]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: the first token (the LM cross token's anchor) stays at 0
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": torch.cat([r["pixel_values"] for r in rows])}


# --------------------------------------------------------------------------- LoRA
def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("trainable='lora' needs peft: pip install 'crossget[lora]' (or pip install peft)") from err
    return peft


def add_lora(model: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.0) -> dict:
    """Inject LoRA adapters (``peft``) into the language model's attention projections, in place
    (the model keeps its class, so crossget's patch and helpers still see a LLaVA); returns the settings."""
    peft = _peft()
    settings = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": LORA_TARGETS}
    peft.inject_adapter_in_model(peft.LoraConfig(**settings), model)
    model.__dict__[LORA_ATTR] = settings  # what train_llava writes beside the weights
    return settings


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def _save_lora(model: nn.Module, path: Path, settings: dict) -> None:
    save_file(_lora_tensors(model), os.fspath(path), metadata={"format": "crossget.lora.v1", "config": json.dumps(settings)})


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject and load LoRA adapters saved by :func:`train_llava` (``lora.safetensors``).

    Raises:
        FileNotFoundError: no file. ValueError: not a LoRA file of this model's shape.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "crossget.lora.v1":
        raise ValueError(f"{path} is not a crossget LoRA file")
    if not _lora_tensors(model):
        cfg = json.loads(meta["config"])
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"])
    load_named(model, load_file(path), path)
    return model


# --------------------------------------------------------------------------- training
def _set_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze everything but what ``trainable`` names (and the cross tokens, always); returns those parameters."""
    base = model.model if hasattr(model, "lm_head") else model
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable == "lora":
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif trainable == "projector+lm":
        for m in (base.multi_modal_projector, base.language_model, getattr(model, "lm_head", None)):
            if m is not None:
                m.requires_grad_(True)
    for st in states(model).values():
        if st.cross_tokens is not None:
            st.cross_tokens.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _epoch_rows(n: int, seed: int, epoch: int, batch: int, rank: int, world: int) -> list[int]:
    """This process's sample indices for one epoch, batch after batch: a permutation from
    ``seed + epoch`` (so a resumed run sees the same order), cut into global batches of
    ``batch * world`` rows, of which process ``rank`` takes its ``batch``."""
    per_epoch = n // (batch * world)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[: per_epoch * batch * world].view(per_epoch, world, batch)[:, rank].flatten().tolist()


def train_llava(
    model: nn.Module,
    processor: Any,
    data: LlavaConversations,
    out_dir: str | os.PathLike,
    *,
    trainable: str = "cross",
    steps: int = 1000,
    batch_size: int = 16,
    lr: float | None = None,
    seed: int = 0,
    cross_weight: float = CROSS_LOSS_WEIGHT,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    checkpoint_every: int = 200,
    log_every: int = 10,
    max_length: int = 2048,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    grad_clip: float | None = 1.0,
    workers: int = 0,
    pad_square: bool | None = None,
) -> tuple[nn.Module, dict]:
    """Train a ``LlavaForConditionalGeneration`` (patched with crossget, or not) on ``data``.

    Loss: the LM loss on the answers, or ``(1 - cross_weight) * LM + cross_weight *
    cross_token_loss`` when the model carries crossget cross tokens (docs/method.md §3). ``trainable``:

    - ``"cross"``: only the cross tokens (vision tower theta and the LM's); needs
      ``crossget.patch(model, method="crossget", ...)``.
    - ``"lora"``: LoRA adapters (``peft``, rank ``lora_rank``) on the language model's
      attention projections, plus the cross tokens if any.
    - ``"projector+lm"``: the multimodal projector, the language model and its head, plus
      the cross tokens if any; the vision tower stays frozen (also for an unpatched model).

    ``batch_size`` is per process; the learning rate (default :data:`DEFAULT_LR`) warms up
    over 3% of the steps, then follows a cosine. Written to ``out_dir``:
    ``cross_tokens.safetensors`` (:func:`crossget.save_cross_tokens`) and ``lora.safetensors``
    every ``checkpoint_every`` steps; ``model/`` (``save_pretrained``, with the stock
    processor) at the end for ``"projector+lm"``; ``state/`` (trained weights in
    safetensors, optimizer and scheduler, step) for ``resume``; ``training.json`` (settings,
    losses every ``log_every`` steps, wall time). ``max_minutes`` stops early, checkpointed.
    ``pad_square`` as in evaluation: True pads images to squares (LLaVA-1.5), None keeps the processor's.

    Returns ``(model, log)``, the model unwrapped and in eval mode.

    Raises:
        ValueError: bad settings, ``"cross"`` without cross tokens, fewer samples than a batch.
        ImportError: ``"lora"`` without ``peft``.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if not 0 <= cross_weight <= 1:
        raise ValueError(f"cross_weight must be in [0, 1], got {cross_weight}")
    if steps < 1 or batch_size < 1 or checkpoint_every < 1 or log_every < 1:
        raise ValueError("steps, batch_size, checkpoint_every and log_every must be >= 1")
    has_cross = any(st.cross_tokens is not None for st in states(model).values())
    if trainable == "cross" and not has_cross:
        raise ValueError("trainable='cross' needs a model patched with crossget.patch(model, method='crossget', ...)")
    use_cross = has_cross and cross_weight > 0
    lr = DEFAULT_LR[trainable] if lr is None else lr
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lora = None
    if trainable == "lora":  # adapters loaded with load_lora go on training; otherwise new ones
        lora = model.__dict__.get(LORA_ATTR) or add_lora(model, lora_rank, lora_alpha)
    params = _set_trainable(model, trainable)
    collate = LlavaCollator(processor, model, max_length, pad_square)
    loop = TrainLoop(model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0),  # LLaVA-1.5 uses no weight decay
                     steps, warmup=max(1, math.ceil(0.03 * steps)), checkpoint=TrainableCheckpoint(out / "state"),
                     checkpoint_every=checkpoint_every, max_minutes=max_minutes, log_every=log_every,
                     grad_clip=grad_clip, progress=progress, desc=f"train-llava ({trainable})")
    acc, bare = loop.acc, loop.unwrapped()
    per_epoch = len(data) // (batch_size * acc.num_processes)
    if per_epoch == 0:
        raise ValueError(f"{len(data)} samples do not fill one batch of {batch_size} x {acc.num_processes} processes")

    log: dict[str, Any] = {
        "trainable": trainable, "steps": steps, "batch_size": batch_size, "processes": acc.num_processes, "lr": lr,
        "seed": seed, "cross_weight": cross_weight if has_cross else None, "max_length": max_length,
        "pad_square": pad_square, "lora": lora, "patch": config(bare).to_dict() if is_patched(bare) else None,
        "data": str(data.path), "samples": len(data), "skipped_text_only": data.skipped,
        "loss": [], "train_seconds": 0.0, "resumed_at": 0,
    }
    done = loop.resume() if resume else 0
    if done:  # the loss log goes on from the checkpoint's step
        if (out / "training.json").is_file():
            old = json.loads((out / "training.json").read_text())
            log["loss"] = [e for e in old.get("loss", []) if e["step"] <= done]
            log["train_seconds"] = old.get("train_seconds", 0.0)
        log["resumed_at"] = done
    earlier = log["train_seconds"]

    def batches(done: int) -> Iterator[dict[str, torch.Tensor]]:
        epoch, skip = divmod(done, per_epoch)
        while True:
            rows = _epoch_rows(len(data), seed, epoch, batch_size, acc.process_index, acc.num_processes)[skip * batch_size :]
            yield from torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=rows, collate_fn=collate,
                                                   num_workers=workers)
            epoch, skip = epoch + 1, 0

    dtype = next(bare.parameters()).dtype

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        lm = model(**batch).loss
        cross = cross_token_loss(bare) if use_cross else None
        loss = lm if cross is None else (1 - cross_weight) * lm + cross_weight * cross
        return loss, {"loss": loss, "lm": lm, "cross": cross}

    def on_log(entry: dict[str, Any]) -> None:
        log["loss"].append({**entry, "seconds": round(earlier + entry["seconds"], 2)})

    def note_time() -> None:
        log["train_seconds"] = earlier + loop.elapsed
        if loop.stopped:
            log["stopped_early_at"] = loop.step

    def save(step: int, final: bool) -> None:
        note_time()
        if has_cross:
            save_cross_tokens(bare, out / "cross_tokens.safetensors")
        if trainable == "lora":
            _save_lora(bare, out / "lora.safetensors", log["lora"])
        if final and trainable == "projector+lm":
            # crossget's cross-token parameters are not LLaVA weights: they live in cross_tokens.safetensors
            weights = {k: v for k, v in bare.state_dict().items() if "crossget" not in k}
            bare.save_pretrained(out / "model", state_dict=weights)
            processor.save_pretrained(out / "model")
        (out / "training.json").write_text(json.dumps(log, indent=2))

    loop.fit(batches, loss_fn, on_log=on_log, on_save=save)
    note_time()
    return bare.eval(), log
