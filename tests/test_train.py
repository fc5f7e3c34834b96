"""Cross-token training through accelerate: loss goes down, only theta moves, resume works."""

import torch
from conftest import make_clip, make_texts

import crossget
from crossget.train import PairData, _one_caption_per_image, train_cross_tokens


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


def test_cross_token_training_resumes(tmp_path):
    model = make_clip()
    crossget.patch(model, r=4, method="crossget", towers=("vision", "text"))
    train_cross_tokens(model, tiny_pairs(), tmp_path, steps=4, batch_size=8, checkpoint_every=2, progress=False)
    again = make_clip()
    crossget.patch(again, r=4, method="crossget", towers=("vision", "text"))
    again, log = train_cross_tokens(again, tiny_pairs(), tmp_path, steps=6, batch_size=8, progress=False)
    assert log["resumed_at"] == 4 and len(log["loss"]) == 2
