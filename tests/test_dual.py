"""The LiT-style dual encoder tool (crossget train-dual) on tiny random towers and generated data."""

import json

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, Dinov2Config, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from crossget.tools.cli import main
from crossget.tools.data.shapes import generate_dataset
from crossget.tools.data.tokenizer import build_word_tokenizer
from crossget.tools.train.dual import train_projections


def towers(root):
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                      patch_size=8, intermediate_size=64))
    vision.save_pretrained(root / "vision")
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    ann = generate_dataset(root / "data", 12, 0, 6, image_size=48, seed=0)
    words = build_word_tokenizer([s["raw"] for i in json.loads(ann.read_text())["images"] for s in i["sentences"]])
    vocab = words.get_vocab()
    text = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    text.save_pretrained(root / "text")
    BertTokenizerFast(tokenizer_object=words._tokenizer, pad_token=words.pad_token, unk_token=words.unk_token,
                      cls_token=words.bos_token, sep_token=words.eos_token).save_pretrained(root / "text")
    return ann


def test_projections_learn_separable_features():
    g = torch.Generator().manual_seed(0)
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2), BertConfig(hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32), projection_dim=8)
    model = VisionTextDualEncoderModel(cfg)
    base = torch.randn(40, 16, generator=g)
    feats = {"image": base + 0.1 * torch.randn(40, 16, generator=g), "text": base + 0.1 * torch.randn(40, 16, generator=g)}
    losses = train_projections(model, feats, torch.arange(40), steps=60, batch_size=16, lr=1e-2, progress=False)
    assert losses[-1] < losses[0] / 2


def test_train_dual_command_writes_a_model_and_its_test_recall(tmp_path, capsys):
    ann = towers(tmp_path)
    out = tmp_path / "dual"
    assert main(["train-dual", "--vision", str(tmp_path / "vision"), "--text", str(tmp_path / "text"), "--data", str(ann),
                 "--out", str(out), "--steps", "20", "--batch", "8", "--threads", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["frozen_towers"] and record["test_images"] == 6 and 0 <= record["test"]["i2t_r1"] <= 100
    assert record["loss_last"] < record["loss_first"]
    assert "test (6 images" in capsys.readouterr().out
    from transformers import VisionTextDualEncoderModel

    assert isinstance(VisionTextDualEncoderModel.from_pretrained(out), VisionTextDualEncoderModel)
