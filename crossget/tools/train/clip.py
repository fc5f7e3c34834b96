"""Training: a small CLIP from scratch (the shipped default model) and cross tokens.

Both train with :class:`~crossget.tools.train.loop.TrainLoop` (``accelerate``): the same code trains
on one CPU or, launched with ``accelerate launch``, on several GPUs. Checkpoints are safetensors.

- :func:`train_base`: contrastive training of a ``CLIPModel`` built from a small config,
  saved with ``save_pretrained`` (weights, tokenizer, image processor); optionally with an
  auxiliary loss that predicts each grid cell's contents of a generated scene from the image.
- :func:`train_cross_tokens`: docs/method.md §3's ``L = (1 - w) L_task + w L_cross`` for a patched
  model; only the cross tokens learn unless ``all_weights`` is set; resumable.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossget.api import cross_token_loss, states
from crossget.io import save_cross_tokens
from crossget.tools.train.common import accelerator
from crossget.tools.train.loop import AccelerateCheckpoint, TrainLoop, progress_bar, repeat_epochs, save_trained


@dataclass
class BaseModelConfig:
    """Size of the default model: a ViT small enough to train on 2 CPU cores."""

    image_size: int = 96
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 6
    vision_heads: int = 3
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 2
    max_text_len: int = 64
    projection_dim: int = 128

    def clip_config(self, vocab_size: int, bos: int, eos: int, pad: int):
        from transformers import CLIPConfig

        return CLIPConfig(
            vision_config=dict(
                hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                image_size=self.image_size, patch_size=self.patch_size,
            ),
            text_config=dict(
                hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                max_position_embeddings=self.max_text_len, vocab_size=vocab_size,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
            ),
            projection_dim=self.projection_dim,
        )


@dataclass
class PairData:
    """Preprocessed image-caption pairs: ``pixel_values`` ``[I, 3, H, W]``, one row per
    caption in ``input_ids``/``attention_mask`` ``[T, L]`` and ``txt2img`` ``[T]``."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    txt2img: torch.Tensor
    families: torch.Tensor | None = None  # [I]: keep families together in a batch
    scene_targets: torch.Tensor | None = None  # [I, 9, 5]: generated scenes' cell classes

    def batches(
        self, batch_size: int, generator: torch.Generator, scene_targets: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of batches of distinct images, each with one of its captions.

        With ``families``, whole families are shuffled and batched together, so every
        batch holds hard negatives (scenes that differ in one count or position).
        ``scene_targets=True`` adds the images' ``scene_targets`` rows to each batch."""
        n_img = self.pixel_values.shape[0]
        caption_of = _one_caption_per_image(self.txt2img, n_img, generator)
        if self.families is None:
            order = torch.randperm(n_img, generator=generator)
        else:
            ids = self.families.unique()
            rank = torch.empty_like(ids)
            rank[torch.randperm(len(ids), generator=generator)] = torch.arange(len(ids))
            family_rank = rank[torch.searchsorted(ids, self.families)]
            order = family_rank.argsort(stable=True)
        for start in range(0, n_img - batch_size + 1, batch_size):
            img = order[start : start + batch_size]
            txt = caption_of[img]
            batch = {
                "pixel_values": self.pixel_values[img],
                "input_ids": self.input_ids[txt],
                "attention_mask": self.attention_mask[txt],
            }
            if scene_targets:
                batch["scene_targets"] = self.scene_targets[img]
            yield batch


def _one_caption_per_image(txt2img: torch.Tensor, n_img: int, g: torch.Generator) -> torch.Tensor:
    noise = torch.rand(txt2img.shape[0], generator=g)
    # for each image, the caption with the largest noise among its captions
    key = txt2img.double() * 2 + noise.double()
    order = key.argsort()
    last = torch.zeros(n_img, dtype=torch.long)
    last[txt2img[order]] = order
    return last


class SceneHead(nn.Module):
    """Linear read-out of every grid cell's classes (:data:`~crossget.tools.data.shapes.SCENE_CLASSES`)
    from the vision tower's pooled output ``[B, W]``; used only while training.

    Contrastive training alone left the default model blind to texture and position: neither tower
    separates twins that differ only there (cosine 0.98 / 0.999), so neither gives the other a
    gradient to learn them. Naming each cell's contents breaks that tie on the image side.
    It reads the pooled output, not the normalised image embeddings: after stages 3-4, which read
    those, a linear probe on the pooled output could not tell which cells are occupied (majority
    class), while a head on the pooled output alone taught the same tower that in 200 steps (README)."""

    def __init__(self, width: int):
        super().__init__()
        from crossget.tools.data.shapes import SCENE_CLASSES

        self.classes = SCENE_CLASSES
        self.proj = nn.Linear(width, 9 * sum(SCENE_CLASSES))

    def forward(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over cells and attributes; ``targets`` ``[B, 9, 5]`` long."""
        logits = self.proj(pooled).view(pooled.shape[0], 9, -1).split(self.classes, dim=-1)
        losses = [nn.functional.cross_entropy(part.flatten(0, 1), targets[..., k].flatten())
                  for k, part in enumerate(logits)]
        return torch.stack(losses).mean()


def text_pooled_state(text_model: nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled EOT state ``[B, W]`` (after its final LayerNorm, before the projection),
    picked as ``CLIPTextTransformer`` picks it: transformers 5 puts the projected one in
    ``text_model_output.pooler_output``."""
    ids = input_ids.to(torch.int)
    eos = ids.argmax(-1) if text_model.eos_token_id == 2 else (ids == text_model.eos_token_id).int().argmax(-1)
    return last_hidden_state[torch.arange(len(ids), device=ids.device), eos]


def sincos_grid(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine position codes (MAE): ``[grid * grid, dim]`` row-major, half the channels for
    the row, half for the column; values in [-1, 1]."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega  # [grid, dim/4]
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)  # [grid, dim/2]
    rows, cols = axis[:, None].expand(grid, grid, -1), axis[None, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


@torch.no_grad()
def add_sincos_positions(vision_model: nn.Module, amplitude: float) -> None:
    """Add ``amplitude *`` :func:`sincos_grid` to a CLIP vision tower's learned patch position
    embeddings (the CLS row unchanged); they stay trainable.

    Trained by the contrastive loss alone, the default model's position embeddings kept no spatial
    order (neighbouring patches' codes as alike as any two), so it could not tell where things are.
    Adding these codes (stage 4) did not change that within 47 minutes of training (README)."""
    emb = vision_model.embeddings
    table = emb.position_embedding.weight
    grid = emb.image_size // emb.patch_size
    # temperature ~ 2 x grid: on a small grid, far-apart patches get unlike codes (cosine ~0 instead of 0.7)
    table[1:] += amplitude * sincos_grid(grid, table.shape[1], temperature=2.0 * grid).to(table)


def check_learning_rate(name: str, value: float) -> None:
    """ValueError unless ``value`` is a finite number > 0 (``nan`` would train NaN weights silently)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_batch(batch_size: int, images: int) -> None:
    """ValueError when ``images`` do not fill one batch: :meth:`PairData.batches` gives only full
    batches of distinct images (a contrastive batch of fewer pairs would be another task), so a
    smaller data set would give no batch at all."""
    if batch_size > images:
        raise ValueError(f"the data has {images} images, fewer than one batch of {batch_size}: "
                         f"give a batch size of at most {images} (--batch)")


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in CLIP/open_clip: no decay on biases, norms and ``logit_scale`` (decay would
    pull the temperature towards 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_base(
    data: PairData,
    tokenizer: Any,
    image_processor: Any,
    out_dir: str | os.PathLike,
    config: BaseModelConfig | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    init_from: str | os.PathLike | None = None,
    scene_weight: float = 0.0,
    sincos_positions: float = 0.0,
    scene_only_steps: int = 0,
    text_scene_weight: float = 0.0,
    text_warmup_steps: int = 0,
) -> tuple[nn.Module, dict]:
    """Train a ``CLIPModel`` from scratch (or go on from ``init_from``) with the CLIP loss;
    save it to ``out_dir``.

    ``scene_weight > 0`` adds ``scene_weight *`` :class:`SceneHead` loss (needs
    ``data.scene_targets``); the head is dropped afterwards, the saved model is a plain ``CLIPModel``.
    ``sincos_positions > 0`` first adds 2-D sine-cosine codes of that amplitude to the vision
    position embeddings (:func:`add_sincos_positions`). The first ``scene_only_steps`` steps train
    the scene losses alone: with the CLIP loss beside it from the start, the scene loss of the default
    model had not left its plateau after 350 steps (README). ``text_scene_weight > 0`` adds the same
    loss read from the text tower's pooled EOT state (a second head): the caption names the scene, so
    the text side learns position and texture words too, instead of waiting for the contrastive loss
    to teach them. ``text_warmup_steps`` first trains the text tower on that loss alone (no image
    forward, so a step costs a fraction of a full one): within 750 steps beside the CLIP loss it had
    not left the plateau of naming the objects but not their places (README).

    Returns ``(model, log)``; the log (also ``out_dir/training.json``) records the
    settings, losses per epoch and wall time.
    """
    from transformers import CLIPModel

    if scene_weight < 0 or text_scene_weight < 0:
        raise ValueError(f"scene weights must be >= 0, got {scene_weight} and {text_scene_weight}")
    use_scene, use_text_scene = scene_weight > 0, text_scene_weight > 0
    if (use_scene or use_text_scene) and data.scene_targets is None:
        raise ValueError("a scene weight > 0 needs data with scene targets (generated shapes data)")
    if scene_only_steps < 0 or (scene_only_steps and not (use_scene or use_text_scene)):
        raise ValueError(f"scene_only_steps must be >= 0 and needs a scene weight > 0, got {scene_only_steps}")
    if text_warmup_steps < 0 or (text_warmup_steps and not use_text_scene):
        raise ValueError(f"text_warmup_steps must be >= 0 and needs text_scene_weight > 0, got {text_warmup_steps}")
    check_learning_rate("lr", lr)
    check_batch(batch_size, data.pixel_values.shape[0])
    steps_per_epoch = data.pixel_values.shape[0] // batch_size
    config = config or BaseModelConfig()
    torch.manual_seed(seed)
    if init_from is not None:
        model = CLIPModel.from_pretrained(init_from)
    else:
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        model = CLIPModel(config.clip_config(len(tokenizer), *ids))
    if sincos_positions:
        add_sincos_positions(model.vision_model, sincos_positions)
    groups = _decay_groups(model, weight_decay)
    if use_scene:
        head = SceneHead(model.config.vision_config.hidden_size)
        groups += _decay_groups(head, weight_decay)
    if use_text_scene:
        text_head = SceneHead(model.config.text_config.hidden_size)
        groups += _decay_groups(text_head, weight_decay)
    g = torch.Generator().manual_seed(seed)
    acc = accelerator()
    warmup_log = _text_scene_warmup(model.text_model, text_head, data, text_warmup_steps, batch_size, lr,
                                    weight_decay, g, progress, acc.device) if text_warmup_steps else {}
    total = epochs * steps_per_epoch
    # one log entry and one look at the clock per epoch: max_minutes stops after the epoch that passes it
    loop = TrainLoop(model, torch.optim.AdamW(groups, lr=lr), total, warmup=max(1, total // 20), acc=acc,
                     max_minutes=max_minutes, time_check_every=steps_per_epoch, log_every=steps_per_epoch,
                     progress=progress, desc="train-base")
    if use_scene:
        head = acc.prepare(head)
        post_layernorm = loop.unwrapped().vision_model.post_layernorm
    if use_text_scene:
        text_head = acc.prepare(text_head)
        text_model = loop.unwrapped().text_model
    log: dict[str, Any] = {"config": asdict(config), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                           "weight_decay": weight_decay, "no_weight_decay": "biases, norms, logit_scale", "seed": seed,
                           "init_from": str(init_from), "scene_weight": scene_weight,
                           "sincos_positions": sincos_positions, "scene_only_steps": scene_only_steps,
                           "text_scene_weight": text_scene_weight, **warmup_log, "epoch_loss": []}
    series = {"epoch_loss": "loss"}  # log key: the logged value whose means per epoch it lists
    if use_scene:
        log["scene_head_reads"] = "vision tower pooled CLS state (post_layernorm, before the projection)"
        log["epoch_scene_loss"] = []
        series["epoch_scene_loss"] = "scene"
    if use_text_scene:
        log["text_scene_head_reads"] = "text tower pooled EOT state (final_layer_norm, before the projection)"
        log["epoch_text_scene_loss"] = []
        series["epoch_text_scene_loss"] = "text_scene"

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        targets = batch.pop("scene_targets", None)
        out = model(**batch, return_loss=True)
        logs = {"loss": out.loss}  # the CLIP loss alone, comparable across runs
        # scene loss only; every parameter stays in the graph (DDP); weight decay still applies
        loss = 0.0 * out.loss if step < scene_only_steps else out.loss
        if use_scene:
            # the vision tower's pooled CLS state, before the projection (transformers 5 puts the
            # projected one in vision_model_output.pooler_output)
            cls = out.vision_model_output.last_hidden_state[:, 0]
            logs["scene"] = head(post_layernorm(cls), targets)
            loss = loss + scene_weight * logs["scene"]
        if use_text_scene:
            text_state = text_pooled_state(text_model, out.text_model_output.last_hidden_state, batch["input_ids"])
            logs["text_scene"] = text_head(text_state, targets)
            loss = loss + text_scene_weight * logs["text_scene"]
        return loss, logs

    scene = use_scene or use_text_scene
    seconds = loop.fit(lambda _: (b for _ in range(epochs) for b in data.batches(batch_size, g, scene_targets=scene)),
                       loss_fn)
    for key, name in series.items():
        log[key] = [entry[name] for entry in loop.history]
    if loop.stopped:
        log["stopped_early_after_epoch"] = loop.step // steps_per_epoch - 1
    log["train_seconds"] = seconds
    return save_trained(acc, loop.model, out_dir, log, tokenizer, image_processor), log


def _text_scene_warmup(text_model: nn.Module, head: SceneHead, data: PairData, steps: int, batch_size: int,
                       lr: float, weight_decay: float, g: torch.Generator, progress: bool,
                       device: torch.device | str = "cpu") -> dict:
    """Train ``text_model`` and ``head`` on the caption scene loss alone for ``steps`` steps (constant
    ``lr``) on ``device`` (they are moved there), before the model is handed to accelerate. Every
    process sees the same batches (same seed), so replicas stay equal. Returns log entries: the mean
    loss of each 100 steps and the time (not part of ``train_seconds``)."""
    text_model.to(device)
    head.to(device)
    opt = torch.optim.AdamW(_decay_groups(text_model, weight_decay) + _decay_groups(head, weight_decay), lr=lr)
    losses, means, start = [], [], time.perf_counter()
    batches = repeat_epochs(lambda: data.batches(batch_size, g, scene_targets=True))
    with progress_bar(steps, "text warm-up", not progress) as bar:
        for step in range(1, steps + 1):
            batch = next(batches)
            batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "scene_targets")}
            out = text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = head(text_pooled_state(text_model, out.last_hidden_state, batch["input_ids"]), batch["scene_targets"])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(text_scene=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
            if len(losses) == 100 or step == steps:
                means.append(sum(losses) / len(losses))
                losses = []
    return {"text_warmup_steps": steps, "text_warmup_loss_per_100_steps": means,
            "text_warmup_seconds": time.perf_counter() - start}


def train_cross_tokens(
    model: nn.Module,
    data: PairData,
    out_dir: str | os.PathLike,
    *,
    cross_weight: float = 0.5,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-2,
    all_weights: bool = False,
    weights_lr: float = 1e-4,
    checkpoint_every: int = 100,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    model_parts: tuple[Any, ...] = (),
) -> tuple[nn.Module, dict]:
    """Learn the cross tokens of a model patched with ``method="crossget"`` (docs/method.md §3).

    Loss ``(1 - cross_weight) * CLIP loss + cross_weight * cross_token_loss``. Only the
    cross tokens train (at ``lr``) unless ``all_weights``, which fine-tunes every other weight too,
    at ``weights_lr``, as the paper fine-tunes CLIP with CrossGET. Every ``checkpoint_every`` steps
    the cross tokens (``cross_tokens.safetensors``) and the trainer state (``state/``, through
    ``accelerate``) are written to ``out_dir``; with ``resume`` a run continues from them. With
    ``all_weights`` the finished run also writes the model, without its cross tokens, as a plain
    ``CLIPModel`` in ``out_dir/model`` with every ``model_parts`` (tokenizer, processor).

    Batches hold ``batch_size`` distinct images, each with one of its captions; the images left
    over at an epoch's end wait for the next epoch, so the data must hold at least one batch.
    A step whose loss is not finite stops the run with a
    :class:`~crossget.tools.train.loop.NonFiniteLossError` (a ``ValueError``) and leaves the last
    checkpoint (``cross_tokens.safetensors``, ``state/``) as it was.

    Raises:
        ValueError: the model is not patched with cross tokens, a bad weight or learning rate,
            fewer images than one batch, or a non-finite loss.
    """
    if not 0 <= cross_weight <= 1:
        raise ValueError(f"cross_weight must be in [0, 1], got {cross_weight}")
    check_learning_rate("lr", lr)
    check_learning_rate("weights_lr", weights_lr)
    check_batch(batch_size, data.pixel_values.shape[0])
    thetas = [s.cross_tokens for s in states(model).values() if s.cross_tokens is not None]
    if not thetas:
        raise ValueError("train_cross_tokens needs a model patched with method='crossget'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(all_weights)
    for t in thetas:
        t.requires_grad_(True)
    theta_ids = {id(t) for t in thetas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in theta_ids]
    opt = torch.optim.AdamW([{"params": thetas, "lr": lr}] + ([{"params": weights, "lr": weights_lr}] if weights else []),
                            weight_decay=0.0)
    loop = TrainLoop(model, opt, steps, checkpoint=AccelerateCheckpoint(out), checkpoint_every=checkpoint_every,
                     progress=progress, desc="train-cross")  # constant learning rate
    done = loop.resume() if resume else 0
    # a resumed run draws new batches (seed + step), it does not replay the first run's order
    g = torch.Generator().manual_seed(seed + done)
    log: dict[str, Any] = {"cross_weight": cross_weight, "steps": steps, "batch_size": batch_size, "lr": lr,
                           "all_weights": all_weights, **({"weights_lr": weights_lr} if all_weights else {}), "seed": seed,
                           "resumed_at": done, "loss": []}

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        task = model(**batch, return_loss=True).loss
        cross = cross_token_loss(loop.unwrapped())
        return (1 - cross_weight) * task + cross_weight * cross, {"task": task, "cross": cross}

    def save(step: int, final: bool) -> None:
        save_cross_tokens(loop.unwrapped(), out / "cross_tokens.safetensors")
        if all_weights and final:  # checkpoints hold the weights in state/ already
            # a stock checkpoint: the state dict leaves the cross tokens out (they are in their own file)
            loop.unwrapped().save_pretrained(out / "model", safe_serialization=True)
            for part in model_parts:
                part.save_pretrained(out / "model")

    seconds = loop.fit(lambda _: repeat_epochs(lambda: data.batches(batch_size, g)), loss_fn, on_save=save)
    log["loss"] = [[entry["task"], entry["cross"]] for entry in loop.history]
    log["train_seconds"] = seconds
    model = loop.unwrapped().eval()
    if loop.acc.is_main_process:
        (out / "training.json").write_text(json.dumps(log, indent=2))
    return model, log


__all__ = ["BaseModelConfig", "PairData", "base_processor", "pair_data", "train_base", "train_cross_tokens"]


def base_processor(captions: list[str], image_size: int):
    """A ``CLIPProcessor`` for the default model: word tokenizer over ``captions`` and a
    PIL image processor at ``image_size`` (no torchvision needed)."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from crossget.tools.data.tokenizer import build_word_tokenizer

    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=images, tokenizer=build_word_tokenizer(captions))


def pair_data(split, processor, max_length: int, progress: bool = True) -> PairData:
    """:class:`PairData` of a :class:`~crossget.tools.data.karpathy.RetrievalSplit`."""
    from crossget.tools.data.karpathy import preprocess

    t = preprocess(split, processor, max_length, progress=progress)
    targets = None
    if split.scenes is not None:
        from crossget.tools.data.shapes import scene_targets

        targets = torch.from_numpy(scene_targets(split.scenes))
    return PairData(t["pixel_values"], t["input_ids"], t["attention_mask"], split.txt2img, split.families, targets)
