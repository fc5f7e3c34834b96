"""LLaVA-1.5 evaluation in LLaVA's own local file formats, for HF ``LlavaForConditionalGeneration``.

- :mod:`.data`: question files (VQAv2/GQA/TextVQA JSONL, ScienceQA JSON, MMBench TSV, POPE) and
  ground truth.
- :mod:`.metrics`: VQAv2 accuracy (the official normalisation of :mod:`crossget.tools.eval.vqa`),
  TextVQA accuracy, GQA exact match, option letters, POPE.
- :mod:`.generate`: LLaVA-1.5 prompts, left-padded greedy batches, GFLOPs and throughput,
  LLaVA's answers JSONL.
- :mod:`.tasks`: the three tasks end to end (:func:`evaluate_llava`).
- :mod:`.arch`: FLOPs of the real LLaVA-1.5-7B/13B without weights (:func:`llava_flops`).
"""

from crossget.tools.eval.llava.arch import LLAVA15_SIZES, llava15_config, llava_flops
from crossget.tools.eval.llava.data import (
    MC_PROMPT,
    SHORT_ANSWER,
    QuestionSet,
    Sample,
    VQAAnnotations,
    load_image,
    load_mmbench,
    load_pope,
    load_science_qa,
    load_vqa_annotations,
    load_vqa_questions,
)
from crossget.tools.eval.llava.generate import GenerationResult, build_prompt, generate_answers, write_answers
from crossget.tools.eval.llava.metrics import (
    gqa_normalize,
    normalize_answer,
    parse_choice,
    pope_metrics,
    pope_yes_no,
    textvqa_accuracy,
    textvqa_normalize,
    vqa_accuracy,
)
from crossget.tools.eval.llava.tasks import (
    METHODS,
    TASKS,
    evaluate_llava,
    load_llava,
    load_task,
    patch_llava,
    run_llava_eval,
    score_mc,
    score_pope,
    score_vqa,
)

__all__ = [
    "LLAVA15_SIZES",
    "MC_PROMPT",
    "METHODS",
    "SHORT_ANSWER",
    "TASKS",
    "GenerationResult",
    "QuestionSet",
    "Sample",
    "VQAAnnotations",
    "build_prompt",
    "evaluate_llava",
    "generate_answers",
    "gqa_normalize",
    "llava15_config",
    "llava_flops",
    "load_image",
    "load_llava",
    "load_mmbench",
    "load_pope",
    "load_science_qa",
    "load_task",
    "load_vqa_annotations",
    "load_vqa_questions",
    "normalize_answer",
    "parse_choice",
    "patch_llava",
    "run_llava_eval",
    "pope_metrics",
    "pope_yes_no",
    "score_mc",
    "score_pope",
    "score_vqa",
    "textvqa_accuracy",
    "textvqa_normalize",
    "vqa_accuracy",
    "write_answers",
]
