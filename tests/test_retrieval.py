"""crossget.tools.eval.retrieval: Recall@K on hand-made similarities, ties, twin accuracy, fidelity, end to end."""

import pytest
import torch

from crossget.tools.data.karpathy import RetrievalSplit, load_karpathy, preprocess
from crossget.tools.data.shapes import generate_dataset
from crossget.tools.data.tokenizer import build_word_tokenizer
from crossget.tools.eval import retrieval
from crossget.tools.eval.retrieval import (
    encode,
    encode_split,
    evaluate,
    fidelity,
    retrieval_metrics,
    retrieval_ranks,
    twin_accuracy,
)

# 3 images x 2 captions: image 0 is found by its 2nd caption only; t2 and t3 tie with a wrong image
TXT2IMG = torch.tensor([0, 0, 1, 1, 2, 2])
IMG2TXTS = [[0, 1], [2, 3], [4, 5]]
SIM = torch.tensor(
    [
        [0.1, 0.9, 0.5, 0.2, 0.0, 0.3],
        [0.8, 0.1, 0.7, 0.2, 0.3, 0.6],
        [0.9, 0.8, 0.7, 0.6, 0.1, 0.2],
    ]
)


def test_ranks_by_hand():
    i2t, t2i = retrieval_ranks(SIM, TXT2IMG, IMG2TXTS)
    assert i2t.tolist() == [0, 1, 4]  # best own caption; 2nd caption of image 0 is first
    assert t2i.tolist() == [2, 0, 1, 2, 1, 2]  # pessimistic: a tie with a wrong image is a miss
    assert retrieval_ranks(SIM, TXT2IMG, IMG2TXTS, ties="optimistic")[1].tolist() == [2, 0, 0, 1, 1, 2]


def test_metrics_by_hand():
    m = retrieval_metrics(SIM, TXT2IMG, IMG2TXTS)
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r5"] == m["i2t_r10"] == 100
    assert m["t2i_r1"] == pytest.approx(100 / 6) and m["t2i_r5"] == 100
    assert m["mean_r1"] == pytest.approx(25.0)
    assert m["r_mean"] == pytest.approx((100 / 3 + 100 / 6 + 400) / 6)
    assert retrieval_metrics(SIM, TXT2IMG, IMG2TXTS, ties="optimistic")["t2i_r1"] == pytest.approx(100 / 3)


def test_ties_constant_similarity():
    flat = torch.zeros(3, 6)
    m = retrieval_metrics(flat, TXT2IMG, IMG2TXTS)
    assert m["i2t_r1"] == m["t2i_r1"] == 0 and m["i2t_r5"] == m["t2i_r5"] == 100  # ranks 4 and 2
    assert retrieval_metrics(flat, TXT2IMG, IMG2TXTS, ties="optimistic")["mean_r1"] == 100


def test_perfect_retrieval():
    sim = torch.eye(3).repeat_interleave(2, dim=1)
    assert all(v == 100 for v in retrieval_metrics(sim, TXT2IMG, IMG2TXTS).values())


def _naive(sim, txt2img, img2txts):
    """The Karpathy/VSE loop: rank of the best ground truth in a sorted list."""
    i2t = [min((sim[i].argsort(descending=True, stable=True) == t).nonzero().item() for t in ts) for i, ts in enumerate(img2txts)]
    t2i = [(sim[:, t].argsort(descending=True, stable=True) == txt2img[t]).nonzero().item() for t in range(sim.shape[1])]
    return i2t, t2i


def test_matches_naive_loop_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 7, (23,), generator=g)  # 1..6 captions per image
    txt2img = torch.arange(23).repeat_interleave(counts)
    txt2img = txt2img[torch.randperm(len(txt2img), generator=g)]  # captions in any order
    img2txts = [(txt2img == i).nonzero().flatten().tolist() for i in range(23)]
    sim = torch.randn(23, len(txt2img), generator=g)
    expected = _naive(sim, txt2img, img2txts)
    monkeypatch.setattr(retrieval, "CHUNK", 4)
    for ties in ("pessimistic", "optimistic"):
        i2t, t2i = retrieval_ranks(sim, txt2img, img2txts, ties)
        assert (i2t.tolist(), t2i.tolist()) == expected


