"""BLIP evaluation harnesses: ITM retrieval, COCO captions, VQAv2, NLVR2.

Tiny random BLIP models are saved and loaded back (the local loading path); the data files are
written here in the official formats, with a few PIL images. Metrics are checked on hand-made
cases, and the harnesses against the stock model's own forward / generate.
"""

import json
import math
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

from crossget.api import is_patched
from crossget.tools.cli import main
from crossget.tools.data.karpathy import load_karpathy
from crossget.tools.eval import caption, itm_retrieval, nlvr2, vqa
from crossget.tools.eval.blip_common import apply_method, load_blip
from crossget.tools.eval.retrieval import retrieval_metrics
from crossget.tools.eval.runner import run_task

WORDS = ("a an the picture of photo red blue green yellow square circle big small on left right is there "
         "what color shape how many two one yes no are both images in . , ? !").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *WORDS]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
SCENES = [("red", "square"), ("blue", "circle"), ("green", "square"), ("yellow", "circle")]
HAS_JAVA = shutil.which("java") is not None


def tiny_processor() -> BlipProcessor:
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, bos_token="[DEC]",
                        additional_special_tokens=["[ENC]"], model_max_length=32)
    return BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)


def tiny_config() -> BlipConfig:
    text = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=5, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    # BlipVisionConfig's default initializer_range is 1e-10: the vision tower would output ~0 and the
    # image could not change any text-side result
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def draw(path, color: str, shape: str, size: int = 48) -> None:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (8, 8, size - 8, size - 8)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    im.save(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    out = {}
    for cls in (BlipForImageTextRetrieval, BlipForConditionalGeneration, BlipForQuestionAnswering):
        torch.manual_seed(0)
        model = cls(tiny_config()).eval()
        model.save_pretrained(root / cls.__name__)
        tiny_processor().save_pretrained(root / cls.__name__)
        out[cls.__name__] = root / cls.__name__
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, (color, shape) in enumerate(SCENES):
        draw(root / f"img{i}.png", color, shape)
    return root


# --------------------------------------------------------------------------- ITM retrieval
def test_rerank_hand_made():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])  # 2 images, 3 texts
    itm = torch.tensor([[0.0, 5.0, 9.0], [1.0, 0.0, -3.0]])  # what the ITM head says of each pair
    asked = []

    def score(img, txt):
        asked.extend(zip(img.tolist(), txt.tolist()))
        return itm[img, txt]

    i2t, t2i = itm_retrieval.rerank_scores(sim, 2, score, pair_batch=3)
    # image 0: top-2 texts 0, 1 -> 0.9 + 0, 0.5 + 5; text 2 is never scored; image 1: texts 1, 2
    assert torch.allclose(i2t, torch.tensor([[0.9, 5.5, -100.0], [-100.0, 0.8, -2.3]]))
    # every text has only 2 images, so both are re-scored
    assert torch.allclose(t2i, (sim + itm).T)
    # i2t asks its 4 pairs first (never (0, 2)), then t2i all 6
    assert asked[:4] == [(0, 0), (0, 1), (1, 1), (1, 2)] and len(asked) == 4 + 6
    # texts 0, 1 describe image 0; text 2 image 1
    rec = itm_retrieval.itm_recalls(i2t, t2i, torch.tensor([0, 0, 1]), [[0, 1], [2]])
    # i2t: image 0 ranks its text 1 first (5.5): hit; image 1 ranks text 1 (0.8) above its text 2 (-2.3): rank 1.
    # t2i: text 0 prefers image 1 (1.2 > 0.9): miss; text 1 image 0 (5.5): hit; text 2 image 0 (9.1): miss
    assert rec["i2t_r1"] == 50.0 and rec["i2t_r5"] == 100.0
    assert rec["t2i_r1"] == pytest.approx(100 / 3) and rec["t2i_r5"] == 100.0
    assert rec["mean_r1"] == pytest.approx((50 + 100 / 3) / 2)
    assert rec["r_mean"] == pytest.approx((50 + 100 + 100 + 100 / 3 + 100 + 100) / 6)
    with pytest.raises(ValueError, match="k must be"):
        itm_retrieval.rerank_scores(sim, 0, score)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("karpathy")
    entries = []
    for i, (color, shape) in enumerate(SCENES):
        shutil.copy(images / f"img{i}.png", root / f"img{i}.png")
        sents = [f"a {color} {shape}", f"a picture of a {color} {shape} ."]
        entries.append({"filename": f"img{i}.png", "split": "test", "sentences": [{"raw": s} for s in sents]})
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def test_itm_pieces_match_the_model_forward(models, karpathy):
    model, processor = load_blip(models["BlipForImageTextRetrieval"], BlipForImageTextRetrieval)
    split = load_karpathy(karpathy)
    px = processor.image_processor(images=[Image.open(p).convert("RGB") for p in split.image_paths[:2]],
                                   return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(split.captions[:2], padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref_itc = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=px,
                        use_itm_head=False).itm_score
        ref_itm = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=px,
                        use_itm_head=True).itm_score[:, 1]
        img, embeds = itm_retrieval.image_features(model, px)
        txt = itm_retrieval.text_features(model, text["input_ids"], text["attention_mask"])
        itm = itm_retrieval.itm_logits(model, embeds, text["input_ids"], text["attention_mask"])
    assert torch.allclose(img @ txt.T, ref_itc, atol=1e-6)
    assert torch.allclose(itm, ref_itm, atol=1e-5)


