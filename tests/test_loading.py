"""Loading cross tokens (crossget.load_cross_tokens, crossget.apply, the CLI's --cross-tokens): an error
names the file and what does not match it, and a failed load leaves the model exactly as it was."""

import json
import re

import pytest
import torch
from conftest import make_clip, save_shapes_clip, tiny_clip_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

import crossget


def trained(model, **settings):
    """``model`` patched with crossget (vision tower by default) and random "trained" cross tokens."""
    crossget.patch(model, **{"r": 2, "method": "crossget", "towers": ("vision",), **settings})
    with torch.no_grad():
        for st in crossget.states(model).values():
            if st.cross_tokens is not None:
                st.cross_tokens.normal_()
    return model


def saved(model, path):
    crossget.save_cross_tokens(model, path)
    return path


def rewrite(path, out, metadata=None, tensors=None):
    """A copy of the cross-token file ``path`` with its metadata and tensors changed."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(metadata or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors if tensors is not None else load_file(str(path)), str(out), metadata=meta)
    return out


def snapshot(model):
    """What a load must not change: patched or not, the configuration, every cross token."""
    patched = crossget.is_patched(model)
    cfg = crossget.config(model) if patched else None
    thetas = {n: p.detach().clone() for n, p in model.named_parameters() if "crossget" in n}
    return patched, cfg, thetas


def assert_unchanged(model, before):
    patched, cfg, thetas = snapshot(model)
    assert patched == before[0]
    assert cfg == before[1]
    assert thetas.keys() == before[2].keys()
    assert all(torch.equal(thetas[n], before[2][n]) for n in thetas)
    if not patched:  # the stock classes
        assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())


PRIOR_STATES = {
    "stock": lambda m: m,
    "tome": lambda m: crossget.patch(m, r=1, method="tome"),
    "crossget-trained": lambda m: trained(m, r=[1, 1, 0]),
}


@pytest.fixture(params=sorted(PRIOR_STATES))
def prior(request):
    """A tiny CLIPModel in one of the states a load can start from."""
    return PRIOR_STATES[request.param](make_clip(seed=3))


def test_a_saved_file_records_the_model_class_and_family(tmp_path):
    path = saved(trained(make_clip()), tmp_path / "x.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "crossget.cross_tokens.v1"
    assert meta["model_class"] == "CLIPModel" and meta["family"] == "CLIP"
    assert json.loads(meta["config"])["r"] == {"vision": [2, 2, 2]}


def test_an_older_file_without_model_class_or_family_still_loads(tmp_path):
    model = trained(make_clip())
    old = rewrite(saved(model, tmp_path / "new.safetensors"), tmp_path / "old.safetensors",
                  metadata={"model_class": None, "family": None})
    with safe_open(str(old), framework="pt") as f:
        assert set(f.metadata()) == {"format", "config"}
    other = crossget.load_cross_tokens(make_clip(seed=1), old)
    assert crossget.config(other) == crossget.config(model)
    for kind, st in crossget.states(model).items():
        assert torch.equal(crossget.states(other)[kind].cross_tokens, st.cross_tokens)


@pytest.mark.parametrize("content", ["empty", "junk", "truncated", "header only"])
def test_a_corrupt_empty_or_truncated_file_is_a_value_error_that_names_it(tmp_path, prior, content):
    good = saved(trained(make_clip()), tmp_path / "good.safetensors").read_bytes()
    data = {"empty": b"", "junk": b"these are not the bytes you are looking for",
            "truncated": good[:-40], "header only": good[:30]}[content]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    before = snapshot(prior)
    with pytest.raises(ValueError, match=re.escape(str(bad))) as e:
        crossget.load_cross_tokens(prior, bad)
    assert "corrupt" in str(e.value) or "not a" in str(e.value)
    assert_unchanged(prior, before)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        crossget.apply(prior, {"method": "crossget", "r": 1}, cross_tokens=bad)
    assert_unchanged(prior, before)


def test_a_file_that_is_not_a_crossget_file_says_so(tmp_path, prior):
    weights = tmp_path / "model.safetensors"
    save_file({"vision": torch.zeros(3, 32)}, str(weights), metadata={"format": "pt"})
    no_meta = tmp_path / "plain.safetensors"
    save_file({"vision": torch.zeros(3, 32)}, str(no_meta))
    before = snapshot(prior)
    for path in (weights, no_meta):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a crossget cross-token file"):
            crossget.load_cross_tokens(prior, path)
        assert_unchanged(prior, before)
    broken = rewrite(saved(trained(make_clip()), tmp_path / "x.safetensors"), tmp_path / "broken.safetensors",
                     metadata={"config": "{not json"})
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*settings"):
        crossget.load_cross_tokens(prior, broken)
    assert_unchanged(prior, before)


def test_a_file_from_a_deeper_model_names_the_layers_not_r(tmp_path, prior):
    path = saved(trained(make_clip(layers=6)), tmp_path / "deep.safetensors")
    before = snapshot(prior)
    with pytest.raises(ValueError) as e:
        crossget.load_cross_tokens(prior, path)
    msg = str(e.value)
    assert str(path) in msg and "6 layers" in msg and "3 layers" in msg and "vision" in msg
    assert "r for" not in msg and "r=" not in msg
    assert_unchanged(prior, before)
    with pytest.raises(ValueError, match="6 layers"):
        crossget.apply(prior, {"method": "crossget", "r": 1}, cross_tokens=path)
    assert_unchanged(prior, before)


def test_a_file_from_a_wider_model_names_the_widths(tmp_path, prior):
    cfg = tiny_clip_config()
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 64, 128
    torch.manual_seed(0)
    path = saved(trained(CLIPModel(cfg).eval()), tmp_path / "wide.safetensors")
    before = snapshot(prior)
    with pytest.raises(ValueError) as e:
        crossget.load_cross_tokens(prior, path)
    msg = str(e.value)
    assert str(path) in msg and "64" in msg and "32" in msg and "wide" in msg and "vision" in msg
    assert_unchanged(prior, before)


@pytest.mark.parametrize("lone", [CLIPTextModel, CLIPVisionModel])
def test_a_file_with_a_tower_the_model_lacks_names_the_tower_and_the_saved_class(tmp_path, lone):
    path = saved(trained(make_clip()), tmp_path / "clip.safetensors")  # vision patch: vision and text tokens
    sub = tiny_clip_config().text_config if lone is CLIPTextModel else tiny_clip_config().vision_config
    model = lone(sub).eval()
    missing = "vision" if lone is CLIPTextModel else "text"
    for start in ("stock", "crossget"):
        if start == "crossget":
            crossget.patch(model, r=0, method="crossget")
        before = snapshot(model)
        with pytest.raises(ValueError) as e:
            crossget.load_cross_tokens(model, path)
        msg = str(e.value)
        assert str(path) in msg and f"{missing} tower" in msg and lone.__name__ in msg and "CLIPModel" in msg
        assert_unchanged(model, before)


def test_a_file_of_another_family_names_both(tmp_path, prior):
    path = rewrite(saved(trained(make_clip()), tmp_path / "clip.safetensors"), tmp_path / "blip.safetensors",
                   metadata={"model_class": "BlipForImageTextRetrieval", "family": "BLIP"})
    before = snapshot(prior)
    with pytest.raises(ValueError) as e:
        crossget.load_cross_tokens(prior, path)
    msg = str(e.value)
    assert str(path) in msg and "BlipForImageTextRetrieval" in msg and "BLIP" in msg and "CLIPModel" in msg
    assert_unchanged(prior, before)


def test_a_file_whose_settings_give_no_cross_tokens_is_refused(tmp_path, prior):
    model = trained(make_clip())
    cfg = crossget.config(model).replace(method="tome", metric=None).to_dict()  # hand-edited
    path = rewrite(saved(model, tmp_path / "x.safetensors"), tmp_path / "tome.safetensors",
                   metadata={"config": json.dumps(cfg)})
    before = snapshot(prior)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'tome'.*no cross tokens"):
        crossget.load_cross_tokens(prior, path)
    assert_unchanged(prior, before)


def test_a_load_that_fails_after_patching_puts_everything_back(tmp_path, prior, monkeypatch):
    import crossget.io

    path = saved(trained(make_clip(), r=[2, 2, 1]), tmp_path / "x.safetensors")

    def fail(model, file):
        assert crossget.config(model).r == {"vision": (2, 2, 1)}  # patched with the file's settings
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(crossget.io, "_copy_in", fail)
    before = snapshot(prior)
    params = {n: p for n, p in prior.named_parameters() if "crossget" in n}
    with pytest.raises(RuntimeError, match="unexpected"):
        crossget.load_cross_tokens(prior, path)
    assert_unchanged(prior, before)
    # the same parameters, not copies: an optimizer holding them still trains the model
    assert all(p is params[n] for n, p in prior.named_parameters() if "crossget" in n)
    with pytest.raises(RuntimeError, match="unexpected"):
        crossget.apply(prior, {"method": "crossget", "r": [2, 2, 1]}, cross_tokens=path)
    assert_unchanged(prior, before)


def test_apply_with_tokens_for_an_unpatched_tower_changes_nothing(tmp_path, prior):
    path = saved(trained(make_clip()), tmp_path / "x.safetensors")
    before = snapshot(prior)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        crossget.apply(prior, {"method": "crossget", "r": 1, "importance": "none"}, cross_tokens=path)
    assert_unchanged(prior, before)


def test_a_good_load_after_a_failed_one_works(tmp_path, images):
    model = trained(make_clip(), r=[2, 1, 0])
    good = saved(model, tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    other = make_clip()
    with pytest.raises(ValueError):
        crossget.load_cross_tokens(other, tmp_path / "bad.safetensors")
    crossget.load_cross_tokens(other, good)
    assert crossget.config(other) == crossget.config(model)
    with torch.no_grad():
        a, b = model.get_image_features(pixel_values=images), other.get_image_features(pixel_values=images)
    assert torch.equal(a.pooler_output if hasattr(a, "pooler_output") else a,
                       b.pooler_output if hasattr(b, "pooler_output") else b)


# --------------------------------------------------------------------------- through the command
@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A tiny saved CLIPModel with its processor and a small generated data set."""
    return save_shapes_clip(tmp_path_factory.mktemp("tiny-loading"), 6, 6, image_size=48, vision_width=16,
                            vision_layers=2, projection_dim=8)


