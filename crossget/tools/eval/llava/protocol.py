"""The evaluation protocol a result was produced under, recorded in every result of the
``llava-*`` harnesses (the one written in docs/protocol.md).

:func:`protocol_block` is the only place the block is written: every task's result row
carries it as ``"protocol"``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from crossget.api import config, is_patched
from crossget.families.registry import family_of
from crossget.families.visual_site import LM_METHODS
from crossget.methods import fastv
from crossget.tools.eval.llava.prompts import image_settings, template_name

__all__ = ["PROTOCOL_VERSION", "SCORING", "protocol_block"]

PROTOCOL_VERSION = "crossget-mllm-eval/1"

# how each task / dataset is scored (docs/protocol.md, "Scoring")
SCORING = {
    "vqa:vqa": "VQAv2 accuracy: min(1, #humans/3) averaged over the 10 leave-one-out subsets, official normalisation",
    "vqa:textvqa": "TextVQA accuracy: the VQA rule with TextVQA's (m4c) answer normalisation",
    "vqa:exact": "GQA exact match: prediction stripped, trailing period dropped, lower-cased, equal to the answer",
    "vqa:none": "no annotations: answers written, nothing scored",
    "mc:science_qa": "ScienceQA-IMG: the option letter parsed from the answer (LLaVA's rule) equals the answer",
    "mc:mmbench": "MMBench: option letter (or exact option text); circular: right in every rotation of the options",
    "pope": "POPE: yes/no from the first sentence (LLaVA's eval_pope); accuracy, precision, recall, F1 (headline), "
            "yes-ratio per category, mean over categories",
    "mme": "MME (official calculation.py): per subtask acc (% questions) + acc+ (% images with both right); "
           "perception = sum of 10 subtasks, cognition = sum of 4",
}


def _scoring(task: str, dataset: str, metric: str | None) -> str:
    if task == "vqa":
        return SCORING[f"vqa:{metric or 'none'}"]
    if task == "mc":
        return SCORING["mc:mmbench" if dataset == "mmbench" else "mc:science_qa"]
    return SCORING[task]


def _budget(model: nn.Module) -> dict[str, Any]:
    """Method and budget as the model is patched now (``crossget.config``); ``keep`` counts visual
    tokens per image reaching the LM, for FastV / DART from layer ``fastv_layer`` on."""
    if not is_patched(model) or config(model).method == "none":
        return {"method": "none", "keep": None, "r": None, "flops": None, "fastv_layer": None, "site": None}
    cfg = config(model)
    saved = cfg.to_dict()  # JSON form (schedules as lists)
    in_lm = cfg.method in LM_METHODS
    return {
        "method": cfg.method, "keep": cfg.keep, "r": saved.get("r"), "flops": cfg.flops,
        "flops_estimate": cfg.flops_estimate,
        "fastv_layer": (cfg.fastv_layer if cfg.fastv_layer is not None else fastv.DEFAULT_LAYER) if in_lm else None,
        "site": "language model, before layer K" if in_lm else cfg.site,
    }


def protocol_block(
    task: str,
    model: nn.Module,
    processor: Any,
    *,
    dataset: str,
    suffix: str | None,
    max_new_tokens: int,
    batch_size: int,
    pad_square: bool | None,
    metric: str | None = None,
    circular: bool = False,
    flops_batches: int = 1,
) -> dict[str, Any]:
    """The settings that define a result: protocol version, task and scoring rule, the model
    family, prompt template and instruction suffix, decoding, image preprocessing, the method
    and budget the model runs, and how cost is counted (see docs/protocol.md)."""
    return {
        "version": PROTOCOL_VERSION,
        "doc": "docs/protocol.md",
        "task": task,
        "dataset": dataset,
        "family": family_of(model).name,
        "prompt": {"template": template_name(processor), "suffix": suffix,
                   "turn": "one user turn: the image, then the question (+ suffix); the assistant's cue"},
        "decoding": {"strategy": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens,
                     "batch_size": batch_size, "padding": "left", "stop": "EOS"},
        "image": image_settings(processor, pad_square),
        "scoring": _scoring(task, dataset, metric) + (" (circular)" if circular else ""),
        "budget": _budget(model),
        "cost": {"flops": f"FlopCounterMode over the first {flops_batches} batch(es), per question",
                 "time": "ModelClock around generate, the other batches"},
    }