def test_itm_retrieval_end_to_end(models, karpathy, tmp_path):
    out = tmp_path / "itm.json"
    res = itm_retrieval.run_itm_retrieval(models["BlipForImageTextRetrieval"], karpathy, k=8, batch_size=3,
                                          pair_batch=16, first_token="cls", json_path=out, progress=False)
    # reference: the stock model's own forward on every pair (k = all texts, all images)
    model, processor = load_blip(models["BlipForImageTextRetrieval"], BlipForImageTextRetrieval)
    split = load_karpathy(karpathy)
    pil = [Image.open(p).convert("RGB") for p in split.image_paths]
    text = processor.tokenizer(split.captions, padding=True, return_tensors="pt")
    n_i, n_t = split.n_images, split.n_texts
    ii, tt = torch.arange(n_i).repeat_interleave(n_t), torch.arange(n_t).repeat(n_i)
    px = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        kw = dict(input_ids=text["input_ids"][tt], attention_mask=text["attention_mask"][tt], pixel_values=px[ii])
        itm = model(**kw, use_itm_head=True).itm_score[:, 1].view(n_i, n_t)
        sim = torch.stack([model(**kw, use_itm_head=False).itm_score[p, p] for p in range(len(ii))]).view(n_i, n_t)
    ref = retrieval_metrics(itm + sim, split.txt2img, split.img2txts)
    itc = retrieval_metrics(sim, split.txt2img, split.img2txts)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mean_r1"):
        assert res[key] == pytest.approx(ref[key]), key
        assert res[f"itc_{key}"] == pytest.approx(itc[key]), key
    assert res["itm_first_token"] == "[CLS]" and res["image_tokens"] == 1 + 16
    assert res["gflops_ratio"] == 1.0 and res["gflops"] > 0 and res["images_per_s"] > 0
    assert res["gflops"] == pytest.approx(res["gflops_image"] + res["gflops_text"] + res["gflops_itm_pair"])
    assert res["gflops_total"] == pytest.approx(
        4 * res["gflops_image"] + 8 * res["gflops_text"] + (4 * 8 + 8 * 4) * res["gflops_itm_pair"])
    saved = json.loads(out.read_text())
    assert saved["method"] == "none" and saved["i2t_r1"] == res["i2t_r1"]
    # BLIP's own protocol: [ENC] first for the ITM pass
    enc = itm_retrieval.evaluate_itm_retrieval(model, processor, split, k=2, progress=False)
    assert enc["itm_first_token"] == "[ENC]"