@pytest.mark.parametrize("bad", ["empty", "deeper"])
def test_the_command_turns_a_bad_cross_token_file_into_exit_2_naming_it(tiny_saved, tmp_path, capsys, bad):
    from crossget.tools.cli import main

    root, ann = tiny_saved
    path = tmp_path / f"{bad}.safetensors"
    if bad == "empty":
        path.write_bytes(b"")
    else:
        saved(trained(make_clip(layers=6)), path)
    args = ["--model", str(root / "model"), "--data", str(ann), "--threads", "1", "--batch", "6",
            "--cross-tokens", str(path)]
    for command in (["eval", "retrieval", "--method", "crossget", "--r", "1"], ["demo", "--flops", "0.9"]):
        with pytest.raises(SystemExit) as e:
            main([*command, *args, "--json", str(tmp_path / "out.json")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and str(path) in err and "Traceback" not in err


def test_apply_runs_trained_cross_tokens_with_the_guidance_they_were_trained_with(tmp_path):
    path = saved(trained(make_clip(), guidance="scaled", guidance_scale=0.3), tmp_path / "ct.safetensors")
    model = make_clip()
    crossget.apply(model, {"method": "crossget", "r": 2}, cross_tokens=path)
    assert (crossget.config(model).guidance, crossget.config(model).guidance_scale) == ("scaled", 0.3)
    crossget.apply(model, {"method": "crossget", "r": 2, "guidance": "rank", "guidance_scale": 0.5}, cross_tokens=path)
    assert crossget.config(model).guidance == "rank"  # named explicitly: as asked
