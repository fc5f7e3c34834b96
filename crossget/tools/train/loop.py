"""The training loop every training command runs: CLIP from scratch, cross tokens, BLIP, LLaVA.

:class:`TrainLoop` holds what they share: the model and optimizer through ``accelerate`` (one
CPU, or several GPUs under ``accelerate launch``), the :func:`~crossget.tools.train.common.cosine_lr`
schedule, the gradient steps (with optional clipping), the mean of every logged value over
windows of steps, a time limit, a progress bar that stays readable in a log file, and
checkpoint / resume in one of two on-disk formats (:class:`AccelerateCheckpoint`,
:class:`TrainableCheckpoint`). A command gives it its batches and a loss function and keeps
only what is its own: data, loss, what it saves, the keys of its log.

Use::

    loop = TrainLoop(model, optimizer, steps, warmup=steps // 20, checkpoint=AccelerateCheckpoint(out))
    done = loop.resume()                        # 0 without a checkpoint
    loop.fit(lambda done: my_batches(done), lambda model, batch, step: (loss, {"loss": loss}))
    loop.history                                # [{"step", <logged means>, "lr", "seconds"}, ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from crossget.api import is_patched, states
from crossget.tools.train.common import accelerator, cosine_lr

Batch = dict[str, torch.Tensor]
# a step's logged values: tensors (read with .item() after the step) or floats; None where a value is absent
Logs = dict[str, "torch.Tensor | float | None"]
LossFn = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, Logs]]
RESERVED = frozenset({"step", "lr", "seconds"})  # the keys a history entry adds to the logged means


def progress_bar(total: int, desc: str, disable: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; redrawn at most every 30 s when stderr is a file (a log stays short)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def repeat_epochs(epoch: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """Endless batches: ``epoch()`` anew each time the previous epoch is used up.

    Lazy, so a new epoch (and the random numbers it draws) starts only when a step asks for its
    first batch: a run that stops at an epoch's end draws nothing for the next one.

    Raises:
        ValueError: an epoch yields no batch (fewer samples than a batch), which would loop forever.
    """
    while True:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
        if empty:
            raise ValueError("an epoch gave no batch: fewer samples than one batch")


def load_named(model: nn.Module, tensors: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Copy ``tensors`` into ``model``'s parameters of the same names (a subset of them).

    Raises:
        ValueError: a name the model has not, or a shape that differs (``where`` names the file).
    """
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{where} holds {len(missing)} weights this model has not, e.g. {missing[0]!r}")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{where}: {n} is {tuple(t.shape)}, the model's is {tuple(params[n].shape)}")
            params[n].copy_(t)


# --------------------------------------------------------------------------- checkpoints
class Checkpoint(Protocol):
    """Where a :class:`TrainLoop` keeps its state between runs."""

    def saved_step(self) -> int | None:
        """The step of the checkpoint on disk, ``None`` when there is none."""

    def load(self, loop: TrainLoop) -> None:
        """Restore ``loop``'s model, optimizer and schedule."""

    def write_state(self, loop: TrainLoop) -> None:
        """Write the state; called on every process (after they all reached the step)."""

    def write_step(self, step: int) -> None:
        """Mark the checkpoint complete at ``step``; called on the main process, last."""


CROSS_TOKENS = "cross_tokens.safetensors"  # beside accelerate's state: what the model's state dict leaves out