# --------------------------------------------------------------------------- captions
@pytest.mark.parametrize("tokenizer", ["basic", pytest.param("ptb", marks=pytest.mark.skipif(
    not HAS_JAVA, reason="pycocoevalcap's PTBTokenizer needs java"))])
def test_caption_scores_hand_made(tokenizer):
    # BLEU-4 with one reference of equal length: p1..p4 = 5/6, 4/5, 3/4, 2/3 -> (1/3) ** (1/4)
    s = caption.caption_scores({1: ["A red square on the left."]}, {1: "a red square on the table"}, tokenizer)
    assert s["bleu_4"] == pytest.approx(100 * (1 / 3) ** 0.25, rel=1e-5)
    assert s["bleu_1"] == pytest.approx(100 * 5 / 6, rel=1e-5)
    # CIDEr-D (x 100): every n-gram occurs in the references of one of the 2 images, idf = log 2;
    # image 2 exact: unigram and bigram cosines 1 -> 10 * (1 + 1 + 0 + 0) / 4 = 5;
    # image 1 "red circle" vs "red square": unigram cosine 1/2, bigram 0 -> 10 * 0.5 / 4 = 1.25
    refs = {1: ["red square"], 2: ["blue circle"]}
    assert caption.caption_scores(refs, {1: "red square", 2: "blue circle"}, tokenizer)["cider"] == pytest.approx(500)
    assert caption.caption_scores(refs, {1: "red circle", 2: "blue circle"}, tokenizer)["cider"] == pytest.approx(312.5)
    with pytest.raises(ValueError, match="without references"):
        caption.caption_scores(refs, {3: "red"}, tokenizer)


