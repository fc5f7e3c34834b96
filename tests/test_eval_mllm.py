"""The ``llava-*`` harnesses on LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL: tiny random models
(the families' own test builders) saved as model folders, loaded back, answered end to end
(stock and reduced), the family prompts and image preprocessing, batches against one question
at a time, the visual tokens reaching the LM, and the protocol block of every result."""

import json

import numpy as np
import pytest
import test_llava_next as next_tests
import test_llava_onevision as ov_tests
import test_qwen3_vl as qwen3_tests
import test_qwen_vl as qwen_tests
from mllm_common import word_tokenizer
from PIL import Image

import crossget
from crossget.families.registry import family_of
from crossget.tools.cli import main
from crossget.tools.eval.llava import (
    FALLBACK_TEMPLATES,
    PROTOCOL_VERSION,
    build_prompt,
    generate_answers,
    load_mllm,
    load_vqa_questions,
    patch_mllm,
    run_llava_eval,
    template_name,
)
from crossget.tools.eval.llava.prompts import prepare_images

SIZES = [(40, 30), (64, 48), (30, 50)]  # (width, height): three sizes, three stock counts per family
METHOD = {"next": "tome", "onevision": "crossget", "qwen2.5-vl": "divprune", "qwen3-vl": "tome"}  # the reduced runs
FAMILIES = {  # name: (builder, processor builder, tokens never generated, template, HF class, keep)
    "next": (next_tests.make_next, next_tests.tiny_processor, next_tests.GEN["suppress_tokens"], "llava-next",
             "LlavaNextForConditionalGeneration", 9),
    "onevision": (ov_tests.make_ov, ov_tests.tiny_processor, ov_tests.GEN["suppress_tokens"], "llava-onevision",
                  "LlavaOnevisionForConditionalGeneration", 9),
    "qwen2.5-vl": (qwen_tests.make_qwen, qwen_tests.tiny_processor, qwen_tests.GEN["suppress_tokens"], "qwen2.5-vl",
                   "Qwen2_5_VLForConditionalGeneration", 7),
    "qwen3-vl": (qwen3_tests.make_qwen3, lambda: qwen_tests.tiny_processor(qwen3_tests.ImageTextProcessor),
                 qwen_tests.GEN["suppress_tokens"], "qwen3-vl", "Qwen3VLForConditionalGeneration", 7),
}


