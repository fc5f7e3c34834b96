"""Small BLIP models on the shapes data: CLIP -> BLIP vision weights, a few training steps, the saved
model through the caption / VQA evaluations, and crossget.patch on it. Tiny sizes, a few seconds."""

import json

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering, CLIPConfig, CLIPModel

import crossget
from crossget.tools.cli import main
from crossget.tools.data.shapes import generate_dataset
from crossget.tools.data.shapes_qa import IMAGE_PATTERN, write_qa
from crossget.tools.data.tokenizer import build_word_tokenizer
from crossget.tools.eval import caption, vqa
from crossget.tools.eval.blip_common import load_blip
from crossget.tools.train.blip import (
    BlipSmallConfig,
    blip_processor,
    blip_tokenizer,
    build_blip,
    caption_data,
    clip_vision_to_blip,
    make_batch,
    train_blip,
    vqa_data,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP (32 px, patch 8, width 32) saved with a word tokenizer, generated shapes and their QA files."""
    root = tmp_path_factory.mktemp("blip")
    annotation = generate_dataset(root / "shapes", 6, 0, 3, image_size=48, seed=0)
    write_qa(annotation, root / "qa")
    torch.manual_seed(0)
    tok = build_word_tokenizer(["a red circle"], max_length=16)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=len(tok), bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    return {"root": root, "annotation": annotation, "images": annotation.parent / "images", "qa": root / "qa",
            "clip": root / "clip"}


def _small(files, task):
    clip = CLIPModel.from_pretrained(files["clip"]).eval()
    cfg = BlipSmallConfig.from_clip(clip.config, text_layers=1, text_heads=2, max_text_len=48)
    data = caption_data(files["annotation"]) if task == "caption" else vqa_data(
        files["qa"] / "train" / "questions.json", image_root=files["images"])
    tok = blip_tokenizer(data.texts + (data.answers or []), files["clip"], cfg.max_text_len)
    return clip, cfg, data, tok, blip_processor(tok, cfg.image_size)


def test_clip_vision_weights_carry_over(files):
    clip, cfg, data, tok, proc = _small(files, "caption")
    blip = build_blip("caption", cfg, tok).eval()
    px = make_batch("caption", data, [0, 1, 2, 3], proc, 48)["pixel_values"]
    fold = clip_vision_to_blip(clip.vision_model, blip.vision_model, px)
    cv, bv = clip.vision_model, blip.vision_model
    with torch.no_grad():
        x = cv.embeddings(px)
        ref = cv(px, output_hidden_states=True)
        emb = bv.embeddings(px)
        # CLS: the pre-LN of a constant, exact
        assert torch.allclose(emb[:, 0], cv.pre_layrnorm(x)[:, 0], atol=1e-6)
        # patches: the layer norm with each token's deviation replaced by the mean one, exact
        s = torch.tensor(fold["patch_std"])
        ln = cv.pre_layrnorm
        folded = ln.weight * (x - x.mean(-1, keepdim=True)) / s + ln.bias
        assert torch.allclose(emb[:, 1:], folded[:, 1:], atol=1e-5)
        # the layers and the final norm are the same: CLIP's pre-LN states through BLIP's encoder give CLIP's states
        h = ref.hidden_states[0]
        for n, layer in enumerate(bv.encoder.layers):
            h = layer(h)
            assert torch.allclose(h, ref.hidden_states[n + 1], atol=1e-5)
        assert torch.allclose(bv.post_layernorm(h), cv.post_layernorm(ref.last_hidden_state), atol=1e-5)
        # end to end, only the fold differs
        out = bv(px).last_hidden_state
        want = cv.post_layernorm(ref.last_hidden_state)
    assert ((out - want).norm() / want.norm()) < 0.5 and fold["patch_std_spread"] < 0.5


def test_a_few_steps_reduce_the_loss(files, tmp_path):
    clip, cfg, data, tok, proc = _small(files, "caption")
    _, log = train_blip("caption", data, tmp_path / "cap", clip=files["clip"], config=cfg, steps=80, batch_size=6,
                        lr=3e-3, vision_lr_scale=1.0, progress=False, log_every=10)
    assert log["loss"][-1] < 0.6 * log["loss"][0]
    saved = json.loads((tmp_path / "cap" / "training.json").read_text())
    assert saved["steps"] == 80 and len(saved["loss"]) == 8


@pytest.fixture(scope="module")
def trained(files):
    """Both models, trained a few steps through the CLI and saved."""
    out = {}
    for task, data in (("caption", files["annotation"]), ("vqa", files["qa"] / "train" / "questions.json")):
        out[task] = files["root"] / task
        args = ["train-blip", "--task", task, "--data", str(data), "--clip", str(files["clip"]), "--out",
                str(out[task]), "--steps", "3", "--batch", "4", "--text-layers", "1"]
        assert main(args + (["--images", str(files["images"])] if task == "vqa" else [])) == 0
    return out


def test_saved_models_run_the_evaluations(files, trained, tmp_path):
    settings = caption.GenerationSettings(num_beams=2, max_length=12, min_length=3)
    res = caption.run_caption(trained["caption"], files["qa"] / "test" / "captions.json", image_root=files["images"],
                              settings=settings, tokenizer="basic", progress=False, json_path=tmp_path / "cap.json")
    assert len(res["results"]) == 3 and res["gflops"] > 0 and "cider" in res
    res = vqa.run_vqa(trained["vqa"], files["qa"] / "test" / "questions.json",
                      annotations=files["qa"] / "test" / "annotations.json", image_root=files["images"],
                      image_pattern=IMAGE_PATTERN, progress=False, method="crossget", r=6)
    # the official accuracy of the answers it wrote, recomputed; merging made it cheaper
    answers = {r["question_id"]: r["answer"] for r in res["results"]}
    data = vqa.load_vqa(files["qa"] / "test" / "questions.json", files["qa"] / "test" / "annotations.json",
                        files["images"], IMAGE_PATTERN)
    assert res["accuracy"] == pytest.approx(vqa.vqa_scores(answers, data)["accuracy"])
    assert res["method"] == "crossget" and res["gflops_ratio"] < 1
    log = json.loads((trained["vqa"] / "training.json").read_text())
    assert log["command"].startswith("crossget ") and log["task"] == "vqa" and log["threads"] == 1


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_patch_r0_generates_what_the_stock_model_does(files, trained, task):
    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    model, proc = load_blip(trained[task], cls)
    data = caption_data(files["annotation"]) if task == "caption" else vqa_data(
        files["qa"] / "train" / "questions.json", image_root=files["images"])
    batch = make_batch(task, data, [0, 1], proc, 48)
    if task == "caption":
        inputs = {"pixel_values": batch["pixel_values"], "input_ids": caption.prompt_ids(proc.tokenizer, "a picture of", 2)}
    else:
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    stock = model.generate(**{k: v.clone() for k, v in inputs.items()}, max_new_tokens=6)
    crossget.patch(model, r=0)
    assert torch.equal(model.generate(**{k: v.clone() for k, v in inputs.items()}, max_new_tokens=6), stock)
    crossget.patch(model, r=3)  # merging runs on it too
    assert model.generate(**{k: v.clone() for k, v in inputs.items()}, max_new_tokens=6).shape[0] == 2
