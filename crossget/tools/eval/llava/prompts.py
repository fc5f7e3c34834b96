"""Prompts and image preprocessing per model family, for the ``llava-*`` harnesses (docs/protocol.md).

A prompt is one user turn holding the image then the question, and the assistant's cue,
written by the processor's own chat template when it has one (every released checkpoint
ships one), else by the family's template below (the text those chat templates write):

- ``llava-1.5`` (``LlavaProcessor``, llava-hf's LLaVA-1.5): ``USER: <image>\\n{q} ASSISTANT:``
- ``llava-next`` (``LlavaNextProcessor``; the Vicuna checkpoints' form): the same
- ``llava-onevision`` (``LlavaOnevisionProcessor``, Qwen2 chat):
  ``<|im_start|>user <image>\\n{q}<|im_end|><|im_start|>assistant\\n``
- ``qwen2.5-vl`` (``Qwen2_5_VLProcessor``): the default system turn, then
  ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\\n<|im_start|>assistant\\n``
- ``qwen3-vl`` (``Qwen3VLProcessor``): the same user turn, no system turn

Images go through the family's own processor (anyres tiles, Qwen's dynamic resolution);
``pad_square`` pads each image to a square of the processor's mean colour first, as
LLaVA-1.5's ``image_aspect_ratio="pad"`` does (``do_pad`` of LLaVA-1.5's image processor; the
other families' ``do_pad`` means something else, so their images are padded here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = ["FALLBACK_TEMPLATES", "build_prompt", "fallback_template", "image_settings", "pad_to_square",
           "prepare_images", "template_name"]

_QWEN_USER = "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
FALLBACK_TEMPLATES: dict[str, str] = {
    "llava-1.5": "USER: {image}\n{question} ASSISTANT:",
    "llava-next": "USER: {image}\n{question} ASSISTANT:",
    "llava-onevision": "<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n",
    "qwen2.5-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + _QWEN_USER,
    "qwen3-vl": _QWEN_USER,
}
# processor class name -> its family's template (checked along the class's MRO: the harness's
# images-only processors are subclasses of the same name)
_TEMPLATE_OF = {
    "LlavaProcessor": "llava-1.5",
    "LlavaNextProcessor": "llava-next",
    "LlavaOnevisionProcessor": "llava-onevision",
    "Qwen2_5_VLProcessor": "qwen2.5-vl",
    "Qwen3VLProcessor": "qwen3-vl",
}


def fallback_template(processor: Any) -> str:
    """The name of the family template (:data:`FALLBACK_TEMPLATES`) for ``processor``'s class;
    ``"llava-1.5"`` for a class not listed."""
    for cls in type(processor).__mro__:
        if cls.__name__ in _TEMPLATE_OF:
            return _TEMPLATE_OF[cls.__name__]
    return "llava-1.5"


def template_name(processor: Any) -> str:
    """What writes the prompts: ``"chat_template"`` (the processor's own) or the family template's name."""
    return "chat_template" if getattr(processor, "chat_template", None) else fallback_template(processor)


def build_prompt(processor: Any, question: str) -> str:
    """One user turn with the image, then the assistant's cue (LLaVA-1.5: ``USER: <image>\\n{q} ASSISTANT:``).

    Uses ``processor.apply_chat_template`` when the processor has a chat template (the released
    checkpoints ship theirs), else the family's template with the processor's image token.
    """
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    image = getattr(processor, "image_token", None) or "<image>"
    return FALLBACK_TEMPLATES[fallback_template(processor)].format(image=image, question=question)


def _pads_square(processor: Any) -> bool:
    """True for LLaVA-1.5's processor, whose image processor's ``do_pad`` pads to a square."""
    return fallback_template(processor) == "llava-1.5" and hasattr(processor.image_processor, "pad_to_square")


def pad_to_square(image: Any, fill: Sequence[int]) -> Any:
    """A PIL image pasted centred on a square of colour ``fill`` (LLaVA's ``expand2square``)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(fill))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def prepare_images(processor: Any, images: list[Any], pad_square: bool | None) -> tuple[list[Any], dict[str, Any]]:
    """``(images, processor keyword arguments)`` for one batch: the family's own processing;
    ``pad_square`` True / False forces LLaVA's square padding on / off (None: the processor's setting)."""
    if pad_square is None:
        return images, {}
    if _pads_square(processor):
        return images, {"do_pad": pad_square}
    if not pad_square:
        return images, {}
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    fill = [int(255 * m) for m in mean]  # truncated, as LLaVA's expand2square (and do_pad) take it
    return [pad_to_square(im, fill) for im in images], {}


_IMAGE_KEYS = ("size", "crop_size", "image_grid_pinpoints", "do_pad", "do_center_crop", "vision_aspect_ratio",
               "min_pixels", "max_pixels", "patch_size", "merge_size", "resample", "image_mean", "image_std")


def image_settings(processor: Any, pad_square: bool | None) -> dict[str, Any]:
    """The image preprocessing a result used: the image processor's class and the settings
    that decide what the model sees (sizes, anyres grid, Qwen's pixel bounds), and ``pad_square``."""
    ip = getattr(processor, "image_processor", None)
    out: dict[str, Any] = {"processor": type(processor).__name__, "image_processor": type(ip).__name__,
                           "pad_square": pad_square}
    for key in _IMAGE_KEYS:
        value = getattr(ip, key, None)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):  # transformers' SizeDict
            value = dataclasses.asdict(value)
        if hasattr(value, "items"):
            value = {k: v for k, v in value.items() if v is not None}
        elif hasattr(value, "__iter__") and not isinstance(value, str):
            value = list(value)
        elif not isinstance(value, (int, float, bool, str)):
            value = str(value)
        out[key] = value
    for key in ("vision_aspect_ratio", "num_image_tokens"):  # OneVision's processor-level settings
        if getattr(processor, key, None) is not None:
            out[key] = getattr(processor, key)
    return out
