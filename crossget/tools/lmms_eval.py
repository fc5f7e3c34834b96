"""An lmms-eval model backed by any multimodal LLM crossget patches (docs/lmms-eval.md).

``lmms-eval --model crossget --model_args pretrained=DIR,method=visionzip,keep=64 --tasks ...``
(or ``crossget lmms-eval ...``) loads the Hugging Face folder ``DIR`` (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL), patches it with ``crossget.patch``, adapts its processor
to the reduced placeholder count, and answers lmms-eval's requests in batches: prompts through
the processor's chat template, left padding, greedy unless the task asks otherwise, answers cut
at the task's ``until`` strings.

What needs no lmms-eval (argument parsing, batch planning, prompts, generation, scoring) works
without it; :class:`CrossgetLMM` then is a plain class with lmms-eval's methods. With lmms-eval
installed (the ``crossget[lmms]`` extra) it subclasses ``lmms_eval.api.model.lmms`` and is found
through the ``lmms_eval.models`` entry point (:func:`model_manifest`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import crossget
from crossget.config import METHODS
from crossget.families.visual_site import LM_METHODS
from crossget.tools.eval.llava.prompts import build_prompt

try:  # the base class only where lmms-eval is installed: the rest runs without it
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms as LMMS_BASE
except ImportError:
    LMMS_BASE, GenerationResult = object, None

MODEL_NAME = "crossget"  # --model crossget
CLASS_PATH = "crossget.tools.lmms_eval.CrossgetLMM"
INSTALL_HINT = "pip install 'crossget[lmms]'"
DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: bfloat16 on CUDA, float32 on CPU
# lmms-eval 0.7.3's tasks with output_type generate_until_multi_round: mmsearch, ovobench
MULTI_ROUND_MESSAGE = (
    "crossget's lmms-eval model does not run generate_until_multi_round (tasks with output_type "
    "generate_until_multi_round: mmsearch, ovobench); generate_until and loglikelihood / "
    "multiple_choice tasks run"
)
IMAGE_PLACEHOLDER = "<image>"  # what lmms-eval's contexts may hold where an image goes


@dataclass(frozen=True)
class ModelArgs:
    """What ``--model_args`` say, checked.

    ``method`` / ``keep`` / ``flops`` / ``r`` / ``fastv_layer`` / ``contextual`` / ``site`` /
    ``importance`` / ``guidance`` go to :func:`crossget.patch` (those given); ``method="none"``
    with no budget runs the stock model. ``max_new_tokens`` is the default for tasks that set
    none.
    """

    pretrained: str | None = None
    method: str = "none"
    keep: int | None = None
    flops: float | None = None
    r: int | None = None
    fastv_layer: int | None = None
    contextual: int | None = None
    site: str | None = None
    importance: str | None = None
    guidance: str | None = None
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 1
    attn_implementation: str | None = None
    max_new_tokens: int = 128

    def patch_kwargs(self) -> dict[str, Any]:
        """The :func:`crossget.patch` keywords (``method`` and the options given)."""
        names = ("keep", "flops", "r", "fastv_layer", "contextual", "site", "importance", "guidance")
        return {"method": self.method, **{k: getattr(self, k) for k in names if getattr(self, k) is not None}}

    @property
    def patched(self) -> bool:
        return self.method != "none" or any(v is not None for k, v in self.patch_kwargs().items() if k != "method")


# lmms-eval passes these to every model (from --batch_size / --device); max_batch_size is unused here
IGNORED_ARGS = ("max_batch_size",)


def parse_model_args(args: str | Mapping[str, Any]) -> ModelArgs:
    """``--model_args`` (``"pretrained=DIR,method=tome,keep=64"`` or a dict; values as strings or
    as lmms-eval already converted them) into :class:`ModelArgs`.

    Raises:
        ValueError: an unknown key (the known ones are named), a malformed ``key=value``, a value
            of the wrong type or range, an unknown method or dtype, both ``keep`` and ``flops``.
    """
    if isinstance(args, str):
        items = {}
        for part in (p.strip() for p in args.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"model_args: {part!r} is not key=value")
            items[key.strip()] = value.strip()
        args = items
    known = {f.name: f for f in fields(ModelArgs)}
    unknown = sorted(set(args) - set(known) - set(IGNORED_ARGS))
    if unknown:
        raise ValueError(f"model_args: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    for key, value in args.items():
        if key in IGNORED_ARGS or value is None:
            continue
        values[key] = _convert(key, value, known[key].type)
    parsed = ModelArgs(**values)
    if parsed.method not in METHODS:
        raise ValueError(f"model_args: method must be one of {', '.join(METHODS)}, got {parsed.method!r}")
    if parsed.dtype not in DTYPES:
        raise ValueError(f"model_args: dtype must be one of {', '.join(DTYPES)}, got {parsed.dtype!r}")
    if parsed.keep is not None and parsed.flops is not None:
        raise ValueError("model_args: give keep or flops, not both")
    if parsed.method != "none" and parsed.keep is None and parsed.flops is None and parsed.r is None:
        raise ValueError(f"model_args: method={parsed.method} needs a budget: keep=N, flops=F or r=N")
    for key in ("keep", "r", "batch_size", "max_new_tokens", "fastv_layer", "contextual"):
        value = getattr(parsed, key)
        low = 0 if key in ("r", "fastv_layer", "contextual") else 1
        if value is not None and value < low:
            raise ValueError(f"model_args: {key} must be at least {low}, got {value}")
    if parsed.flops is not None and not 0 < parsed.flops <= 1:
        raise ValueError(f"model_args: flops must be in (0, 1], got {parsed.flops}")
    return parsed


def _convert(key: str, value: Any, kind: str) -> Any:
    """``value`` as the field's type (``kind``, the annotation's text): ints stay exact."""
    text = str(value).strip()
    if "int" in kind:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"model_args: {key} must be an int, got {value!r}")
        try:
            return int(value) if isinstance(value, (int, float)) else int(text)
        except ValueError:
            raise ValueError(f"model_args: {key} must be an int, got {value!r}") from None
    if "float" in kind:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except ValueError:
            number = math.nan
        if math.isnan(number):
            raise ValueError(f"model_args: {key} must be a number, got {value!r}")
        return number
    return text


# --------------------------------------------------------------------------- requests and batches
@dataclass(frozen=True)
class GenerationRequest:
    """One ``generate_until`` request: ``Instance.args`` of a simple model,
    ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""

    context: str
    generation_kwargs: Mapping[str, Any]
    doc_to_visual: Callable[[Any], Any] | None
    doc_id: Any
    task: str
    split: str

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> GenerationRequest:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return cls(context, dict(gen_kwargs or {}), doc_to_visual, doc_id, task, split)


