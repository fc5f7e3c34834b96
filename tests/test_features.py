"""The real-feature sweep (crossget eval features): its metrics against naive definitions, and one
tiny end-to-end run on images and labels it writes itself."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_vit import make
from transformers import BitImageProcessor

from crossget.tools.eval.features import (
    VARIANTS,
    FeatureSet,
    feature_sweep,
    knn_accuracy,
    load_feature_set,
    metrics_of,
    retention,
    sweep_table,
    write_sweep,
)


def naive_knn(emb, labels, k):
    e = emb / emb.norm(dim=-1, keepdim=True)
    right = 0
    for i in range(len(e)):
        sims = sorted(((float(e[i] @ e[j]), j) for j in range(len(e)) if j != i), reverse=True)[:k]
        votes = {}
        for _, j in sims:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0) + 1
        top = max(votes.values())
        pred = next(int(labels[j]) for _, j in sims if votes[int(labels[j])] == top)  # ties: the nearest
        right += pred == int(labels[i])
    return 100 * right / len(e)


def naive_retention(emb, ref, k):
    def nn_sets(x):
        x = x / x.norm(dim=-1, keepdim=True)
        return [set(sorted(range(len(x)), key=lambda j: -float(x[i] @ x[j]) if j != i else 1e9)[:k])
                for i in range(len(x))]

    return float(np.mean([len(a & b) / k for a, b in zip(nn_sets(emb), nn_sets(ref))]))


def test_knn_and_retention_match_naive_definitions():
    g = torch.Generator().manual_seed(0)
    emb, ref = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    for k in (1, 4, 10):
        assert knn_accuracy(emb, labels, k) == pytest.approx(naive_knn(emb, labels, k))
        assert retention(emb, ref, k) == pytest.approx(naive_retention(emb, ref, k))
    assert retention(ref, ref) == 1.0


def test_retrieval_within_a_half_uses_only_its_images_and_captions():
    # 4 images, 2 captions each, embeddings chosen so that every caption finds its image
    img = torch.eye(4)
    txt = torch.eye(4).repeat_interleave(2, 0)
    fs = FeatureSet(paths=[None] * 4, labels=torch.tensor([0, 0, 1, 1]), txt2img=torch.arange(4).repeat_interleave(2),
                    img2txts=[[0, 1], [2, 3], [4, 5], [6, 7]], captions=["c"] * 8)
    out = {"pooled": img, "patch": torch.ones(4), "image": img}
    m = metrics_of(out, out, fs, torch.tensor([1, 3]), txt)
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0 and m["pooled_fidelity"] == pytest.approx(1.0)


@pytest.fixture
def image_set(tmp_path):
    rng = np.random.default_rng(0)
    images, classes = [], []
    for i in range(24):
        name = f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append({"filepath": "", "filename": name, "imgid": i, "split": "test", "sentids": [i],
                       "sentences": [{"raw": f"picture {i}", "tokens": ["picture", str(i)], "imgid": i, "sentid": i}]})
        classes.append({"filepath": "", "filename": name, "split": "test", "label": i % 3})
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    (tmp_path / "c.json").write_text(json.dumps({"label_names": ["a", "b", "c"], "images": classes}))
    return tmp_path


def test_a_tiny_sweep_end_to_end(image_set, tmp_path):
    fs = load_feature_set(image_set / "d.json", image_set / "c.json")
    assert len(fs.paths) == 24 and fs.labels.tolist()[:4] == [0, 1, 2, 0]
    model = make("dinov2", layers=3)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    variants = ["tome", "reference", "standardised-0.5", "attention"]
    res = feature_sweep(model, processor, fs, levels=[0.7], variants=variants, image_size=32, batch_size=10,
                        calibrated=["tome"], calibration=fs.paths[:6], calibration_evals=6, progress=False)
    rows = {r["name"]: r for r in res["results"]}
    assert list(rows)[0] == "unreduced" and len(rows) == 2 + len(variants)
    cal = rows["tome+calibrated flops=0.7"]
    assert cal["settings"]["schedule"] == "calibrated" and cal["gflops_ratio"] <= rows["tome flops=0.7"]["gflops_ratio"] + 0.01
    ref = rows["unreduced"]
    assert ref["pooled_fidelity"] == pytest.approx(1.0) and ref["nn10_retention"] == 1.0
    for v in variants:
        r = rows[f"{v} flops=0.7"]
        assert r["gflops_ratio"] < 0.8  # measured by the FLOPs counter, near the 0.7 target
        assert 0 < r["pooled_fidelity"] < 1 and 0 < r["patch_fidelity"] < 1
        assert set(r["half_a"]) == set(r["half_b"]) >= {"knn_acc", "nn10_retention"}
    paths = write_sweep(res, tmp_path / "out")
    assert all(p.is_file() for p in paths) and "| tome flops=0.7 |" in sweep_table(res)


def test_unknown_variants_and_unlabelled_images_are_refused(image_set):
    fs = load_feature_set(image_set / "d.json", image_set / "c.json")
    with pytest.raises(ValueError, match="unknown variants"):
        feature_sweep(make("dinov2"), None, fs, variants=["bogus"])
    doc = json.loads((image_set / "c.json").read_text())
    doc["images"] = doc["images"][1:]
    (image_set / "c.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no label"):
        load_feature_set(image_set / "d.json", image_set / "c.json")
    assert "reference" in VARIANTS and VARIANTS["reference"]["guidance"] == "reference"