@pytest.fixture(scope="module")
def coco_captions(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("coco")
    (root / "val").mkdir()
    ims, anns = [], []
    for i, (color, shape) in enumerate(SCENES[:3]):
        shutil.copy(images / f"img{i}.png", root / "val" / f"COCO_{i}.png")
        ims.append({"id": 100 + i, "file_name": f"COCO_{i}.png"})
        anns += [{"id": 2 * i + j, "image_id": 100 + i, "caption": c}
                 for j, c in enumerate([f"a {color} {shape}.", f"a picture of a big {color} {shape}"])]
    path = root / "captions_gt.json"
    path.write_text(json.dumps({"images": ims, "annotations": anns}))
    return path


def test_caption_end_to_end(models, coco_captions, tmp_path):
    settings = caption.GenerationSettings(num_beams=2, max_length=8, min_length=3)
    out = tmp_path / "cap.json"
    res = caption.run_caption(models["BlipForConditionalGeneration"], coco_captions,
                              image_root=coco_captions.parent / "val", json_path=out, settings=settings,
                              batch_size=2, tokenizer="basic", progress=False)
    # the captions are what the stock model generates for each image on its own, minus the prompt
    model, processor = load_blip(models["BlipForConditionalGeneration"], BlipForConditionalGeneration)
    prompt = processor.tokenizer("a picture of", return_tensors="pt")["input_ids"]
    for r, i in zip(res["results"], range(3)):
        px = processor.image_processor(images=[Image.open(coco_captions.parent / "val" / f"COCO_{i}.png")
                                               .convert("RGB")], return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=px, input_ids=prompt.clone(), num_beams=2, max_length=8, min_length=3)
        assert ids[0, : prompt.shape[1] - 1].tolist() == [5, *prompt[0, 1:-1].tolist()]  # BOS + prompt words
        assert r == {"image_id": 100 + i,
                     "caption": processor.tokenizer.decode(ids[0, prompt.shape[1] - 1 :], skip_special_tokens=True)}
    results = json.loads((tmp_path / "cap_results.json").read_text())
    assert results == res["results"] and set(results[0]) == {"image_id", "caption"}
    rescored = caption.score_results(coco_captions, tmp_path / "cap_results.json", "basic")
    assert rescored["cider"] == pytest.approx(res["cider"]) and rescored["bleu_4"] == pytest.approx(res["bleu_4"])
    saved = json.loads(out.read_text())
    assert saved["gflops_ratio"] == 1.0 and saved["gflops"] > 0 and saved["images_per_s"] > 0
    assert "results" not in saved and saved["generation"]["num_beams"] == 2


def test_caption_file_errors(tmp_path, coco_captions):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        caption.load_coco_captions(tmp_path / "nowhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"bad.json.*annotations\[0\] has no \"caption\""):
        caption.load_coco_captions(bad, check=False)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*invalid JSON"):
        caption.load_coco_captions(bad)
    with pytest.raises(FileNotFoundError, match="COCO_0.png"):
        caption.load_coco_captions(coco_captions, image_root=tmp_path)


# --------------------------------------------------------------------------- VQA
def test_vqa_accuracy_hand_made():
    # leave-one-out over 10 humans: min(matches among the other 9 / 3, 1), averaged
    assert vqa.vqa_accuracy("two", ["2"] * 10) == 1.0  # number words become digits
    assert vqa.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa.vqa_accuracy("maybe", ["yes"] * 10) == 0.0
    assert vqa.vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0  # period, case, article
    assert vqa.vqa_accuracy("dont know", ["don't know"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # contraction
    # disagreeing humans get the punctuation step: "hot-dog" -> "hot dog"
    assert vqa.vqa_accuracy("hot dog", ["hot-dog"] * 3 + ["pizza"] * 7) == pytest.approx(0.9)
    # ... agreeing ones do not (as in the official script)
    assert vqa.vqa_accuracy("hot dog", ["hot-dog"] * 10) == 0.0
    assert vqa.normalize_answer("  1,000 people!\n") == "1000 people"
    assert vqa.normalize_answer("an apple, a pear") == "apple pear"
    assert vqa.normalize_answer("3.5") == "3.5" and vqa.normalize_answer("end.") == "end"


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("vqa")
    (root / "val2014").mkdir()
    for i in range(3):
        shutil.copy(images / f"img{i}.png", root / "val2014" / f"COCO_val2014_{i + 7:012d}.png")
    qs = [
        {"question_id": 70, "image_id": 7, "question": "what color is the square?"},
        {"question_id": 71, "image_id": 7, "question": "is there a circle?"},
        {"question_id": 80, "image_id": 8, "question": "what shape is in the picture?"},
        {"question_id": 90, "image_id": 9, "question": "is there a square?"},
    ]
    questions = root / "questions.json"
    questions.write_text(json.dumps({"data_subtype": "val2014", "task_type": "Open-Ended", "questions": qs}))
    return root, questions, qs


def _annotations(path, qs, answers):
    anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
             "answer_type": "yes/no" if q["question"].startswith("is") else "other",
             "multiple_choice_answer": a[0], "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1}
                                                         for j, x in enumerate(a)]}
            for q, a in zip(qs, answers)]
    path.write_text(json.dumps({"annotations": anns}))
    return path