class AccelerateCheckpoint:
    """``accelerate``'s ``save_state`` in ``folder/state`` (model, optimizer, random states, the
    schedule if there is one) and the step in ``folder/progress.json`` (``{"step": N}``): the format
    of :func:`~crossget.tools.train.clip.train_cross_tokens`."""

    def __init__(self, folder: str | os.PathLike):
        self.state, self.progress = Path(folder) / "state", Path(folder) / "progress.json"
        self._registered = False

    def saved_step(self) -> int | None:
        if self.progress.exists() and self.state.exists():
            return json.loads(self.progress.read_text())["step"]
        return None

    def _register(self, loop: TrainLoop) -> None:
        # the schedule is not prepared (see TrainLoop), so accelerate keeps it only when registered
        if loop.sched is not None and not self._registered:
            loop.acc.register_for_checkpointing(loop.sched)
            self._registered = True

    def load(self, loop: TrainLoop) -> None:
        self._register(loop)
        loop.acc.load_state(str(self.state))
        thetas = self._cross_tokens(loop)
        if thetas and (self.state / CROSS_TOKENS).exists():
            with torch.no_grad():
                for kind, value in load_file(self.state / CROSS_TOKENS).items():
                    thetas[kind].copy_(value)

    def write_state(self, loop: TrainLoop) -> None:
        self._register(loop)
        loop.acc.save_state(str(self.state))  # collective: every process calls it
        # the model's state dict leaves the cross tokens out (checkpoints stay stock): keep them here
        thetas = self._cross_tokens(loop)
        if thetas and loop.acc.is_main_process:
            save_file({k: t.detach().cpu().contiguous() for k, t in thetas.items()}, self.state / CROSS_TOKENS)

    @staticmethod
    def _cross_tokens(loop: TrainLoop) -> dict[str, torch.Tensor]:
        model = loop.unwrapped()
        if not is_patched(model):
            return {}
        return {k: s.cross_tokens for k, s in states(model).items() if s.cross_tokens is not None}

    def write_step(self, step: int) -> None:
        self.progress.write_text(json.dumps({"step": step}))


