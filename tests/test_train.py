"""Cross-token training through accelerate: loss goes down, only theta moves, resume works."""

import json

import pytest
import torch
from conftest import make_clip, make_texts

import crossget
from crossget.tools.train.clip import PairData, _one_caption_per_image, train_cross_tokens


def tiny_pairs(n_img: int = 16) -> PairData:
    g = torch.Generator().manual_seed(0)
    ids, mask = make_texts([16, 9, 5, 12] * (n_img // 2), seed=1)
    return PairData(
        pixel_values=torch.randn(n_img, 3, 32, 32, generator=g),
        input_ids=ids,
        attention_mask=mask,
        txt2img=torch.arange(n_img).repeat_interleave(2),
    )


def test_one_caption_per_image_picks_an_own_caption():
    txt2img = torch.tensor([0, 0, 1, 2, 2, 2])
    pick = _one_caption_per_image(txt2img, 3, torch.Generator().manual_seed(0))
    assert torch.equal(txt2img[pick], torch.arange(3))


def test_cross_token_training_lowers_the_loss_and_moves_only_theta(tmp_path):
    model = make_clip()
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "cross_tokens" not in k}
    model, log = train_cross_tokens(
        model, tiny_pairs(), tmp_path, cross_weight=1.0, steps=12, batch_size=8, lr=0.05, progress=False
    )
    cross = [c for _, c in log["loss"]]
    assert cross[-1] < cross[0]
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(st.cross_tokens.abs().sum() > 0 for st in crossget.states(model).values())
    assert (tmp_path / "cross_tokens.safetensors").exists()


def test_all_weights_training_saves_a_stock_model_beside_the_cross_tokens(tmp_path):
    from transformers import CLIPModel

    model = make_clip()
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "cross_tokens" not in k}
    model, log = train_cross_tokens(model, tiny_pairs(), tmp_path, steps=3, batch_size=8, lr=0.05,
                                    all_weights=True, weights_lr=1e-3, progress=False)
    assert log["all_weights"] and log["weights_lr"] == 1e-3
    after = {k: v for k, v in model.state_dict().items() if "cross_tokens" not in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = CLIPModel.from_pretrained(tmp_path / "model")  # loads as the stock class, no cross tokens
    assert saved.state_dict().keys() == after.keys()
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in after.items())
    loaded = crossget.load_cross_tokens(saved, tmp_path / "cross_tokens.safetensors")
    assert all(torch.equal(loaded_st.cross_tokens, st.cross_tokens)
               for loaded_st, st in zip(crossget.states(loaded).values(), crossget.states(model).values()))


def test_cross_token_training_resumes(tmp_path):
    model = make_clip()
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    train_cross_tokens(model, tiny_pairs(), tmp_path, steps=4, batch_size=8, checkpoint_every=2, progress=False)
    again = make_clip()
    crossget.patch(again, r=4, method="crossget", towers=("vision", "text"))
    again, log = train_cross_tokens(again, tiny_pairs(), tmp_path, steps=6, batch_size=8, progress=False)
    assert log["resumed_at"] == 4 and len(log["loss"]) == 2


# ------------------------------------------------------------------------------- base model training
def _tiny_base_config():
    from crossget.tools.train.clip import BaseModelConfig

    return BaseModelConfig(image_size=48, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                           text_width=32, text_layers=2, text_heads=2, max_text_len=48, projection_dim=16)


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory):
    from crossget.tools.data.karpathy import load_karpathy
    from crossget.tools.data.shapes import generate_dataset
    from crossget.tools.train.clip import base_processor, pair_data

    ann = generate_dataset(tmp_path_factory.mktemp("shapes"), 24, 3, 3, image_size=48, seed=0)
    split = load_karpathy(ann, split="train")
    processor = base_processor(split.captions, 48)
    return pair_data(split, processor, 48, progress=False), processor