def generation_key(gen_kwargs: Mapping[str, Any]) -> str:
    """Requests with equal keys run in one batch (lmms-eval groups by generation kwargs too)."""
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def plan_batches(keys: Sequence[str], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of at most ``batch_size``: each batch shares one key; within a
    key, longest first (the first batch shows the largest padded size, and rows of similar length
    share a batch). Every index appears exactly once.

    Raises:
        ValueError: ``keys`` and ``lengths`` differ in length, or ``batch_size`` < 1.
    """
    if len(keys) != len(lengths):
        raise ValueError(f"{len(keys)} keys for {len(lengths)} lengths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -lengths[i])  # stable: ties keep request order
        batches += [members[s:s + batch_size] for s in range(0, len(members), batch_size)]
    return batches


def stop_strings(gen_kwargs: Mapping[str, Any]) -> list[str]:
    """The task's ``until`` as a list (absent: none; the end-of-sequence token ends generation).

    Raises:
        ValueError: ``until`` is neither a string nor a list of strings.
    """
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        return [u for u in until if u]
    raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``until``."""
    end = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:end]


def generate_settings(gen_kwargs: Mapping[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """``model.generate`` keywords for a task's generation kwargs: greedy unless it samples
    (``temperature`` > 0 or ``do_sample``), ``num_beams`` and ``max_new_tokens`` as given."""
    temperature = float(gen_kwargs.get("temperature") or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    settings = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or max_new_tokens),
                "num_beams": int(gen_kwargs.get("num_beams") or 1), "do_sample": sample}
    if sample:
        settings["temperature"] = temperature or 1.0
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings


def as_images(visuals: Any) -> list[Any]:
    """What ``doc_to_visual`` returned, as a flat list of images (None: none).

    Raises:
        TypeError: a video (a path) or anything else that is not an image.
    """
    if visuals is None:
        return []
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out += as_images(v)
        elif hasattr(v, "convert") and hasattr(v, "size"):  # PIL.Image.Image
            out.append(v.convert("RGB"))
        else:
            raise TypeError(f"crossget's lmms-eval model takes images only, got {type(v).__name__} ({v!r:.80})")
    return out


# --------------------------------------------------------------------------- the model
def load_model(args: ModelArgs) -> tuple[nn.Module, Any]:
    """``(model, processor)`` from ``args.pretrained``, in eval mode on ``args.device``: a local
    folder through the harnesses' loader (``crossget.tools.eval.llava.load_mllm``: the family's
    class, an images-only processor where its video processor needs the missing torchvision);
    a hub name is downloaded first (``huggingface_hub.snapshot_download``).

    Raises:
        ValueError: no ``pretrained`` given.
        FileNotFoundError, TypeError: not a model folder, or not a supported family.
    """
    from crossget.tools.eval.llava import load_mllm

    if not args.pretrained:
        raise ValueError("model_args: pretrained=DIR (a Hugging Face model folder or name) is required")
    path = Path(args.pretrained)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", args.pretrained):  # owner/name
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(args.pretrained))
    device = default_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model, processor = load_mllm(path, str(device), dtype)
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    return model, processor


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class CrossgetLMM(LMMS_BASE):
    """lmms-eval's model interface over a crossget-patched multimodal LLM.

    ``CrossgetLMM(pretrained=DIR, method=..., keep=N, ...)`` (the :class:`ModelArgs` keys; what
    lmms-eval calls with ``--model_args``), or ``CrossgetLMM(model=m, processor=p, ...)`` over
    objects already loaded (patched here as the args say). Single process, one device.
    """

    is_simple = True  # lmms-eval sends (context, kwargs, doc_to_visual, doc_id, task, split) requests
    chat_template = None  # the prompts are templated here, with the processor's own template

    def __init__(self, pretrained: str | None = None, *, model: nn.Module | None = None, processor: Any = None,
                 **model_args: Any) -> None:
        super().__init__()
        self.args = parse_model_args({"pretrained": pretrained, **model_args})
        if model is None:
            model, processor = load_model(self.args)
        elif processor is None:
            raise ValueError("CrossgetLMM(model=...) needs its processor=")
        if self.args.patched:
            crossget.patch(model, **self.args.patch_kwargs())
            crossget.adapt_processor(processor, model)
        elif crossget.is_patched(model):  # the args say stock: a model handed in patched is unpatched
            crossget.apply(model, None)
            crossget.adapt_processor(processor, model)
        self._model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # every row's answer starts at the same position
        self._device = next(model.parameters()).device
        self.batch_size = self.args.batch_size
        self.task_dict: dict = getattr(self, "task_dict", {})
        self._rank, self._world_size = 0, 1

    @classmethod
    def create_from_arg_string(cls, arg_string: str | Mapping[str, Any],
                               additional_config: Mapping[str, Any] | None = None) -> CrossgetLMM:
        """lmms-eval's constructor: ``--model_args`` win over ``--batch_size`` / ``--device``
        (which lmms-eval always passes), so ``batch_size=`` in the model args works."""
        given = parse_arg_string(arg_string) if isinstance(arg_string, str) else dict(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in given}
        return cls(**given, **extra)

    # lmms-eval reads these
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ----------------------------------------------------------------------- prompts and inputs
    def prompt(self, context: str, n_images: int, answer: str | None = None) -> str:
        """The family's prompt for ``context`` with ``n_images`` images first: the processor's
        chat template (user turn, generation prompt; ``answer`` appended for scoring), else for
        one image the harnesses' family template (:func:`crossget.tools.eval.llava.prompts.build_prompt`,
        docs/protocol.md), else ``<image>`` placeholders and the context."""
        text = context.replace(IMAGE_PLACEHOLDER, "").strip()
        if not getattr(self.processor, "chat_template", None) and n_images == 1:
            prompt = build_prompt(self.processor, text)
        elif getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True, tokenize=False)
        else:
            token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
            prompt = "".join(f"{token}\n" for _ in range(n_images)) + text
        return prompt if answer is None else prompt + answer

    def inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> Mapping[str, torch.Tensor]:
        """The processor's left-padded batch (every output: ``input_ids`` ``[B, T]``, pixels,
        ``image_sizes`` / ``image_grid_thw``, ...) on the model's device."""
        flat = [im for row in images for im in row]
        kw = {"images": flat} if flat else {}
        batch = self.processor(text=list(prompts), padding=True, return_tensors="pt", **kw)
        dtype = next(self._model.parameters()).dtype
        return {k: (v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def visuals(self, request: GenerationRequest) -> list[Any]:
        if request.doc_to_visual is None:
            return []
        return as_images(request.doc_to_visual(self.task_dict[request.task][request.split][request.doc_id]))

    # ----------------------------------------------------------------------- lmms-eval's requests
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request, in request order: batches of ``batch_size`` requests sharing
        generation kwargs, longest prompt first; each answer cut at the task's ``until``."""
        reqs = [GenerationRequest.from_args(r.args if hasattr(r, "args") else r) for r in requests]
        batches = plan_batches([generation_key(r.generation_kwargs) for r in reqs],
                               [len(r.context) for r in reqs], self.batch_size)
        answers: list[str | None] = [None] * len(reqs)
        for batch in tqdm(batches, desc="crossget generate_until", disable=len(batches) < 2):
            texts = self.generate_batch([reqs[i] for i in batch])
            for i, text in zip(batch, texts):
                answers[i] = text
        return answers

    def generate_batch(self, reqs: Sequence[GenerationRequest]) -> list[str]:
        """Answers of requests that share generation kwargs, generated as one padded batch
        (FastV / DART: one batch per image-size signature, as they rank one count per batch)."""
        images = [self.visuals(r) for r in reqs]
        if self.args.method not in LM_METHODS:
            return self.generate_rows(reqs, images)
        by_size: dict[tuple, list[int]] = {}
        for i, row in enumerate(images):
            by_size.setdefault(tuple(im.size for im in row), []).append(i)
        answers: list[str] = [""] * len(reqs)
        for rows in by_size.values():
            for i, text in zip(rows, self.generate_rows([reqs[i] for i in rows], [images[i] for i in rows])):
                answers[i] = text
        return answers

    def generate_rows(self, reqs: Sequence[GenerationRequest], images: Sequence[Sequence[Any]]) -> list[str]:
        """``reqs`` (with their ``images``) as one left-padded ``generate`` call, answers cut at ``until``."""
        gen_kwargs = reqs[0].generation_kwargs
        until = stop_strings(gen_kwargs)
        x = self.inputs([self.prompt(r.context, len(im)) for r, im in zip(reqs, images)], images)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self._model.generate(**x, **generate_settings(gen_kwargs, self.args.max_new_tokens),
                                       pad_token_id=pad)
        texts = self.tokenizer.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at(t, until) for t in texts]

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """lmms-eval's loglikelihood: :meth:`score_continuations`, each pair wrapped where
        lmms-eval is installed. lmms-eval 0.7.3 passes every model output through
        ``unwrap_generation_output``, which turns a ``(float, bool)`` pair into its ``str`` (and
        breaks its own multiple-choice scoring) but hands a ``GenerationResult``'s ``text`` on
        as it is: the pair goes in there."""
        scores = self.score_continuations(requests)
        if GenerationResult is None:
            return scores
        return [GenerationResult(text=pair) for pair in scores]

    def score_continuations(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context, images), continuation is the greedy one)`` per request
        (``Instance.args``: ``(context, continuation or doc_to_target, doc_to_visual, doc_id,
        task, split)``), one forward each. The continuation's tokens are those the full prompt
        adds to the context's prompt.

        Raises:
            NotImplementedError: FastV / DART, which rank the visual tokens by the prompt's last
                token: in one forward over context + continuation that would be the
                continuation's, not what generation with the same setting ranks by.
        """
        if self.args.method in ("fastv", "dart"):
            raise NotImplementedError(f"loglikelihood with method={self.args.method!r}: its pruning ranks by the "
                                      "prompt's last token, which a scoring forward over context + continuation "
                                      "would change; use a generate_until task, or another method")
        out = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args if hasattr(r, "args") else r
            doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
            continuation = target if isinstance(target, str) else target(doc)
            images = as_images(doc_to_visual(doc)) if doc_to_visual is not None else []
            start = self.inputs([self.prompt(context, len(images))], [images])["input_ids"].shape[1]
            x = self.inputs([self.prompt(context, len(images), continuation)], [images])
            with torch.inference_mode():
                logits = self._model(**x).logits[0, start - 1:-1].float()
            targets = x["input_ids"][0, start:]
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
            out.append((float(logp.sum()), bool((logits.argmax(-1) == targets).all())))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(MULTI_ROUND_MESSAGE)


def parse_arg_string(arg_string: str) -> dict[str, str]:
    """``"a=1,b=x"`` as ``{"a": "1", "b": "x"}`` (values checked later by :func:`parse_model_args`)."""
    parse_model_args(arg_string)  # the errors come from one place
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in arg_string.split(",") if p.strip())}


def model_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest of ``--model crossget``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model crossget`` known to the lmms-eval in this process (what the entry point
    does where crossget's metadata is installed).

    Raises:
        ImportError: lmms-eval is not installed (the message says how to install it).
    """
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError as e:
        raise ImportError(f"lmms-eval is not installed: {INSTALL_HINT} ({e})") from e
    MODEL_REGISTRY_V2.register_manifest(model_manifest(), overwrite=True)


__all__ = ["CLASS_PATH", "INSTALL_HINT", "MODEL_NAME", "CrossgetLMM", "GenerationRequest", "ModelArgs", "as_images",
           "cut_at", "generate_settings", "generation_key", "load_model", "model_manifest", "parse_model_args",
           "plan_batches", "register", "stop_strings"]