class TrainableCheckpoint:
    """In ``folder``: the trainable parameters (``trainable.safetensors``, by name), optimizer and
    schedule (``optimizer.pt``: ``{"optimizer", "scheduler"}`` state dicts) and the step
    (``progress.json``): the format of :func:`~crossget.tools.train.llava.train_llava`. Smaller than
    :class:`AccelerateCheckpoint`, which writes the whole (mostly frozen) model every time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.progress = self.folder / "progress.json"

    def saved_step(self) -> int | None:
        return json.loads(self.progress.read_text())["step"] if self.progress.is_file() else None

    def load(self, loop: TrainLoop) -> None:
        load_named(loop.acc.unwrap_model(loop.model), load_file(self.folder / "trainable.safetensors"), self.folder)
        saved = torch.load(self.folder / "optimizer.pt", map_location="cpu")
        loop.opt.load_state_dict(saved["optimizer"])
        if loop.sched is not None:
            loop.sched.load_state_dict(saved["scheduler"])

    def write_state(self, loop: TrainLoop) -> None:
        if not loop.acc.is_main_process:
            return
        self.folder.mkdir(exist_ok=True)
        named = {n: p.detach().cpu().contiguous() for n, p in loop.acc.unwrap_model(loop.model).named_parameters()
                 if p.requires_grad}
        save_file(named, os.fspath(self.folder / "trainable.safetensors"))
        sched = loop.sched.state_dict() if loop.sched is not None else None
        torch.save({"optimizer": loop.opt.state_dict(), "scheduler": sched}, self.folder / "optimizer.pt")

    def write_step(self, step: int) -> None:
        self.progress.write_text(json.dumps({"step": step}))


# --------------------------------------------------------------------------- the loop
class NonFiniteLossError(FloatingPointError, ValueError):
    """A step's loss is NaN or infinite: :meth:`TrainLoop.fit` stops before that step changes
    anything. A ``ValueError`` too, so that the ``crossget`` commands report it as an error."""


class TrainLoop:
    """``steps`` optimizer steps of ``model`` with ``optimizer``, through ``accelerate``.

    The model and optimizer are prepared here (``self.model``, ``self.opt``; ``self.acc`` is
    ``acc`` or :func:`~crossget.tools.train.common.accelerator`). ``warmup`` (steps) sets the
    learning-rate factor :func:`~crossget.tools.train.common.cosine_lr` over ``steps``; ``None``
    keeps the rate constant. ``grad_clip`` clips the gradients' total norm. A step's logged values
    are averaged over every ``log_every`` steps (and the last ones) into :attr:`history`.
    ``max_minutes`` stops the run once it has trained that long, checked every
    ``time_check_every`` steps (1: each step). With a ``checkpoint``, the state is written every
    ``checkpoint_every`` steps, at the last step and when the time is up.

    Attributes after :meth:`fit`: ``step`` (steps done, resumed ones included), ``history``,
    ``elapsed`` (seconds from the start of :meth:`fit` to the end of the last step), ``stopped``
    (the time limit ended the run).

    A step whose loss is not finite (on any process) ends :meth:`fit` with a
    :class:`NonFiniteLossError` before its backward pass: the model, the optimizer and the
    checkpoint on disk stay as the last good step left them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int,
        *,
        warmup: int | None = None,
        acc: Accelerator | None = None,
        checkpoint: Checkpoint | None = None,
        checkpoint_every: int = 1,
        max_minutes: float | None = None,
        time_check_every: int = 1,
        log_every: int = 1,
        grad_clip: float | None = None,
        progress: bool = True,
        desc: str = "train",
    ):
        self.acc = acc or accelerator()
        self.model, self.opt = self.acc.prepare(model, optimizer)
        # not prepared: accelerate would step it once per process
        self.sched = None if warmup is None else torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine_lr(s, steps, warmup))
        self.steps, self.checkpoint, self.checkpoint_every = steps, checkpoint, checkpoint_every
        self.max_minutes, self.time_check_every, self.log_every = max_minutes, time_check_every, log_every
        self.grad_clip, self.progress, self.desc = grad_clip, progress, desc
        self.step, self.elapsed, self.stopped = 0, 0.0, False
        self.history: list[dict[str, Any]] = []

    def unwrapped(self) -> nn.Module:
        """The model without accelerate's wrappers (the caller's module)."""
        return self.acc.unwrap_model(self.model)

    def resume(self) -> int:
        """Load the checkpoint if there is one; returns its step (0 without one), where :meth:`fit` goes on."""
        saved = self.checkpoint.saved_step() if self.checkpoint is not None else None
        if saved is not None:
            self.checkpoint.load(self)
            self.step = saved
        return self.step

    def fit(
        self,
        batches: Callable[[int], Iterable[Batch]],
        loss_fn: LossFn,
        *,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        on_save: Callable[[int, bool], None] | None = None,
    ) -> float:
        """Train from :attr:`step` to ``steps`` (or until the batches or the time run out).

        ``batches(first_step)`` gives the batches from that step on (dicts of ``[B, ...]`` tensors,
        moved to the device here); it is read lazily, one batch per step, so the random numbers an
        epoch draws come in the same order as in a hand-written loop. ``loss_fn(model, batch,
        step)`` gets the prepared model and the step index (0-based) and returns the loss to
        minimise (a scalar tensor) and the step's logged values (``{}`` for none).
        ``on_log(entry)`` sees each new :attr:`history` entry. ``on_save(step, final)`` writes
        what the command keeps beside a checkpoint (main process, before the step is marked
        done); ``final`` at the last step or when the time is up.

        Returns the wall time of the call in seconds.
        """
        acc = self.acc
        params = [p for group in self.opt.param_groups for p in group["params"]]
        data = iter(batches(self.step))
        window: list[dict[str, float | None]] = []
        start = time.perf_counter()
        self.model.train()
        quiet = not self.progress or not acc.is_main_process
        try:
            with progress_bar(self.steps, self.desc, quiet, initial=self.step) as bar:
                while self.step < self.steps:
                    batch = next(data, None)
                    if batch is None:
                        break
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    loss, logs = loss_fn(self.model, batch, self.step)
                    self._check_finite(loss)
                    acc.backward(loss)
                    if self.grad_clip:
                        acc.clip_grad_norm_(params, self.grad_clip)
                    self.opt.step()
                    if self.sched is not None:
                        self.sched.step()
                    self.opt.zero_grad()
                    self.step += 1
                    window.append({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in logs.items()})
                    bar.set_postfix({k: f"{v:.4f}" for k, v in window[-1].items() if v is not None}, refresh=False)
                    bar.update()
                    self.elapsed = time.perf_counter() - start
                    last = self.step == self.steps
                    self.stopped = (self.max_minutes is not None and self.step % self.time_check_every == 0
                                    and self.elapsed > 60 * self.max_minutes)
                    if self.step % self.log_every == 0 or last or self.stopped:
                        self._log(window, on_log)
                        window = []
                    if self.checkpoint is not None and (self.step % self.checkpoint_every == 0 or last or self.stopped):
                        self._save(on_save, final=last or self.stopped)
                    if self.stopped:
                        break
            if window:  # the batches ran out inside a window
                self._log(window, on_log)
        finally:
            if hasattr(data, "close"):  # a generator's data loader workers end now, not when collected
                data.close()
        return time.perf_counter() - start

    def _check_finite(self, loss: torch.Tensor) -> None:
        """:class:`NonFiniteLossError` naming the step (1-based, as in :attr:`history`) and the loss
        when ``loss`` is not finite on some process (every process stops, none waits in a collective)."""
        value = torch.as_tensor(loss).detach().float().reshape(1)
        if self.acc.num_processes > 1:
            value = self.acc.gather(value)
        bad = value[~torch.isfinite(value)]
        if bad.numel():
            saved = self.checkpoint.saved_step() if self.checkpoint is not None else None
            kept = ("no checkpoint was written" if self.checkpoint is None
                    else "there is no checkpoint yet" if saved is None
                    else f"the checkpoint of step {saved} is as it was")
            raise NonFiniteLossError(
                f"the loss of step {self.step + 1} of {self.steps} is {bad[0].item()}: training stopped before "
                f"that step changed the model; {kept} (a learning rate too high, or bad data?)"
            )

    def _log(self, window: list[dict[str, float | None]], on_log: Callable[[dict[str, Any]], None] | None) -> None:
        """Append the window's means (``None`` where a step had no value) to :attr:`history`."""
        means = {k: None if any(w[k] is None for w in window) else sum(w[k] for w in window) / len(window)
                 for k in window[0]}
        taken = sorted(RESERVED & means.keys())
        if taken:
            raise ValueError(f"a loss function may not log {taken[0]!r}: the history entry has its own")
        lr = self.sched.get_last_lr()[0] if self.sched is not None else self.opt.param_groups[0]["lr"]
        entry = {"step": self.step, **means, "lr": lr, "seconds": self.elapsed}
        self.history.append(entry)
        if on_log is not None:
            on_log(entry)

    def _save(self, on_save: Callable[[int, bool], None] | None, final: bool) -> None:
        self.acc.wait_for_everyone()
        self.checkpoint.write_state(self)
        if self.acc.is_main_process:
            if on_save is not None:
                on_save(self.step, final)
            self.checkpoint.write_step(self.step)  # last: a checkpoint is complete once its step is written


def save_trained(acc: Any, model: nn.Module, out_dir: str | os.PathLike, log: dict, *parts: Any) -> nn.Module:
    """Unwrap ``model`` (eval mode); on the main process save it (safetensors), every part
    (tokenizer, processor: anything with ``save_pretrained``) and ``log`` as ``training.json``."""
    model = acc.unwrap_model(model).eval()
    if acc.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        for part in parts:
            part.save_pretrained(out)
        (out / "training.json").write_text(json.dumps(log, indent=2))
    return model


__all__ = ["AccelerateCheckpoint", "Checkpoint", "NonFiniteLossError", "TrainLoop", "TrainableCheckpoint", "load_named",
           "progress_bar", "repeat_epochs", "save_trained"]
