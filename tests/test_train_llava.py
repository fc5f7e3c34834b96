"""LLaVA training (crossget.tools.train.llava): data, prompts and labels, the three trainable sets,
checkpoints, resume, errors and the CLI, on a tiny random LLaVA saved to disk."""

import json
import sys

import pytest
import torch
from PIL import Image
from test_llava import IMG, make_llava
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

import crossget
from crossget.tools.cli import LLAVA_TRAINABLE, main
from crossget.tools.train.llava import TRAINABLE, LlavaCollator, LlavaConversations, load_lora, train_llava

WORDS = ["what", "colour", "is", "it", "the", "image", "red", "green", "blue", "yellow", "and", "shape", "a", "square"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def tiny_processor() -> LlavaProcessor:
    """Word-level tokenizer (BOS added, like Llama's) and a 32 px CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "USER:": 4, "ASSISTANT:": 5, "<image>": IMG}
    vocab |= {w: 6 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny LLaVA + processor, 4 coloured PNGs and a LLaVA conversation JSON."""
    root = tmp_path_factory.mktemp("llava")
    make_llava().save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    (root / "images").mkdir()
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 36), rgb).save(root / "images" / f"{name}.png")
        conv = [{"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": name}]
        if i % 2:  # multi-turn, image after the question as some LLaVA records have it
            conv = [{"from": "human", "value": "what is the shape\n<image>"}, {"from": "gpt", "value": "a square"},
                    {"from": "human", "value": "what colour is it"}, {"from": "gpt", "value": f"{name} and {name}"}]
        records.append({"id": f"s{i}", "image": f"{name}.png", "conversations": conv})
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "it"}]})
    (root / "conv.json").write_text(json.dumps(records))
    return root


def load(files, **budget):
    model = LlavaForConditionalGeneration.from_pretrained(files / "model")
    if budget:
        crossget.patch(model, method="crossget", **budget)
    return model


def data(files):
    return LlavaConversations(files / "conv.json", files / "images")


def run(files, model, out, **kw):
    kw = {"steps": 4, "batch_size": 4, "lr": 0.05, "progress": False, "log_every": 1} | kw
    return train_llava(model, tiny_processor(), data(files), out, **kw)


def trained_logits(model, files):
    batch = LlavaCollator(tiny_processor(), model)([data(files)[i] for i in range(2)])
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def weights(model):
    """Every parameter and buffer by name (the cross tokens too, which state_dict() leaves out)."""
    return {**model.state_dict(), **dict(model.named_parameters())}


def changed(before, model):
    """Keys whose values moved; peft's wrapped layers keep their weights under ``.base_layer``."""
    after = {k.replace(".base_layer", ""): v for k, v in weights(model).items()}
    assert before.keys() <= after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


# --------------------------------------------------------------------------- data and labels
def test_dataset_reads_llava_json(files):
    ds = data(files)
    assert len(ds) == 4 and ds.skipped == 1
    item = ds[1]
    assert item["image"].size == (40, 36) and item["turns"] == [("what is the shape", "a square"),
                                                                  ("what colour is it", "green and green")]


