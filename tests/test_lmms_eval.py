"""crossget's lmms-eval model (crossget/tools/lmms_eval.py).

Without lmms-eval: ``--model_args`` parsing and its errors, the request-to-batch plan, stop
strings, and ``generate_until`` / ``loglikelihood`` on tiny random LLaVA-1.5 and Qwen2.5-VL
models with duck-typed requests (the reduced placeholder count reaches the model, batched
answers equal one-by-one ones and a hand-made ``generate``, ``until`` cuts). With lmms-eval
installed (skipped otherwise): a generated task in lmms-eval's YAML format over a local json
data set, run by lmms-eval's own evaluator and CLI with ``--model crossget``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from mllm_common import word_tokenizer
from PIL import Image
from test_llava import IMG as LLAVA_IMG
from test_llava import make_llava
from test_qwen_vl import END, IMG, MERGE, PATCH, START, TEMPORAL, VIDEO, ImageTextProcessor, make_qwen
from transformers import CLIPImageProcessor, LlavaProcessor

import crossget
from crossget.tools import lmms_eval as adapter
from crossget.tools.cli import main
from crossget.tools.lmms_eval import (
    CrossgetLMM,
    cut_at,
    generate_settings,
    generation_key,
    parse_model_args,
    plan_batches,
    stop_strings,
)

LLAVA_TEMPLATE = (
    "{% for m in messages %}<s> USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}"
    "{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}w5{% endif %}"
)
KEEP = 16  # LLaVA: of 64 patches


def llava_processor():
    """A word-level processor over make_llava's 100 ids (w8 .. w98 are words), 32 px images."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "<image>": LLAVA_IMG,
             **{f"w{i}": i for i in range(8, LLAVA_IMG)}}
    tokenizer = word_tokenizer(vocab, ["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, chat_template=LLAVA_TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def qwen_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = {"<|image_pad|>": IMG, "<|video_pad|>": VIDEO, "<|vision_start|>": START, "<|vision_end|>": END}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, IMG)}, **special}
    tokenizer = word_tokenizer(vocab, special)
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return ImageTextProcessor(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def picture(seed, size):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8"))


class Request:
    """What lmms-eval's ``Instance`` gives a model: ``args``."""

    def __init__(self, *args):
        self.args = args


DOCS = [{"image": picture(i, size), "question": q} for i, (size, q) in enumerate(
    [((40, 30), "w10 w11"), ((32, 32), "w12"), ((30, 50), "w13 w14 w15 w16"), ((64, 48), "w17 <image> w18")])]


def requests(gen_kwargs, docs=DOCS, task="t"):
    return [Request(d["question"], dict(gen_kwargs), lambda doc: [doc["image"]], i, task, "test")
            for i, d in enumerate(docs)]


def lmm(model, processor, **args):
    m = CrossgetLMM(model=model, processor=processor, **args)
    m.task_dict = {"t": {"test": DOCS}}
    return m


class FirstInputs:
    """The ``input_ids`` of every prefill (a forward with the images or their encoding) the model runs."""

    def __init__(self, model):
        self.ids = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _m, _a, kw):
        if kw.get("pixel_values") is not None or kw.get("mm_encoder_outputs") is not None:
            self.ids.append(kw["input_ids"])


# --------------------------------------------------------------------------- model_args
def test_parse_model_args():
    a = parse_model_args("pretrained=/m,method=visionzip,keep=64,batch_size=4,dtype=bfloat16,fastv_layer=2")
    assert (a.pretrained, a.method, a.keep, a.batch_size, a.dtype, a.fastv_layer) == ("/m", "visionzip", 64, 4, "bfloat16", 2)
    assert a.patch_kwargs() == {"method": "visionzip", "keep": 64, "fastv_layer": 2} and a.patched
    # values as lmms-eval's own parser already converted them; max_batch_size (always passed) ignored
    b = parse_model_args({"pretrained": "/m", "method": "tome", "flops": 0.5, "batch_size": 2, "max_batch_size": None})
    assert (b.flops, b.batch_size) == (0.5, 2) and b.patch_kwargs() == {"method": "tome", "flops": 0.5}
    c = parse_model_args("pretrained=/m")
    assert c.method == "none" and not c.patched and c.batch_size == 1


@pytest.mark.parametrize("text, match", [
    ("pretrained=/m,kep=64", "unknown kep; known: pretrained"),
    ("pretrained=/m,method=tome,keep=2.5", "keep must be an int"),
    ("pretrained=/m,method=tome,keep=0", "keep must be at least 1"),
    ("pretrained=/m,method=tome,keep=x", "keep must be an int"),
    ("pretrained=/m,method=tome,flops=2", r"flops must be in \(0, 1\]"),
    ("pretrained=/m,method=tome,flops=abc", "flops must be a number"),
    ("pretrained=/m,method=tome,keep=8,flops=0.5", "not both"),
    ("pretrained=/m,method=bogus,keep=8", "method must be one of none, tome"),
    ("pretrained=/m,method=tome", "needs a budget"),
    ("pretrained=/m,dtype=int8", "dtype must be one of"),
    ("pretrained=/m,batch_size=0", "batch_size must be at least 1"),
    ("pretrained=/m,keep", "not key=value"),
])
def test_parse_model_args_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_model_args(text)


def test_create_from_arg_string(monkeypatch):
    """lmms-eval's constructor: model_args win over what --batch_size / --device pass."""
    made = {}
    monkeypatch.setattr(CrossgetLMM, "__init__", lambda self, **kw: made.update(kw))
    CrossgetLMM.create_from_arg_string("pretrained=/m,method=tome,keep=8,batch_size=4",
                                       {"batch_size": "1", "device": "cpu", "max_batch_size": None})
    assert made == {"pretrained": "/m", "method": "tome", "keep": "8", "batch_size": "4", "device": "cpu"}
    with pytest.raises(ValueError, match="unknown kep"):
        CrossgetLMM.create_from_arg_string("pretrained=/m,kep=8")


def test_missing_pretrained():
    with pytest.raises(ValueError, match="pretrained=DIR"):
        CrossgetLMM(method="tome", keep=4)


# --------------------------------------------------------------------------- batches and stops
def test_plan_batches():
    keys = ["a", "b", "a", "a", "b", "a"]
    lengths = [3, 9, 7, 1, 2, 7]
    batches = plan_batches(keys, lengths, 2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({keys[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
    assert batches == [[2, 5], [0, 3], [1, 4]]  # longest first within a key, ties in request order
    assert plan_batches(keys, lengths, 10) == [[2, 5, 0, 3], [1, 4]]
    assert plan_batches([], [], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(keys, lengths, 0)
    assert generation_key({"until": ["."], "max_new_tokens": 4}) == generation_key({"max_new_tokens": 4, "until": ["."]})
    assert generation_key({"until": ["."]}) != generation_key({"until": ["\n"]})


def test_stops_and_settings():
    assert stop_strings({}) == [] and stop_strings({"until": "\n"}) == ["\n"]
    assert stop_strings({"until": ["a", "", "b"]}) == ["a", "b"]
    with pytest.raises(ValueError, match="until"):
        stop_strings({"until": 3})
    assert cut_at("w1 w2. w3\n", [".", "\n"]) == "w1 w2" and cut_at("w1", ["x"]) == "w1" and cut_at("w1", []) == "w1"
    assert generate_settings({}, 7) == {"max_new_tokens": 7, "num_beams": 1, "do_sample": False}
    greedy = generate_settings({"temperature": 0, "top_p": 1.0, "max_new_tokens": 3, "do_sample": False}, 7)
    assert greedy == {"max_new_tokens": 3, "num_beams": 1, "do_sample": False}
    assert generate_settings({"temperature": 0.5, "top_p": 0.9}, 7) == {
        "max_new_tokens": 7, "num_beams": 1, "do_sample": True, "temperature": 0.5, "top_p": 0.9}


# --------------------------------------------------------------------------- generation
GEN = {"max_new_tokens": 5, "temperature": 0}


def hand_made(model, processor, doc, settings):
    """One prompt through the processor and ``generate`` directly: the reference answer."""
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": doc["question"].replace("<image>", "").strip()}]}],
        add_generation_prompt=True, tokenize=False)
    x = processor(text=[text], images=[doc["image"]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, **settings, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("family, args, per_image", [
    ("llava", dict(method="crossget", keep=KEEP), [KEEP] * 4),
    ("llava", dict(method="visionzip", keep=KEEP), [KEEP] * 4),
    ("qwen", dict(method="tome", keep=7), [7] * 4),
])
def test_generate_until(family, args, per_image):
    model, processor = (make_llava(), llava_processor()) if family == "llava" else (make_qwen(), qwen_processor())
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    one = lmm(model, processor, batch_size=1, **args)
    assert crossget.is_patched(model) and crossget.config(model).keep == per_image[0]
    seen = FirstInputs(model)
    alone = one.generate_until(requests(GEN))
    # the prompts hold the reduced count: each image gives `keep` placeholders
    assert [int((ids == image_token).sum()) for ids in seen.ids] == per_image
    assert alone == [hand_made(model, processor, d, generate_settings(GEN, 0)) for d in DOCS]
    assert any(alone) and len(set(alone)) > 1  # random weights still answer, differently per image
    one.batch_size = 3
    seen.ids.clear()
    assert one.generate_until(requests(GEN)) == alone  # left-padded batches answer as one by one
    assert [ids.shape[0] for ids in seen.ids] == [3, 1]
    # until: each answer cut before its first stop word
    word = alone[0].split()[1] if len(alone[0].split()) > 1 else alone[0].split()[0]
    cut = one.generate_until(requests({**GEN, "until": [word]}))
    assert cut == [cut_at(a, [word]) for a in alone] and cut[0] != alone[0]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_loads_a_model_folder(family, tmp_path):
    """pretrained=DIR loads the family's model and processor (Qwen: images only, no torchvision
    here) and answers as the same objects patched in place."""
    model, processor = (make_llava(), llava_processor()) if family == "llava" else (make_qwen(), qwen_processor())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    budget = dict(method="tome", keep=KEEP if family == "llava" else 7)
    loaded = CrossgetLMM(pretrained=str(tmp_path), device="cpu", batch_size=2, **budget)
    loaded.task_dict = {"t": {"test": DOCS}}
    assert type(loaded.model) is type(model) and crossget.config(loaded.model).keep == budget["keep"]
    assert loaded.generate_until(requests(GEN)) == lmm(model, processor, **budget).generate_until(requests(GEN))
    with pytest.raises(FileNotFoundError, match="no model at"):
        CrossgetLMM(pretrained=str(tmp_path / "missing"))


def test_fastv_batches_by_image_size():
    """FastV ranks one count per batch: a batch of images of different sizes runs as one
    sub-batch per size, answering as one by one."""
    model, processor = make_qwen(), qwen_processor()
    docs = [DOCS[0], DOCS[1], {**DOCS[2], "image": DOCS[0]["image"]}, DOCS[3]]
    m = lmm(model, processor, method="fastv", keep=7, fastv_layer=1, batch_size=1)
    m.task_dict = {"t": {"test": docs}}
    alone = m.generate_until(requests(GEN, docs))
    m.batch_size = 4
    seen = FirstInputs(model)
    assert m.generate_until(requests(GEN, docs)) == alone
    assert sorted(ids.shape[0] for ids in seen.ids) == [1, 1, 2]  # the two same-size images together


def test_stock_model_runs_unpatched():
    model, processor = make_llava(), llava_processor()
    m = lmm(model, processor)
    assert not crossget.is_patched(model)
    seen = FirstInputs(model)
    m.generate_until(requests(GEN)[:1])
    assert int((seen.ids[0] == LLAVA_IMG).sum()) == 64


def test_stock_args_unpatch_a_patched_model():
    """method=none over a model handed in patched runs the stock model (the args say so)."""
    model, processor = make_llava(), llava_processor()
    lmm(model, processor, method="tome", keep=KEEP)
    m = lmm(model, processor)
    assert not crossget.is_patched(model) or crossget.config(model).method == "none"
    seen = FirstInputs(model)
    m.generate_until(requests(GEN)[:1])
    assert int((seen.ids[0] == LLAVA_IMG).sum()) == 64


def test_loglikelihood():
    model, processor = make_llava(), llava_processor()
    m = lmm(model, processor, method="crossget", keep=KEEP)
    greedy = m.generate_until(requests({"max_new_tokens": 2}))
    asks = [Request(d["question"], " " + greedy[i], lambda doc: [doc["image"]], i, "t", "test") for i, d in enumerate(DOCS)]
    other = [Request(DOCS[0]["question"], " w40 w41", lambda doc: [doc["image"]], 0, "t", "test")]
    scores = m.score_continuations(asks + other)
    wrapped = m.loglikelihood(asks + other)  # lmms-eval 0.7.3 reads the pairs from GenerationResult.text
    assert [getattr(w, "text", w) for w in wrapped] == scores
    assert [s[1] for s in scores] == [True] * 4 + [False]
    # the score by hand: log-softmax of the full prompt's logits at the continuation's tokens
    prompt = m.prompt(DOCS[0]["question"], 1)
    x = processor(text=[prompt + " w40 w41"], images=[DOCS[0]["image"]], return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(**x).logits[0], -1)
    want = float(logp[-3, 40] + logp[-2, 41])
    assert scores[-1][0] == pytest.approx(want, abs=1e-4)


def test_without_a_chat_template_one_image_takes_the_harness_family_template():
    """The same prompt as the llava-* harnesses write (docs/protocol.md), not a bare ``<image>``."""
    from crossget.tools.eval.llava.prompts import build_prompt

    processor = llava_processor()
    processor.chat_template = None
    m = lmm(make_llava(), processor)
    assert m.prompt("w10 w11", 1) == build_prompt(processor, "w10 w11") == "USER: <image>\nw10 w11 ASSISTANT:"
    assert m.prompt("w10", 1, " w12") == build_prompt(processor, "w10") + " w12"


def test_refusals():
    model, processor = make_llava(), llava_processor()
    m = lmm(model, processor)
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        m.generate_until_multi_round([])
    with pytest.raises(TypeError, match="images only"):
        m.generate_until([Request("w10", {}, lambda doc: ["/videos/a.mp4"], 0, "t", "test")])
    with pytest.raises(ValueError, match="method must be one of"):
        lmm(model, processor, method="fastvv", keep=3)
    with pytest.raises(ValueError, match="needs its processor"):
        CrossgetLMM(model=model)
    pruned = lmm(make_llava(), llava_processor(), method="fastv", keep=KEEP)
    with pytest.raises(NotImplementedError, match="loglikelihood with method='fastv'"):
        pruned.loglikelihood([Request(DOCS[0]["question"], " w40", lambda doc: [doc["image"]], 0, "t", "test")])


# --------------------------------------------------------------------------- the command
def test_cli_without_lmms_eval(capsys):
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lmms-eval is installed")
    with pytest.raises(SystemExit) as e:
        main(["lmms-eval", "--model", "crossget", "--tasks", "x"])
    assert e.value.code == 2
    assert adapter.INSTALL_HINT in capsys.readouterr().err


# --------------------------------------------------------------------------- with lmms-eval
def save_tiny_llava(root: Path) -> Path:
    model, processor = make_llava(), llava_processor()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


def write_task(root: Path, docs) -> Path:
    """A task in lmms-eval's format: YAML, its utils.py, a json data set and PNG images."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, d in enumerate(docs):
        path = root / "images" / f"{i}.png"
        d["image"].save(path)
        rows.append({"image": str(path), "question": d["question"], "answer": d["answer"], "choices": d["choices"],
                     "label": d["label"]})
    (root / "docs.json").write_text(json.dumps(rows))
    (root / "crossget_tiny.yaml").write_text(textwrap.dedent(f"""\
        task: crossget_tiny
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "docs.json"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 5
          temperature: 0
          until: ["w99"]
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """))
    (root / "crossget_tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: crossget_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "docs.json"}
        test_split: test
        output_type: multiple_choice
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """))
    (root / "utils.py").write_text(textwrap.dedent("""\
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]

        def process_results(doc, results):
            return {"exact_match": float(results[0].strip() == doc["answer"])}
        """))
    return root


@pytest.fixture
def lmms_task(tmp_path, monkeypatch):
    """A saved tiny LLaVA and two 4-question tasks whose answers are the crossget-patched model's
    own for the first two questions and wrong for the others: each score must be 0.5. Generated
    answers; and the likeliest of two choices (multiple choice: loglikelihood requests)."""
    pytest.importorskip("lmms_eval")
    for var, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(var, value)
    model_dir = save_tiny_llava(tmp_path / "model")
    direct = CrossgetLMM(pretrained=str(model_dir), method="crossget", keep=KEEP, device="cpu")
    direct.task_dict = {"t": {"test": DOCS}}
    answers = direct.generate_until(requests({"max_new_tokens": 5, "temperature": 0, "until": ["w99"]}))
    choices = [["w40", "w41 w42"], ["w43", "w44"], ["w45 w46", "w47"], ["w48", "w49"]]
    scores = direct.score_continuations([Request(d["question"], " " + c, lambda doc: [doc["image"]], i, "t", "test")
                                   for i, (d, pair) in enumerate(zip(DOCS, choices)) for c in pair])
    best = [int(scores[2 * i + 1][0] > scores[2 * i][0]) for i in range(4)]
    docs = [{**d, "answer": a.strip() if i < 2 else "w98 w97 w96", "choices": pair, "label": b if i < 2 else 1 - b}
            for i, (d, a, pair, b) in enumerate(zip(DOCS, answers, choices, best))]
    return model_dir, write_task(tmp_path / "task", docs)


def test_lmms_eval_evaluator(lmms_task):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model_dir, task_dir = lmms_task
    results = simple_evaluate(
        model="crossget", model_args=f"pretrained={model_dir},method=crossget,keep={KEEP},batch_size=3",
        tasks=["crossget_tiny", "crossget_tiny_mc"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        device="cpu", batch_size=1, log_samples=False, bootstrap_iters=0)
    assert results["results"]["crossget_tiny"]["exact_match,none"] == 0.5
    assert results["results"]["crossget_tiny_mc"]["acc,none"] == 0.5


def test_lmms_eval_cli(lmms_task, tmp_path):
    model_dir, task_dir = lmms_task
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "crossget.tools.cli", "lmms-eval", "--model", "crossget",
           "--model_args", f"pretrained={model_dir},method=crossget,keep={KEEP}", "--tasks", "crossget_tiny,crossget_tiny_mc",
           "--include_path", str(task_dir), "--batch_size", "2", "--device", "cpu", "--output_path", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*results*.json")]
    assert [(r["results"]["crossget_tiny"]["exact_match,none"], r["results"]["crossget_tiny_mc"]["acc,none"])
            for r in results] == [(0.5, 0.5)]
