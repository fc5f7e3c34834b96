"""A patched model's checkpoint is a stock checkpoint (issue 16, finding 4): no cross tokens
in ``state_dict()`` / ``save_pretrained``, strict loads both ways, trained cross tokens
travel in their own file."""

import torch
from conftest import make_clip
from test_blip import make_blip
from transformers import BlipForImageTextRetrieval, CLIPModel

import crossget


def test_state_dict_has_no_cross_tokens_and_loads_strictly_both_ways(tmp_path):
    model = make_clip()
    stock_keys = set(model.state_dict())
    crossget.patch(model, r=2, towers=("vision", "text"))
    with torch.no_grad():
        for st in crossget.states(model).values():
            st.cross_tokens.normal_()
    assert set(model.state_dict()) == stock_keys
    stock = make_clip(seed=1)
    stock.load_state_dict(model.state_dict(), strict=True)  # patched -> stock
    theta = {k: s.cross_tokens.detach().clone() for k, s in crossget.states(model).items()}
    model.load_state_dict(make_clip(seed=2).state_dict(), strict=True)  # stock -> patched: theta kept
    for kind, st in crossget.states(model).items():
        assert torch.equal(st.cross_tokens, theta[kind])
    # the cross tokens are still parameters (optimizers and accelerate see them)
    assert sum(p is s.cross_tokens for p in model.parameters() for s in crossget.states(model).values()) == 2


def test_save_pretrained_gives_a_stock_checkpoint_and_the_tokens_their_own_file(tmp_path):
    model = make_clip()
    crossget.patch(model, r=2, towers=("vision", "text"))
    with torch.no_grad():
        for st in crossget.states(model).values():
            st.cross_tokens.normal_()
    model.save_pretrained(tmp_path / "model")
    crossget.save_cross_tokens(model, tmp_path / "cross_tokens.safetensors")
    loaded, info = CLIPModel.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    crossget.load_cross_tokens(loaded, tmp_path / "cross_tokens.safetensors")
    for kind, st in crossget.states(loaded).items():
        assert torch.equal(st.cross_tokens, crossget.states(model)[kind].cross_tokens)


def test_blip_checkpoint_is_stock_too():
    model = make_blip(BlipForImageTextRetrieval)
    keys = set(model.state_dict())
    crossget.patch(model, r=2, towers=("vision", "text"))
    assert set(model.state_dict()) == keys
    make_blip(BlipForImageTextRetrieval, seed=1).load_state_dict(model.state_dict(), strict=True)


def test_llava_checkpoint_is_stock_too():
    from test_llava import make_llava

    model = make_llava()
    keys = set(model.state_dict())
    crossget.patch(model, keep=20, method="crossget")  # cross tokens in the tower and in the LM
    assert set(model.state_dict()) == keys
    make_llava(seed=1).load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(make_llava(seed=2).state_dict(), strict=True)