def test_vqa_end_to_end(models, vqa_files, tmp_path):
    root, questions, qs = vqa_files
    pattern = "COCO_{data_subtype}_{image_id:012d}.png"
    model, processor = load_blip(models["BlipForQuestionAnswering"], BlipForQuestionAnswering)
    # reference answers: the stock model, one question at a time
    ref = []
    for q in qs:
        image = Image.open(root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.png").convert("RGB")
        inputs = processor(images=image, text=q["question"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4)
        ref.append(processor.tokenizer.decode(out[0], skip_special_tokens=True).strip())
    # humans: 3 x the model's answer (-> 0.9), then never (-> 0), 10 x (-> 1), and one more 0
    answers = [[ref[0]] * 3 + ["zzz"] * 7, ["zzz"] * 10, [ref[2]] * 10, ["zzz"] * 10]
    ann = _annotations(tmp_path / "ann.json", qs, answers)
    out = tmp_path / "vqa.json"
    res = vqa.run_vqa(models["BlipForQuestionAnswering"], questions, annotations=ann, image_root=root / "val2014",
                      image_pattern=pattern, json_path=out, batch_size=4, max_new_tokens=4, progress=False)
    assert [r["answer"] for r in res["results"]] == ref
    assert [r["question_id"] for r in res["results"]] == [70, 71, 80, 90]
    assert res["accuracy"] == pytest.approx(100 * (0.9 + 0 + 1 + 0) / 4)
    assert res["accuracy_per_answer_type"] == pytest.approx({"other": 100 * 1.9 / 2, "yes/no": 0.0})
    assert res["gflops_ratio"] == 1.0 and res["gflops"] > 0 and res["questions_per_s"] > 0
    assert json.loads((tmp_path / "vqa_results.json").read_text()) == res["results"]
    # no annotations (test-dev): answers only
    res = vqa.run_vqa(models["BlipForQuestionAnswering"], questions, image_root=root / "val2014",
                      image_pattern=pattern, max_new_tokens=4, progress=False, limit=2)
    assert res["accuracy"] is None and len(res["results"]) == 2


def test_vqa_file_errors(vqa_files, tmp_path):
    root, questions, qs = vqa_files
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000007.jpg"):
        vqa.load_vqa(questions)  # default pattern: .jpg
    ann = _annotations(tmp_path / "ann.json", qs[:2], [["a"] * 10] * 2)
    with pytest.raises(ValueError, match=r"ann.json.*no annotation for 2 questions, e.g. question_id 80"):
        vqa.load_vqa(questions, ann, check=False)
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"data_subtype": "val2014", "questions": [{"question_id": 1, "question": "why?"}]}))
    with pytest.raises(ValueError, match=r"q.json.*questions\[0\] has no \"image_id\""):
        vqa.load_vqa(bad, check=False)
    bad.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 3, "question": "why?"}]}))
    with pytest.raises(ValueError, match=r"q.json.*no \"data_subtype\""):
        vqa.load_vqa(bad, check=False)
    assert vqa.load_vqa(bad, image_pattern="{image_id}.jpg", check=False).image_paths == [tmp_path / "3.jpg"]


def test_vqa_keeps_the_multiple_choice_answer(vqa_files, tmp_path):
    _, questions, qs = vqa_files
    ann = _annotations(tmp_path / "ann.json", qs, [["b", "a", "a"], ["no"] * 3, ["c"] * 3, ["yes"] * 3])
    data = json.loads(ann.read_text())
    data["annotations"][0]["multiple_choice_answer"] = "a"  # the consensus, not the first human answer
    del data["annotations"][1]["multiple_choice_answer"]  # without it: the first human answer
    ann.write_text(json.dumps(data))
    v = vqa.load_vqa(questions, ann, check=False)
    assert [v.multiple_choice[q["question_id"]] for q in qs] == ["a", "no", "c", "yes"]


# --------------------------------------------------------------------------- NLVR2
def test_nlvr2_hand_made():
    assert nlvr2.image_pair("dev-850-0-3") == ("dev-850-0-img0.png", "dev-850-0-img1.png")
    left, right = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([0.3, 0.1, 0.7])
    assert torch.allclose(nlvr2.combine_probs(left, right), torch.tensor([0.6, 0.15, 0.65]))
    assert torch.allclose(nlvr2.combine_probs(left, right, "min"), torch.tensor([0.3, 0.1, 0.6]))
    assert nlvr2.accuracy([True, False, True], [True, True, True]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="combine"):
        nlvr2.combine_probs(left, right, "sum")


