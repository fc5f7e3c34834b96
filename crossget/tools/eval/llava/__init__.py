"""Multimodal-LLM evaluation in LLaVA's own local file formats, one protocol (docs/protocol.md)
for every family: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL.

- :mod:`.models`: loading a model folder of any of these families, patching it through ``crossget``.
- :mod:`.data`: question files (VQAv2/GQA/TextVQA JSONL, ScienceQA JSON, MMBench TSV, POPE, the
  MME folder) and ground truth.
- :mod:`.metrics`: VQAv2 accuracy (the official normalisation of :mod:`crossget.tools.eval.vqa`),
  TextVQA accuracy, GQA exact match, option letters, POPE, MME.
- :mod:`.prompts`: each family's prompt and image preprocessing.
- :mod:`.generate`: left-padded greedy batches, GFLOPs, visual tokens and throughput, LLaVA's answers JSONL.
- :mod:`.protocol`: the protocol block every result records.
- :mod:`.tasks`: the four tasks end to end (:func:`evaluate_llava`).
- :mod:`.arch`: FLOPs of the real LLaVA-1.5-7B/13B without weights (:func:`llava_flops`).
"""

from crossget.tools.eval.llava.arch import LLAVA15_SIZES, llava15_config, llava_flops
from crossget.tools.eval.llava.data import (
    MC_PROMPT,
    MME_COGNITION,
    MME_PERCEPTION,
    SHORT_ANSWER,
    QuestionSet,
    Sample,
    VQAAnnotations,
    load_image,
    load_mmbench,
    load_mme,
    load_pope,
    load_science_qa,
    load_vqa_annotations,
    load_vqa_questions,
)
from crossget.tools.eval.llava.generate import GenerationResult, build_prompt, generate_answers, write_answers
from crossget.tools.eval.llava.metrics import (
    gqa_normalize,
    mme_scores,
    mme_yes_no,
    normalize_answer,
    parse_choice,
    pope_metrics,
    pope_yes_no,
    textvqa_accuracy,
    textvqa_normalize,
    vqa_accuracy,
)
from crossget.tools.eval.llava.models import MLLM_FAMILIES, family_methods, folder_family, load_mllm, patch_mllm
from crossget.tools.eval.llava.prompts import FALLBACK_TEMPLATES, template_name
from crossget.tools.eval.llava.protocol import PROTOCOL_VERSION, protocol_block
from crossget.tools.eval.llava.tasks import (
    METHODS,
    TASKS,
    evaluate_llava,
    load_llava,
    load_task,
    patch_llava,
    run_llava_eval,
    score_mc,
    score_mme,
    score_pope,
    score_vqa,
    write_mme_results,
)

__all__ = [
    "FALLBACK_TEMPLATES",
    "LLAVA15_SIZES",
    "MC_PROMPT",
    "METHODS",
    "MLLM_FAMILIES",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "PROTOCOL_VERSION",
    "SHORT_ANSWER",
    "TASKS",
    "GenerationResult",
    "QuestionSet",
    "Sample",
    "VQAAnnotations",
    "build_prompt",
    "evaluate_llava",
    "family_methods",
    "folder_family",
    "generate_answers",
    "gqa_normalize",
    "llava15_config",
    "llava_flops",
    "load_image",
    "load_llava",
    "load_mllm",
    "load_mmbench",
    "load_mme",
    "load_pope",
    "load_science_qa",
    "load_task",
    "load_vqa_annotations",
    "load_vqa_questions",
    "mme_scores",
    "mme_yes_no",
    "normalize_answer",
    "parse_choice",
    "patch_llava",
    "patch_mllm",
    "run_llava_eval",
    "pope_metrics",
    "pope_yes_no",
    "protocol_block",
    "score_mc",
    "score_mme",
    "score_pope",
    "score_vqa",
    "textvqa_accuracy",
    "template_name",
    "textvqa_normalize",
    "vqa_accuracy",
    "write_answers",
    "write_mme_results",
]