def full_vocab(processor, size, word=lambda i: f"w{i}"):
    """The family's tiny processor with every id below ``size`` a word (``word(id)``), so that
    any generated token decodes to text; the special tokens keep their ids."""
    vocab = processor.tokenizer.get_vocab()
    special = [t for t in vocab if t.startswith("<") and t not in ("<pad>", "<s>", "</s>", "<unk>")]
    taken = set(vocab.values())
    vocab |= {word(i): i for i in range(size) if i not in taken}
    processor.tokenizer = word_tokenizer(vocab, special)
    return processor


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Model folders of the three families, three images of different sizes, a question file
    (one question per image) and VQA annotations."""
    root = tmp_path_factory.mktemp("mllm")
    (root / "images").mkdir()
    for i, (w, h) in enumerate(SIZES):
        pixels = (np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
    rows = [{"question_id": i, "image": f"img{i}.png", "text": t} for i, t in enumerate(["what is it?", "is it?", "what?"])]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ann.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "answers": [{"answer": "zebra"}] * 10} for i in range(3)]}))
    for name, (make, make_processor, suppress, *_rest) in FAMILIES.items():
        model = make()
        model.generation_config.suppress_tokens = suppress  # no image tokens in the answers
        model.save_pretrained(root / name)
        full_vocab(make_processor(), model.config.text_config.vocab_size).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request, root):
    name = request.param
    model, processor = load_mllm(root / name)
    return name, model, processor


def stock_counts(model, processor, root):
    """The stock visual tokens of each image: by its size (LLaVA), by the grid the processor
    gives it (Qwen: the tiny processors' resize bounds are not the released ones)."""
    if not hasattr(processor.image_processor, "merge_size"):
        return [crossget.image_tokens(model, (h, w)) for w, h in SIZES]
    pictures = [Image.open(root / "images" / f"img{i}.png").convert("RGB") for i in range(len(SIZES))]
    grids = processor.image_processor(images=pictures, return_tensors="pt")["image_grid_thw"]
    return [crossget.image_tokens(model, g) for g in grids]


def test_loads_every_family_with_its_processor_and_prompt(loaded):
    name, model, processor = loaded
    *_, template, cls, _ = FAMILIES[name]
    assert type(model).__name__ == cls and not model.training
    assert template_name(processor) == template  # the tiny processors ship no chat template
    prompt = build_prompt(processor, "what is it?")
    assert prompt == FALLBACK_TEMPLATES[template].format(image=processor.image_token, question="what is it?")
    if name.startswith("qwen"):
        assert "<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>" in prompt
    # a chat template, when the processor has one, writes the prompt
    processor.chat_template = "{{ messages[0]['content'][1]['text'] }} CHAT"
    try:
        assert build_prompt(processor, "q?") == "q? CHAT" and template_name(processor) == "chat_template"
    finally:
        processor.chat_template = None


def test_batched_left_padded_answers_equal_one_at_a_time(loaded, root):
    _, model, processor = loaded
    samples = load_vqa_questions(root / "q.jsonl").samples
    both = generate_answers(model, processor, samples, root / "images", batch_size=3, max_new_tokens=4, progress=False)
    alone = generate_answers(model, processor, samples, root / "images", batch_size=1, max_new_tokens=4, progress=False)
    assert both.texts == alone.texts and all(both.texts)
    counts = stock_counts(model, processor, root)
    assert len(set(counts)) > 1  # the images give different stock counts
    assert both.visual_tokens == both.visual_tokens_prompt == pytest.approx(sum(counts) / 3)
    assert both.gflops > both.gflops_prefill > 0 and both.flops_questions == 3 and both.pruned_after_layer is None
    assert alone.flops_questions == 1 and alone.samples_per_s > 0 and alone.seconds_per_batch_median > 0


def test_reduced_run_end_to_end(loaded, root, tmp_path):
    name, model, processor = loaded
    keep = FAMILIES[name][-1]
    out = tmp_path / "run.json"
    stock = run_llava_eval("vqa", root / name, root / "q.jsonl", root / "images", root / "ann.json",
                           batch_size=2, max_new_tokens=3, progress=False, json_path=tmp_path / "stock.json")
    method = METHOD[name]
    result = run_llava_eval("vqa", root / name, root / "q.jsonl", root / "images", root / "ann.json", method=method,
                            keep=keep, batch_size=2, max_new_tokens=3, progress=False,
                            answers_path=tmp_path / "answers.jsonl", json_path=out, meta={"note": "test"})
    saved = json.loads(out.read_text())
    assert saved["meta"]["note"] == "test" and saved["results"]["visual_tokens"] == keep
    assert result["method"] == method and result["patch"]["method"] == method and result["patch"]["keep"] == keep
    assert stock["method"] == "none" and stock["patch"] is None
    counts = stock_counts(model, processor, root)
    assert stock["visual_tokens"] == pytest.approx(sum(counts) / 3) and stock["visual_tokens"] > keep
    assert result["gflops_prefill"] < stock["gflops_prefill"]
    assert result["score"] == {"metric": "vqa", "accuracy": 0.0, "n": 3}
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2] and answers[0]["model_id"] == name
    proto = result["protocol"]
    assert proto["version"] == PROTOCOL_VERSION and proto["task"] == "vqa"
    assert proto["family"] == family_of(model).name
    assert proto["budget"]["method"] == method and proto["budget"]["keep"] == keep
    assert proto["prompt"] == {**proto["prompt"], "template": FAMILIES[name][3],
                               "suffix": "Answer the question using a single word or phrase."}
    assert proto["decoding"]["max_new_tokens"] == 3 and proto["decoding"]["padding"] == "left"
    assert proto["image"]["processor"] == type(processor).__name__ and proto["scoring"].startswith("VQAv2")
    assert stock["protocol"]["budget"]["method"] == "none"


def test_fastv_and_the_tower_site_count_what_reaches_the_lm(root):
    model, processor = load_mllm(root / "next")
    processor = patch_mllm(model, processor, "fastv", keep=5)
    samples = load_vqa_questions(root / "q.jsonl").samples
    gen = generate_answers(model, processor, samples, root / "images", batch_size=1, max_new_tokens=2, progress=False)
    # the prompt keeps the stock placeholders; the LM carries keep per image from layer K=2 on
    assert gen.visual_tokens_prompt == pytest.approx(sum(stock_counts(model, processor, root)) / 3)
    assert gen.visual_tokens == 5 and gen.pruned_after_layer == 2
    # the tower site: keep per tile, so a count per image that depends on its tiles
    processor = patch_mllm(model, processor, "visionzip", keep=4, site="tower")
    gen = generate_answers(model, processor, samples, root / "images", batch_size=3, max_new_tokens=2, progress=False)
    counts = [crossget.image_tokens(model, (h, w)) for w, h in SIZES]
    assert gen.visual_tokens == gen.visual_tokens_prompt == pytest.approx(sum(counts) / 3) and len(set(counts)) > 1
    with pytest.raises(ValueError, match=r"method must be one of \(.*'dart'.*\) for LLaVA-NeXT"):
        patch_mllm(model, processor, "bogus", keep=5)
    with pytest.raises(ValueError, match="takes no budget"):
        patch_mllm(model, processor, "none", keep=5)


def test_pad_square_is_the_harness_own_for_anyres_families(root):
    _, processor = load_mllm(root / "next")
    pictures = [Image.open(root / "images" / "img0.png").convert("RGB")]
    padded, kwargs = prepare_images(processor, pictures, True)
    assert kwargs == {} and padded[0].size == (40, 40)  # not the NeXT image processor's do_pad (batch padding)
    assert prepare_images(processor, pictures, None) == (pictures, {})


def test_cli_refuses_an_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "q"}) + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "llava-vqa", "--model", str(tmp_path), "--questions", str(tmp_path / "q.jsonl")])
    err = capsys.readouterr().err
    assert "'clip'" in err and "qwen2_5_vl" in err and "llava_onevision" in err and "qwen3_vl" in err