def test_train_base_with_scene_loss_learns_and_saves_a_plain_clip(shapes_pairs, tmp_path):
    from transformers import CLIPModel

    from crossget.tools.train.clip import train_base

    pairs, processor = shapes_pairs
    assert pairs.scene_targets.shape == (24, 9, 5)
    model, log = train_base(pairs, processor.tokenizer, processor.image_processor, tmp_path, _tiny_base_config(),
                            epochs=8, batch_size=12, lr=3e-3, progress=False, scene_weight=1.0,
                            sincos_positions=0.5)
    assert log["epoch_scene_loss"][-1] < log["epoch_scene_loss"][0]
    assert log["epoch_loss"][-1] < log["epoch_loss"][0]
    saved = CLIPModel.from_pretrained(tmp_path)  # the scene head is not part of the model
    assert saved.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    saved_log = json.loads((tmp_path / "training.json").read_text())
    assert saved_log["scene_weight"] == 1.0 and saved_log["sincos_positions"] == 0.5
    assert saved_log["scene_head_reads"].startswith("vision tower pooled CLS state")


def test_scene_only_steps_leave_the_text_tower_alone(shapes_pairs, tmp_path):
    from transformers import CLIPModel

    from crossget.tools.train.clip import train_base

    pairs, processor = shapes_pairs
    config = _tiny_base_config()
    train_base(pairs, processor.tokenizer, processor.image_processor, tmp_path / "init", config, epochs=1,
               batch_size=12, progress=False)
    before = CLIPModel.from_pretrained(tmp_path / "init").state_dict()
    # 2 epochs x 2 batches, all scene-only; no weight decay, so only gradients move weights
    model, log = train_base(pairs, processor.tokenizer, processor.image_processor, tmp_path / "out", config, epochs=2,
                            batch_size=12, lr=3e-3, weight_decay=0.0, progress=False, init_from=tmp_path / "init",
                            scene_weight=1.0, scene_only_steps=4)
    after = model.state_dict()
    text = [k for k in before if k.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale"))]
    vision = [k for k in before if k.startswith("vision_model.encoder.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in vision)
    assert log["scene_only_steps"] == 4


def test_text_scene_loss_reads_the_pooled_eot_state_and_learns(shapes_pairs, tmp_path):
    from transformers import CLIPModel

    from crossget.tools.train.clip import text_pooled_state, train_base

    pairs, processor = shapes_pairs
    model = CLIPModel(_tiny_base_config().clip_config(len(processor.tokenizer), processor.tokenizer.bos_token_id,
                                                      processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id))
    ids, mask = pairs.input_ids[:5], pairs.attention_mask[:5]
    text = model.text_model(input_ids=ids, attention_mask=mask)  # the tower's own pooling, unprojected
    assert torch.equal(text_pooled_state(model.text_model, text.last_hidden_state, ids), text.pooler_output)
    _, log = train_base(pairs, processor.tokenizer, processor.image_processor, tmp_path, _tiny_base_config(),
                        epochs=8, batch_size=12, lr=3e-3, progress=False, text_scene_weight=1.0)
    assert log["epoch_text_scene_loss"][-1] < log["epoch_text_scene_loss"][0]
    assert "epoch_scene_loss" not in log and log["text_scene_head_reads"].startswith("text tower pooled EOT")
    assert json.loads((tmp_path / "training.json").read_text())["text_scene_weight"] == 1.0


def test_text_warmup_trains_only_the_text_tower_on_the_caption_scene_loss(shapes_pairs, tmp_path):
    from transformers import CLIPModel

    from crossget.tools.train.clip import SceneHead, _text_scene_warmup, train_base

    pairs, processor = shapes_pairs
    config, tok = _tiny_base_config(), processor.tokenizer
    torch.manual_seed(0)
    model = CLIPModel(config.clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = SceneHead(config.text_width)
    log = _text_scene_warmup(model.text_model, head, pairs, 200, 12, 3e-3, 0.0, torch.Generator().manual_seed(0),
                             progress=False)
    means = log["text_warmup_loss_per_100_steps"]
    assert log["text_warmup_steps"] == 200 and len(means) == 2 and means[1] < means[0]
    assert log["text_warmup_seconds"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("text_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_model.encoder."))
    _, log = train_base(pairs, tok, processor.image_processor, tmp_path, config, epochs=1, batch_size=12,
                        progress=False, text_scene_weight=1.0, text_warmup_steps=3)
    assert log["text_warmup_steps"] == 3 and len(log["text_warmup_loss_per_100_steps"]) == 1


def test_train_base_scene_weight_needs_targets_and_is_not_negative(shapes_pairs, tmp_path):
    from dataclasses import replace

    from crossget.tools.train.clip import train_base

    pairs, processor = shapes_pairs
    args = (processor.tokenizer, processor.image_processor, tmp_path, _tiny_base_config())
    with pytest.raises(ValueError, match="scene targets"):
        train_base(replace(pairs, scene_targets=None), *args, epochs=1, scene_weight=1.0, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        train_base(pairs, *args, epochs=1, scene_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        train_base(pairs, *args, epochs=1, text_scene_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="scene targets"):
        train_base(replace(pairs, scene_targets=None), *args, epochs=1, text_scene_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="scene_only_steps"):
        train_base(pairs, *args, epochs=1, scene_only_steps=3, progress=False)
    with pytest.raises(ValueError, match="text_warmup_steps"):
        train_base(pairs, *args, epochs=1, scene_weight=1.0, text_warmup_steps=3, progress=False)


def test_no_weight_decay_on_biases_norms_and_temperature():
    from crossget.tools.train.clip import _decay_groups

    model = make_clip()
    decay, no_decay = _decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"logit_scale", "vision_model.post_layernorm.weight"}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sincos_positions_order_the_patch_grid():
    from crossget.tools.train.clip import add_sincos_positions, sincos_grid

    codes = torch.nn.functional.normalize(sincos_grid(6, 16, temperature=12.0), dim=-1)
    cos = codes @ codes.T
    assert codes.shape == (36, 16)
    assert cos[0, 1] > cos[0, 3] > cos[0, 5] and cos[0, 6] > cos[0, 18]  # along a row, then a column
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_grid(6, 18)
    model = make_clip()
    table = model.vision_model.embeddings.position_embedding.weight
    before = table.detach().clone()
    add_sincos_positions(model.vision_model, 0.5)
    assert torch.equal(table[0], before[0]) and not torch.equal(table[1:], before[1:])
    assert table.requires_grad



# ------------------------------------------------------------------------------- the shared loop
def _linear_loop(steps: int = 6, checkpoint=None, resume: bool = False, nan_at: int | None = None,
                 batches: int | None = None, **kw):
    """Linear regression through TrainLoop on fixed batches (no randomness), so runs compare bitwise.
    Returns the loop after fit, the step it resumed at and the on_save calls. ``nan_at``: the loss of
    that step (1-based) is NaN; ``batches``: the batches end after that many steps."""
    from crossget.tools.train.loop import TrainLoop

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(steps, 4, 3, generator=torch.Generator().manual_seed(1))
    y = x.sum(-1, keepdim=True)
    loop = TrainLoop(model, torch.optim.AdamW(model.parameters(), lr=0.1), steps, warmup=2, checkpoint=checkpoint,
                     progress=False, **kw)
    done = loop.resume() if resume else 0

    def loss_fn(model, batch, step):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if step + 1 == nan_at:
            loss = loss * float("nan")
        return loss, {"loss": loss, "at": float(step), "absent": None}

    saves = []
    end = steps if batches is None else batches
    loop.fit(lambda first: ({"x": x[i], "y": y[i]} for i in range(first, end)), loss_fn,
             on_save=lambda step, final: saves.append((step, final)))
    return loop, done, saves


def test_train_loop_averages_logged_values_per_window_under_the_cosine_schedule():
    from crossget.tools.train.common import cosine_lr

    loop, _, saves = _linear_loop(steps=5, log_every=2)
    assert loop.step == 5 and not loop.stopped and saves == []  # no checkpoint given
    assert [e["step"] for e in loop.history] == [2, 4, 5]
    assert [e["at"] for e in loop.history] == [0.5, 2.5, 4.0]  # steps 0-1, 2-3, 4
    assert all(e["absent"] is None and e["loss"] > 0 for e in loop.history)
    assert [e["lr"] for e in loop.history] == pytest.approx([0.1 * cosine_lr(s, 5, 2) for s in (2, 4, 5)])
    assert loop.history[-1]["seconds"] == loop.elapsed > 0


def test_train_loop_stops_on_time_checkpointed_and_resumes_as_one_run(tmp_path):
    from crossget.tools.train.loop import AccelerateCheckpoint, TrainableCheckpoint

    straight, _, _ = _linear_loop()
    want = straight.unwrapped().state_dict()
    for fmt in (AccelerateCheckpoint, TrainableCheckpoint):
        out = tmp_path / fmt.__name__
        # out of time at the first look at the clock (step 3): stops there with a final checkpoint
        first, _, saves = _linear_loop(checkpoint=fmt(out), checkpoint_every=2, max_minutes=0.0, time_check_every=3)
        assert first.stopped and first.step == 3 and saves == [(2, False), (3, True)]
        assert json.loads(next(out.rglob("progress.json")).read_text()) == {"step": 3}
        second, done, saves = _linear_loop(checkpoint=fmt(out), checkpoint_every=2, resume=True)
        assert done == 3 and second.step == 6 and saves == [(4, False), (6, True)]
        got = second.unwrapped().state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), fmt.__name__  # weights, moments, schedule restored
        assert [e["step"] for e in second.history] == [4, 5, 6]


def test_repeat_epochs_is_lazy_and_refuses_an_empty_epoch():
    from crossget.tools.train.loop import repeat_epochs

    started = []

    def epoch():
        started.append(len(started))
        return iter([len(started)] * 2)

    batches = repeat_epochs(epoch)
    assert [next(batches) for _ in range(4)] == [1, 1, 2, 2] and started == [0, 1]  # epoch 3 not begun
    with pytest.raises(ValueError, match="fewer samples than one batch"):
        next(repeat_epochs(lambda: iter([])))


def test_train_loop_ends_with_the_batches_and_refuses_logged_names_it_uses_itself():
    from crossget.tools.train.loop import TrainLoop

    model = torch.nn.Linear(1, 1)
    loop = TrainLoop(model, torch.optim.SGD(model.parameters(), lr=0.0), 10, log_every=3, progress=False)
    loop.fit(lambda first: ({"x": torch.ones(1, 1)} for _ in range(4)), lambda m, b, step: (m(b["x"]).sum(), {"at": step}))
    assert loop.step == 4 and [(e["step"], e["at"]) for e in loop.history] == [(3, 1.0), (4, 3.0)]  # the last window too
    with pytest.raises(ValueError, match="'step'"):
        loop.fit(lambda first: ({"x": torch.ones(1, 1)} for _ in range(2)),
                 lambda m, b, step: (m(b["x"]).sum(), {"step": step}))


def test_train_loop_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path):
    from crossget.tools.train.loop import AccelerateCheckpoint, NonFiniteLossError, TrainableCheckpoint

    for fmt in (AccelerateCheckpoint, TrainableCheckpoint):
        good, bad = tmp_path / f"{fmt.__name__}-good", tmp_path / f"{fmt.__name__}-bad"
        _linear_loop(checkpoint=fmt(good), batches=3)  # the same run, its batches ending after step 3
        with pytest.raises(NonFiniteLossError, match=r"step 4 of 6 is nan.*checkpoint of step 3 is as it was") as e:
            _linear_loop(checkpoint=fmt(bad), nan_at=4)  # a checkpoint every step
        assert isinstance(e.value, ValueError) and isinstance(e.value, FloatingPointError)
        assert fmt(bad).saved_step() == 3
        # the checkpoint on disk is step 3's: resumed, it gives the same weights, moments and schedule
        kept, done, _ = _linear_loop(checkpoint=fmt(bad), resume=True, batches=3)
        want, _, _ = _linear_loop(checkpoint=fmt(good), resume=True, batches=3)
        assert done == 3 and kept.step == 3
        assert all(torch.equal(a, b) for a, b in zip(kept.unwrapped().state_dict().values(),
                                                    want.unwrapped().state_dict().values()))
        assert str(kept.opt.state_dict()) == str(want.opt.state_dict())
        assert kept.sched.state_dict() == want.sched.state_dict()
    with pytest.raises(NonFiniteLossError, match="step 1 of 6 is nan.*no checkpoint was written"):
        _linear_loop(nan_at=1)


def test_cross_token_training_stops_on_a_non_finite_loss_with_the_last_good_tokens(tmp_path, monkeypatch):
    import crossget.tools.train.clip as train_clip

    def run(out, steps):
        model = make_clip()
        crossget.patch(model, r=2, method="crossget", towers=("vision",))
        return train_cross_tokens(model, tiny_pairs(), out, steps=steps, batch_size=8, lr=0.05, checkpoint_every=1,
                                  progress=False)

    run(tmp_path / "two", 2)
    calls = []

    def nan_on_the_third(model):
        calls.append(1)
        loss = crossget.cross_token_loss(model)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_clip, "cross_token_loss", nan_on_the_third)
    with pytest.raises(ValueError, match="step 3 of 5 is nan"):
        run(tmp_path / "nan", 5)
    from safetensors.torch import load_file

    got, want = (load_file(tmp_path / d / "cross_tokens.safetensors") for d in ("nan", "two"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((tmp_path / "nan" / "progress.json").read_text()) == {"step": 2}


def test_cross_token_training_needs_one_batch_and_positive_finite_learning_rates(tmp_path):
    model = make_clip()
    crossget.patch(model, r=2, method="crossget", towers=("vision",))
    with pytest.raises(ValueError, match="16 images, fewer than one batch of 64"):
        train_cross_tokens(model, tiny_pairs(), tmp_path / "big", batch_size=64, progress=False)
    assert not (tmp_path / "big").exists()
    for bad in (dict(lr=-1.0), dict(lr=float("nan")), dict(lr=0.0), dict(weights_lr=float("inf"))):
        with pytest.raises(ValueError, match="positive finite"):
            train_cross_tokens(model, tiny_pairs(), tmp_path / "lr", batch_size=8, progress=False, **bad)
    with pytest.raises(ValueError, match="cross_weight"):
        train_cross_tokens(model, tiny_pairs(), tmp_path / "w", batch_size=8, cross_weight=float("nan"))


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "-1"], ["train", "--lr", "nan"], ["train", "--lr", "inf"], ["train", "--lr", "0"],
    ["train", "--lr", "fast"], ["train", "--weights-lr=-1e-4"], ["train", "--weights-lr", "nan"],
    ["train", "--cross-weight", "1.5"], ["train", "--cross-weight", "-0.1"], ["train", "--cross-weight", "nan"],
    ["train-base", "--lr", "nan"], ["train-base", "--lr", "-1"],
])
def test_the_training_commands_refuse_bad_learning_rates_and_weights(argv, capsys, tmp_path):
    from crossget.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert f"argument {argv[1].split('=')[0]}: expected a" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_learning_rate_and_weight_argument_types():
    import argparse

    from crossget.tools.cli.options import positive_float, unit_float

    assert positive_float("1e-3") == 1e-3 and unit_float("0") == 0.0 and unit_float("1") == 1.0
    for bad in ("0", "-1", "nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)
    for bad in ("-0.01", "1.01", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            unit_float(bad)
