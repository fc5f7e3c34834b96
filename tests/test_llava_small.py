"""The tiny LLaVA of crossget.tools.llava_small (crossget init-llava): the shipped CLIP's vision tower copied
exactly, placeholders matching the image features (stock and reduced), LLaVA prompts without unknown
tokens, a from_pretrained round trip that crossget's evaluation and training load, multi-turn regrouping."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

import crossget
from crossget.tools.cli import main
from crossget.tools.data.shapes import sample_scene
from crossget.tools.data.shapes_qa import image_questions, llava_conversations
from crossget.tools.default import ASSETS
from crossget.tools.eval.llava import build_prompt, load_llava
from crossget.tools.eval.llava.data import SHORT_ANSWER
from crossget.tools.llava_small import build_llava_small, by_image, qa_texts
from crossget.tools.train.llava import LlavaCollator, LlavaConversations

SMALL = ["--lm-width", "32", "--lm-layers", "3", "--lm-heads", "2", "--lm-intermediate", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """QA conversations about 300 random scenes (every question form and answer word), 4 images, and the
    tiny LLaVA built from them by the CLI (with the regrouped training file)."""
    root = tmp_path_factory.mktemp("llava-small")
    rng = np.random.default_rng(0)
    qas = [qa for i in range(300) for qa in image_questions(sample_scene(rng), i)]
    (root / "qa.json").write_text(json.dumps(llava_conversations(qas)))
    (root / "images").mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"shapes_{i:06d}.png")
    assert main(["init-llava", "--out", str(root / "model"), "--qa", str(root / "qa.json"),
                 "--by-image", str(root / "qa.json"), *SMALL]) == 0
    return root


@pytest.fixture(scope="module")
def loaded(files):
    return load_llava(files / "model")


def pixels(processor, n=2):
    images = [Image.fromarray(np.random.default_rng(10 + i).integers(0, 255, (96, 96, 3), dtype=np.uint8))
              for i in range(n)]
    return images, processor.image_processor(images, return_tensors="pt")["pixel_values"]


def image_features(model, pix) -> list[torch.Tensor]:
    """The projected features per image that the language model gets (transformers 5: a list in pooler_output)."""
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=pix).pooler_output)


def test_vision_tower_is_the_shipped_clip_exactly(loaded):
    model, processor = loaded
    clip = CLIPModel.from_pretrained(ASSETS).eval()
    _, pix = pixels(processor)
    with torch.no_grad():
        ours = model.model.vision_tower(pix, output_hidden_states=True).hidden_states
        ref = clip.vision_model(pix, output_hidden_states=True).hidden_states
        assert len(ours) == len(ref) == 7 and all(torch.equal(a, b) for a, b in zip(ours, ref))
        # LLaVA-1.5: features of the second-to-last layer, CLS dropped, through the projector
        assert torch.equal(torch.stack(image_features(model, pix)), model.model.multi_modal_projector(ref[-2][:, 1:]))
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (-2, "default", "gelu")
    assert type(model.model.language_model).__name__ == "LlamaModel"


@pytest.mark.parametrize("budget", [None, dict(method="crossget", keep=72), dict(method="tome", keep=72)])
def test_placeholders_match_image_features(files, budget):
    model, processor = load_llava(files / "model")
    if budget:
        crossget.patch(model, **budget)
        processor = crossget.adapt_processor(processor, model)
    want = 144 if budget is None else 72
    assert crossget.image_tokens(model) == want
    images, pix = pixels(processor)
    prompt = build_prompt(processor, f"what colour is the object in the center?\n{SHORT_ANSWER}")
    inputs = processor(images=images, text=[prompt, prompt], return_tensors="pt")
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(1) == want).all()
    assert [len(f) for f in image_features(model, pix)] == [want, want]
    with torch.no_grad():  # LLaVA raises where placeholders and features differ
        assert model(**inputs).logits.isfinite().all()


def test_prompts_tokenise_without_unknown_words(files, loaded):
    _, processor = loaded
    tok = processor.tokenizer
    records = json.loads((files / "qa.json").read_text())
    for r in records:
        (q, a) = (m["value"].replace("<image>\n", "") for m in r["conversations"])
        ids = tok(build_prompt(processor, q) + f" {a}{tok.eos_token}")["input_ids"]
        assert tok.unk_token_id not in ids, q
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.convert_ids_to_tokens(tok("USER: <image>\nis it red? ASSISTANT:")["input_ids"]) == [
        "<s>", "user", ":", "<image>", "is", "it", "red", "?", "assistant", ":"]
    assert tok.unk_token_id in tok("a zebra")["input_ids"]  # unknown words do not vanish silently
    assert tok.decode(tok("red</s>")["input_ids"], skip_special_tokens=True) == "red"


def test_round_trip_and_build_record(files, loaded):
    model, processor = loaded
    texts = qa_texts(files / "qa.json")
    built, built_processor = build_llava_small(texts, lm_width=32, lm_layers=3, lm_heads=2, lm_intermediate=64)
    assert built_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (processor.patch_size, processor.num_additional_image_tokens, processor.image_token) == (8, 1, "<image>")
    images, pix = pixels(processor)
    inputs = processor(images=images, text=[build_prompt(processor, "what shape is in the center?")] * 2,
                       return_tensors="pt")
    with torch.no_grad():  # the same seed and sizes build the same weights; saving keeps them
        assert torch.equal(built(**inputs).logits, model(**inputs).logits)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    record = json.loads((files / "model" / "init_llava.json").read_text())
    assert record["command"].startswith("crossget init-llava") and record["settings"]["lm_layers"] == 3
    with pytest.raises(FileNotFoundError, match="crossget data-qa"):
        qa_texts(files / "nothing")


def test_regrouped_conversations_train_through_the_collator(files, loaded):
    model, processor = loaded
    records = json.loads((files / "qa.json").read_text())
    grouped = json.loads((files / "model" / "train_by_image.json").read_text())
    assert grouped == by_image(records)
    assert len(grouped) == 300 and sum(len(g["conversations"]) for g in grouped) == 2 * len(records)
    for g in grouped:
        human = [m["value"] for m in g["conversations"][::2]]
        assert human[0].startswith("<image>\n") and not any("<image>" in h for h in human[1:])
    data = LlavaConversations(files / "model" / "train_by_image.json", files / "images", check_images=False)
    first = next(i for i, c in enumerate(data.samples) if c.image == "shapes_000000.png")
    batch = LlavaCollator(processor, model)([data[first]])
    answers = [a for _, a in data.samples[first].turns]
    labelled = processor.tokenizer.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] >= 0].tolist())
    assert labelled == [t for a in answers for t in (a, "</s>")]
    assert model(**batch).loss.isfinite()