@pytest.fixture(scope="module")
def nlvr2_file(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("nlvr2")
    lines = []
    for pair, (a, b) in enumerate([(0, 1), (2, 3), (1, 2)]):
        for side, n in (("img0", a), ("img1", b)):
            shutil.copy(images / f"img{n}.png", root / f"dev-{pair}-0-{side}.png")
        for s, (sentence, label) in enumerate([("there is a red square", "True"), ("both images are blue", "False")]):
            lines.append(json.dumps({"identifier": f"dev-{pair}-0-{s}", "sentence": sentence, "label": label,
                                     "left_url": "http://x", "right_url": "http://y", "synset": "n"}))
    path = root / "dev.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nlvr2_end_to_end(models, nlvr2_file, tmp_path):
    out = tmp_path / "nlvr2.json"
    res = nlvr2.run_nlvr2(models["BlipForImageTextRetrieval"], nlvr2_file, json_path=out, batch_size=4,
                          progress=False)
    model, processor = load_blip(models["BlipForImageTextRetrieval"], BlipForImageTextRetrieval)
    correct = 0
    for r in res["results"]:
        stem = r["identifier"].rsplit("-", 1)[0]
        sentence = "there is a red square" if r["identifier"].endswith("0") else "both images are blue"
        probs = []
        for side in ("img0", "img1"):
            inputs = processor(images=Image.open(nlvr2_file.parent / f"{stem}-{side}.png").convert("RGB"),
                               text=sentence, return_tensors="pt")
            with torch.inference_mode():
                probs.append(model(**inputs, use_itm_head=True).itm_score.softmax(-1)[0, 1].item())
        assert (r["p_left"], r["p_right"]) == pytest.approx(tuple(probs), abs=1e-5)
        assert r["prediction"] == ((probs[0] + probs[1]) / 2 >= 0.5)
        correct += r["prediction"] == r["label"]
    assert res["accuracy"] == pytest.approx(100 * correct / 6) and res["true_share"] == 50.0
    saved = json.loads(out.read_text())
    assert "zero-shot proxy" in saved["decision"] and saved["gflops_ratio"] == 1.0 and saved["examples_per_s"] > 0


def test_nlvr2_file_errors(tmp_path, nlvr2_file):
    bad = tmp_path / "dev.json"
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="dev.json.*line 1 has label 'maybe'"):
        nlvr2.load_nlvr2(bad, check=False)
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x"}\n')
    with pytest.raises(ValueError, match=r"dev.json.*line 1 has no \"label\""):
        nlvr2.load_nlvr2(bad, check=False)
    with pytest.raises(FileNotFoundError, match="dev-0-0-img0.png"):
        nlvr2.load_nlvr2(nlvr2_file, image_root=tmp_path)


# --------------------------------------------------------------------------- loading, configs, CLI
def test_load_blip_checks_the_architecture(models, tmp_path):
    with pytest.raises(TypeError, match="holds BlipForConditionalGeneration.*needs BlipForImageTextRetrieval"):
        load_blip(models["BlipForConditionalGeneration"], BlipForImageTextRetrieval)
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_blip(tmp_path, BlipForImageTextRetrieval)
    model, _ = load_blip(models["BlipForConditionalGeneration"], BlipForConditionalGeneration)
    with pytest.raises(TypeError, match="expected a BlipForQuestionAnswering"):
        vqa.evaluate_vqa(model, None, None)
    with pytest.raises(ValueError, match="needs r"):
        apply_method(model, "tome")
    with pytest.raises(ValueError, match="method must be"):
        apply_method(model, "fast", r=2)