def test_labels_cover_only_the_answers(files):
    model = load(files, keep=20)
    stock = tiny_processor()
    collate = LlavaCollator(stock, model)
    ds = data(files)
    batch = collate([ds[0], ds[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids == IMG).sum(-1).tolist() == [crossget.image_tokens(model)] * 2 == [20, 20]
    tok = collate.processor.tokenizer
    assert tok.decode(labels[0][labels[0] >= 0]) == "red </s>"
    assert tok.decode(labels[1][labels[1] >= 0]) == "a square </s> green and green </s>"
    assert (labels[ids == IMG] == -100).all() and (labels[mask == 0] == -100).all() and mask[0].sum() < mask[1].sum()
    assert tok.decode(ids[0][mask[0] == 1][22:]) == "what colour is it ASSISTANT: red </s>"
    assert ids[0, 1:3].tolist() == [4, IMG] and ids[0, 0] == 1  # "<s> USER: <image>..."
    # the caller's processor keeps the stock count
    assert stock.num_additional_image_tokens == 1 and collate.processor.num_additional_image_tokens != 1


@pytest.mark.parametrize(
    "content,match",
    [(None, "not found"), ("{not json", "invalid JSON"), ({"a": 1}, "JSON list"),
     ([{"id": "x", "image": "red.png", "conversations": [{"from": "gpt"}]}], r"item 0 \(id 'x'\).*message 0"),
     ([{"id": "y", "image": "nope.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
      r"image not found: .*nope.png .*item 0, id 'y'")],
)
def test_clear_errors(files, tmp_path, content, match):
    path = tmp_path / "conv.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises((FileNotFoundError, ValueError), match=match) as err:
        LlavaConversations(path, files / "images")
    assert str(path) in str(err.value) or "nope.png" in str(err.value)


# --------------------------------------------------------------------------- training
def test_cross_tokens_learn_and_nothing_else(files, tmp_path):
    model = load(files, keep=20)
    before = {k: v.detach().clone() for k, v in weights(model).items()}
    model, log = run(files, model, tmp_path / "run")
    assert changed(before, model) == {"model.vision_tower.encoder.crossget_cross_tokens",
                                      "model.language_model.crossget_cross_tokens"}
    losses = [e["loss"] for e in log["loss"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(e["cross"] is not None and e["cross"] >= 0 for e in log["loss"])
    written = json.loads((tmp_path / "run" / "training.json").read_text())
    assert written["trainable"] == "cross" and written["patch"]["keep"] == 20 and written["train_seconds"] > 0

    # the saved cross tokens reproduce the trained model
    fresh = load(files)
    crossget.load_cross_tokens(fresh, tmp_path / "run" / "cross_tokens.safetensors")
    assert torch.equal(trained_logits(fresh, files), trained_logits(model, files))


def test_resume_continues_from_the_saved_step(files, tmp_path):
    straight, _ = run(files, load(files, keep=20), tmp_path / "straight")
    # out of time after the first step: stops with a checkpoint
    _, cut = run(files, load(files, keep=20), tmp_path / "split", max_minutes=1e-9)
    assert cut["stopped_early_at"] == 1
    resumed, log = run(files, load(files, keep=20), tmp_path / "split", resume=True)
    assert log["resumed_at"] == 1 and [e["step"] for e in log["loss"]] == [1, 2, 3, 4]
    for k, st in crossget.states(straight).items():
        assert torch.allclose(crossget.states(resumed)[k].cross_tokens, st.cross_tokens, atol=1e-6), k


def test_projector_and_lm_from_an_unpatched_model(files, tmp_path):
    model = load(files)
    before = {k: v.detach().clone() for k, v in weights(model).items()}
    model, log = run(files, model, tmp_path / "run", trainable="projector+lm", lr=3e-3)
    moved = changed(before, model)
    assert not any("vision_tower" in k for k in moved)
    assert any("multi_modal_projector" in k for k in moved) and any("language_model" in k for k in moved)
    assert log["loss"][-1]["loss"] < log["loss"][0]["loss"] and log["loss"][0]["cross"] is None
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(trained_logits(saved, files), trained_logits(model, files))


def test_lora_trains_adapters_and_cross_tokens(files, tmp_path):
    pytest.importorskip("peft")
    model = load(files, keep=20)
    before = {k: v.detach().clone() for k, v in weights(model).items()}
    model, log = run(files, model, tmp_path / "run", trainable="lora", lr=1e-2)
    lora = {k for k in model.state_dict() if "lora_" in k}
    assert lora and all("language_model" in k and "self_attn" in k for k in lora)
    assert changed(before, model) == {"model.vision_tower.encoder.crossget_cross_tokens",
                                      "model.language_model.crossget_cross_tokens"}  # base weights as they were
    assert log["loss"][-1]["loss"] < log["loss"][0]["loss"]
    fresh = load(files)
    crossget.load_cross_tokens(fresh, tmp_path / "run" / "cross_tokens.safetensors")
    load_lora(fresh, tmp_path / "run" / "lora.safetensors")
    assert torch.allclose(trained_logits(fresh, files), trained_logits(model, files), atol=1e-6)


def test_lora_without_peft_says_what_to_install(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"crossget\[lora\]"):
        run(files, load(files, keep=20), tmp_path / "run", trainable="lora")


def test_bad_settings(files, tmp_path):
    with pytest.raises(ValueError, match="method='crossget'"):
        run(files, load(files), tmp_path / "a", trainable="cross")
    with pytest.raises(ValueError, match="trainable"):
        run(files, load(files, keep=20), tmp_path / "b", trainable="all")
    with pytest.raises(ValueError, match="do not fill one batch"):
        run(files, load(files, keep=20), tmp_path / "c", batch_size=8)


def test_other_families_are_refused_before_loading(files, tmp_path):
    """The eval harness loads every multimodal family; training is LLaVA-1.5's, so a LLaVA-NeXT
    folder is a TypeError (only its config.json is there: nothing else is read)."""
    from test_llava_next import make_next

    from crossget.tools.train.jobs import train_llava_on

    make_next().config.save_pretrained(tmp_path / "next")
    with pytest.raises(TypeError, match="'llava_next' model; train-llava trains LLaVA-1.5"):
        train_llava_on(tmp_path / "next", files / "conv.json", files / "images", tmp_path / "out", keep=4)


def test_cli_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train-llava", "--model", str(files / "model"), "--data", str(files / "conv.json"), "--images",
            str(files / "images"), "--method", "crossget", "--keep", "20", "--trainable", "cross", "--steps", "2",
            "--batch", "2", "--threads", "1", "--log-every", "1", "--pad-square", "--out", str(out)]
    assert LLAVA_TRAINABLE == TRAINABLE
    assert main(args) == 0
    log = json.loads((out / "training.json").read_text())
    assert [e["step"] for e in log["loss"]] == [1, 2] and (out / "cross_tokens.safetensors").is_file()
    assert log["pad_square"] is True
    assert "cross_tokens.safetensors" in capsys.readouterr().out
    assert main([*args[:-2], "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["resumed_at"] == 2
    with pytest.raises(SystemExit):
        main([*args[:3], "--data", str(tmp_path / "missing.json"), *args[5:]])
    assert "not found" in capsys.readouterr().err