def test_metric_errors():
    with pytest.raises(ValueError, match="n_images, n_texts"):
        retrieval_metrics(SIM.T, TXT2IMG, IMG2TXTS)
    with pytest.raises(ValueError, match="exactly once"):
        retrieval_metrics(SIM, TXT2IMG, [[0, 1], [2, 3], [4, 4]])
    with pytest.raises(ValueError, match="exactly once"):
        retrieval_metrics(SIM, torch.tensor([0, 0, 1, 1, 2, 1]), IMG2TXTS)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(SIM.masked_fill(SIM > 0.8, float("nan")), TXT2IMG, IMG2TXTS)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(SIM, TXT2IMG, IMG2TXTS, ties="random")


def test_twin_accuracy_by_hand():
    split = RetrievalSplit(
        image_paths=[None] * 4,
        captions=["a", "b", "c", "d"],
        txt2img=torch.arange(4),
        img2txts=[[0], [1], [2], [3]],
        families=torch.tensor([0, 0, 1, 1]),
        variants=["base", "swap", "base", "count"],
    )
    sim = torch.eye(4)
    sim[2:, 2:] = 0.5  # family 1: image and caption similarities all tie
    m = twin_accuracy(sim, split)
    assert m["twin_t2i_swap"] == m["twin_i2t_swap"] == 100
    assert m["twin_t2i_count"] == m["twin_i2t_count"] == 50
    assert m["twin_t2i"] == m["twin_i2t"] == m["twin_mean"] == 75
    split.families = None
    assert twin_accuracy(sim, split) == {}


def test_fidelity():
    x = torch.randn(5, 8)
    assert fidelity(x, x.clone()) == pytest.approx(1.0)
    assert fidelity(-x, x) == pytest.approx(-1.0)
    assert fidelity(3 * x, x) == pytest.approx(1.0)  # direction only
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(x, x[:4])


# -------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A few generated test images, a word tokenizer over their captions and a tiny random CLIPModel."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = generate_dataset(tmp_path_factory.mktemp("shapes"), 0, 0, 6, image_size=48, seed=0)
    split = load_karpathy(path, split="test")
    tok = build_word_tokenizer(split.captions, max_length=48)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tok)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=48,
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), split, processor


def test_encode_split_end_to_end(tiny):
    torch.set_num_threads(1)
    model, split, processor = tiny
    img, txt = encode_split(model, split, processor, batch_size=4, progress=False)
    assert img.shape == (6, 16) and txt.shape == (30, 16) and img.dtype == txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(6)) and torch.allclose(txt.norm(dim=-1), torch.ones(30))
    m = retrieval_metrics(img @ txt.T, split.txt2img, split.img2txts)
    assert set(m) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1", "r_mean"}
    assert all(0 <= v <= 100 for v in m.values()) and m["t2i_r10"] == 100  # only 6 images
    # the same embeddings from preprocessed tensors padded to a fixed length
    emb = encode(model, preprocess(split, processor, max_length=48, progress=False), batch_size=5, progress=False)
    assert torch.allclose(emb["image"], img, atol=1e-5) and torch.allclose(emb["text"], txt, atol=1e-5)
    assert emb["image_seconds"] > 0
    full = evaluate(model, split, processor, batch_size=8, progress=False)
    assert full["mean_r1"] == m["mean_r1"] and 0 <= full["twin_mean"] <= 100


def test_encode_split_with_merging(tiny):
    import crossget

    torch.set_num_threads(1)
    model, split, processor = tiny
    ref, _ = encode_split(model, split, processor, progress=False)
    crossget.patch(model, r=4)
    try:
        img, _ = encode_split(model, split, processor, progress=False)
    finally:
        crossget.unpatch(model)
    assert 0 < fidelity(img, ref) < 1