def test_cli(models, karpathy, coco_captions, vqa_files, nlvr2_file, tmp_path, capsys):
    root, questions, qs = vqa_files
    ann = _annotations(tmp_path / "ann.json", qs, [["yes"] * 10] * 4)
    runs = {
        "itm-retrieval": ["--model", str(models["BlipForImageTextRetrieval"]), "--data", str(karpathy), "--k", "3"],
        "caption": ["--model", str(models["BlipForConditionalGeneration"]), "--data", str(coco_captions),
                    "--images", str(coco_captions.parent / "val"), "--tokenizer", "basic", "--num-beams", "1",
                    "--max-length", "6", "--limit", "2"],
        "vqa": ["--model", str(models["BlipForQuestionAnswering"]), "--data", str(questions), "--annotations",
                str(ann), "--images", str(root / "val2014"), "--image-pattern",
                "COCO_{data_subtype}_{image_id:012d}.png", "--max-new-tokens", "3"],
        "nlvr2": ["--model", str(models["BlipForImageTextRetrieval"]), "--data", str(nlvr2_file)],
    }
    score = {"itm-retrieval": "i2t_r1", "caption": "cider", "vqa": "accuracy", "nlvr2": "accuracy"}
    tasks = {"itm-retrieval": itm_retrieval.ITMRetrievalTask(), "caption": caption.CAPTION, "vqa": vqa.VQATask(),
             "nlvr2": nlvr2.NLVR2}
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(["eval", name, *args, "--method", "none", "--threads", "1", "--json", str(out)]) == 0
        saved = json.loads(out.read_text())
        assert saved["task"] == name and saved[score[name]] is not None and saved["gflops"] > 0, name
        assert saved["method"] == "none" and saved["gflops_ratio"] == 1.0
        # each task names itself and the keys of its summary line, all in its result
        assert tasks[name].name == name and set(tasks[name].result_keys) <= set(saved), name
        assert ("results_file" in saved) == tasks[name].results_file, name
    # errors name what is wrong
    with pytest.raises(SystemExit):
        main(["eval", "caption", "--model", str(models["BlipForConditionalGeneration"]), "--data",
              str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "vqa", "--model", str(models["BlipForImageTextRetrieval"]), "--data", str(questions)])
    assert "needs BlipForQuestionAnswering" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "nlvr2", *runs["nlvr2"], "--method", "tome"])
    assert "--r or --flops" in capsys.readouterr().err


# --------------------------------------------------------------------------- the runner
class StandInTask:
    """A task that records what the runner hands it (and whether the model was patched then)."""

    name = "stand-in"
    model_class = BlipForImageTextRetrieval
    result_keys = ("score",)

    def __init__(self, results_file: bool):
        self.results_file = results_file
        self.calls = []

    def load(self, path, image_root, limit):
        self.calls.append(("load", str(path), image_root, limit))
        return ["item"] * (limit or 3)

    def describe(self):
        return {"extra": "named"}

    def sample_gflops(self, model, processor, data, options):
        self.calls.append(("gflops", is_patched(model), dict(options)))
        return 4.0

    def evaluate(self, model, processor, data, progress, options):
        self.calls.append(("evaluate", is_patched(model), progress, dict(options)))
        return {"score": 1.5, "gflops": 3.0, "results": [{"item": i} for i in range(len(data))]}


@pytest.mark.parametrize("results_file", [True, False])
def test_run_task_measures_unreduced_then_patches_evaluates_and_writes(models, tmp_path, results_file):
    task = StandInTask(results_file)
    out = tmp_path / "run.json"
    res = run_task(task, models["BlipForImageTextRetrieval"], tmp_path / "data.json", image_root="imgs", limit=2,
                   method="tome", r=2, json_path=out, progress=False, batch_size=3, k=5)
    # the data loaded once; GFLOPs of the stock model first, then the patched model evaluated; options to both
    assert task.calls == [("load", str(tmp_path / "data.json"), "imgs", 2), ("gflops", False, {"batch_size": 3, "k": 5}),
                          ("evaluate", True, False, {"batch_size": 3, "k": 5})]
    head = ["task", "model", "data", "extra", "score", "gflops", "results"]
    assert list(res)[: len(head)] == head and res["task"] == "stand-in" and res["extra"] == "named"
    assert res["method"] == "tome" and res["r"] == 2 and res["schedule"]
    assert res["gflops_unreduced"] == 4.0 and res["gflops_ratio"] == 0.75
    saved = json.loads(out.read_text())
    results = tmp_path / "run_results.json"
    if results_file:  # the per-item results in their own file, named by the result
        assert res["results_file"] == str(results) and json.loads(results.read_text()) == res["results"]
        assert saved == {k: v for k, v in res.items() if k != "results"}
    else:
        assert "results_file" not in res and not results.exists() and saved == res


# --------------------------------------------------------------------------- patched models
def _patchable(model) -> bool:
    from crossget.families.registry import family_of

    try:
        family_of(model)
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_harnesses_on_a_patched_model(models, karpathy, coco_captions, vqa_files, nlvr2_file, method):
    itm, _ = load_blip(models["BlipForImageTextRetrieval"], BlipForImageTextRetrieval)
    if not _patchable(itm):
        pytest.skip("crossget.patch does not support BLIP models yet")
    root, questions, _ = vqa_files
    kw = dict(method=method, r=4, progress=False)
    res = itm_retrieval.run_itm_retrieval(models["BlipForImageTextRetrieval"], karpathy, k=3, **kw)
    assert res["image_tokens"] == 17 - 2 * 4 and res["gflops_ratio"] < 1 and res["schedule"]
    assert 0 <= res["i2t_r1"] <= 100 and math.isfinite(res["t2i_r1"])
    res = caption.run_caption(models["BlipForConditionalGeneration"], coco_captions, image_root=coco_captions.parent
                              / "val", settings=caption.GenerationSettings(num_beams=2, max_length=8, min_length=3),
                              tokenizer="basic", limit=2, **kw)
    assert res["gflops_ratio"] < 1 and len(res["results"]) == 2
    res = vqa.run_vqa(models["BlipForQuestionAnswering"], questions, image_root=root / "val2014",
                      image_pattern="COCO_{data_subtype}_{image_id:012d}.png", max_new_tokens=3, **kw)
    assert res["gflops_ratio"] < 1 and len(res["results"]) == 4
    res = nlvr2.run_nlvr2(models["BlipForImageTextRetrieval"], nlvr2_file, **kw)
    assert res["gflops_ratio"] < 1 and 0 <= res["accuracy"] <= 100


@pytest.mark.parametrize("towers", [("vision",), ("vision", "text")])
def test_cached_itm_path_matches_the_patched_forward(models, karpathy, towers):
    """Cached, re-indexed image tokens keep their log(size) bias: the harness's scores equal the
    patched model's own forward on every pair (vision re-run per pair, bias added by the patch)."""
    model, processor = load_blip(models["BlipForImageTextRetrieval"], BlipForImageTextRetrieval)
    if not _patchable(model):
        pytest.skip("crossget.patch does not support BLIP models yet")
    apply_method(model, "crossget", r=4, towers=towers)
    split = load_karpathy(karpathy)
    sc = itm_retrieval.retrieval_scores(model, processor, split, k=8, first_token="cls", progress=False)
    assert sc["image_tokens"] == 17 - 2 * 4
    with torch.inference_mode():
        px = processor.image_processor(images=[Image.open(p).convert("RGB") for p in split.image_paths],
                                       return_tensors="pt")["pixel_values"]
        _, embeds = itm_retrieval.image_features(model, px)
        assert itm_retrieval.image_mask(model, embeds).dim() == 4  # the bias, not ones
    text = sc["texts"]
    n_i, n_t = split.n_images, split.n_texts
    ii, tt = torch.arange(n_i).repeat_interleave(n_t), torch.arange(n_t).repeat(n_i)
    with torch.inference_mode():
        itm = model(input_ids=text["input_ids"][tt], attention_mask=text["attention_mask"][tt], pixel_values=px[ii],
                    use_itm_head=True).itm_score[:, 1].view(n_i, n_t)
    assert torch.allclose(sc["i2t"], itm + sc["sim"], atol=1e-5)
    assert torch.allclose(sc["t2i"], (itm + sc["sim"]).T, atol=1e-5)
