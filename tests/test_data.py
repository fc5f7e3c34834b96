"""crossget.tools.data: the shapes generator (determinism, format, hard negatives), the Karpathy loader, the tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossget.tools.data.karpathy import PairCollator, PairDataset, load_karpathy, processor_parts, twin_pairs
from crossget.tools.data.shapes import (
    NUMBERS,
    POSITIONS,
    RELATIONS,
    VARIANTS,
    Entity,
    _cap_absolute,
    _cap_counting,
    _cap_mixed,
    _cap_relation,
    generate_dataset,
    holds,
    make_captions,
    render_scene,
    sample_family,
    tokenize,
)
from crossget.tools.data.tokenizer import build_word_tokenizer

SIZE = 64
TEMPLATES = (_cap_absolute, _cap_relation, _cap_mixed, _cap_counting)


def _generate(root: Path, seed: int = 0, n_train: int = 9, n_test: int = 9) -> Path:
    return generate_dataset(root, n_train, 3, n_test, image_size=SIZE, seed=seed)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def data(shapes) -> dict:
    return json.loads(shapes.read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


# ------------------------------------------------------------------------------------------ generator
def test_same_seed_identical_bytes_other_seed_differs(shapes, tmp_path):
    again = _generate(tmp_path / "again")
    assert again.read_bytes() == shapes.read_bytes()
    assert _files(again.parent) == _files(shapes.parent)
    other = _generate(tmp_path / "other", seed=1)
    assert other.read_bytes() != shapes.read_bytes()
    a, b = _files(other.parent), _files(shapes.parent)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_workers_write_the_same_files(tmp_path):
    # 10 and 7 images: the last family of those splits is cut, which the parallel path makes again
    one = generate_dataset(tmp_path / "one", 10, 3, 7, image_size=SIZE, seed=3)
    two = generate_dataset(tmp_path / "two", 10, 3, 7, image_size=SIZE, seed=3, workers=2)
    assert one.read_bytes() == two.read_bytes()
    assert _files(one.parent) == _files(two.parent)
    with pytest.raises(ValueError, match="workers"):
        generate_dataset(tmp_path / "bad", 1, 0, 0, image_size=SIZE, workers=0)


def test_test_split_does_not_depend_on_train_size(data, tmp_path):
    bigger = json.loads(_generate(tmp_path, n_train=15).read_text())
    test = lambda d: [(im["objects"], [s["raw"] for s in im["sentences"]]) for im in d["images"] if im["split"] == "test"]
    assert test(bigger) == test(data)


def test_karpathy_format(data, shapes):
    assert data["dataset"] == "shapes" and len(data["images"]) == 21
    sentids = []
    for n, im in enumerate(data["images"]):
        assert im["imgid"] == n and im["filepath"] == "images"
        assert im["split"] in ("train", "val", "test")
        assert (shapes.parent / im["filepath"] / im["filename"]).is_file()
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == n and s["tokens"] == tokenize(s["raw"]) and s["raw"] == s["raw"].strip()
        sentids += im["sentids"]
    assert sentids == list(range(len(sentids)))
    assert [im["split"] for im in data["images"]] == ["train"] * 9 + ["val"] * 3 + ["test"] * 9


def test_families_are_twins_in_one_split(data):
    families: dict[int, list[dict]] = {}
    for im in data["images"]:
        families.setdefault(im["family"], []).append(im)
    for members in families.values():
        assert len({m["split"] for m in members}) == 1
        assert members[0]["variant"] == "base" and all(m["variant"] in VARIANTS for m in members[1:])
        scenes = [json.dumps(m["objects"], sort_keys=True) for m in members]
        assert len(set(scenes)) == len(scenes)
        captions = [s["raw"] for m in members for s in m["sentences"]]
        assert len(set(captions)) == len(captions)  # no caption fits two twins verbatim


def test_captions_name_every_entity_with_count(data):
    relation_words = {w for options in RELATIONS.values() for w in options}
    position_words = {w for options in POSITIONS.values() for w in options}
    with_relation = 0
    for im in data["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        for raw in raws:
            for e in im["objects"]:
                assert e["colour"] in raw and e["shape"][:4] in raw
                if e["count"] > 1:
                    assert f"{NUMBERS[e['count']]} " in raw
                if e["size"] == "large":
                    assert any(t in raw for t in ("plain", "solid", "striped", "dotted", "spotted"))
            assert any(p in raw for p in relation_words | position_words)
        with_relation += any(f" {r} " in raw for raw in raws for r in relation_words)
    assert with_relation == len(data["images"])


# ------------------------------------------------------------------------------------- captions, claims
SCENE = (
    Entity("circle", "red", "large", 1, "striped", 1, 0),
    Entity("square", "blue", "small", 3, "plain", 1, 2),
)


def test_relation_words_follow_the_grid():
    rng = np.random.default_rng(0)
    text, claims = _cap_relation(list(SCENE), rng)
    assert text.startswith("a large") or text.startswith("one large") or text.startswith("a big") or text.startswith("one big")
    assert "left of three" in text and "blue squares" in text
    assert claims == (("rel", SCENE[0].desc, 0, -1, SCENE[1].desc),)
    text, _ = _cap_relation(list(SCENE[::-1]), rng)
    assert text.startswith("three") and "right of" in text


@pytest.mark.parametrize("seed", range(5))
def test_every_template_is_true_of_its_scene_and_twins_are_told_apart(seed):
    rng = np.random.default_rng(seed)
    family = sample_family(rng, size=len(VARIANTS) + 1)
    scenes = [s for s, _ in family]
    for scene in scenes:
        for template in TEMPLATES:
            assert holds(template(list(scene), rng), scene)
    for k, scene in enumerate(scenes):
        others = scenes[:k] + scenes[k + 1 :]
        captions = make_captions(scene, others, rng)
        assert len(set(captions)) == 5
    # the absolute template always separates distinct scenes
    for a in scenes:
        for b in scenes:
            if a is not b:
                assert not holds(_cap_absolute(list(a), rng), b)


def test_swap_twin_is_false_under_the_base_relation():
    swapped = (SCENE[0].__class__(**{**SCENE[0].__dict__, "col": 2}), SCENE[1].__class__(**{**SCENE[1].__dict__, "col": 0}))
    caption = _cap_relation(list(SCENE), np.random.default_rng(0))
    assert holds(caption, SCENE) and not holds(caption, swapped)


@pytest.mark.parametrize("texture", ["striped", "dotted"])
def test_textures_keep_the_mean_colour(texture):
    """Averaging the patches of a textured shape gives the plain shape: only fine detail tells them apart."""
    plain = (Entity("square", "green", "large", 1, "plain", 1, 1),)
    striped = (Entity("square", "green", "large", 1, texture, 1, 1),)
    a = render_scene(plain, 96, np.random.default_rng(3), noise=0, max_distractors=0).astype(float)
    b = render_scene(striped, 96, np.random.default_rng(3), noise=0, max_distractors=0).astype(float)
    inside, around = (slice(42, 54), slice(42, 54)), (slice(28, 68), slice(28, 68))  # within / around the square
    assert np.abs(a - b)[inside].mean() > 30  # very different pixels
    assert np.abs(a[around].mean(axis=(0, 1)) - b[around].mean(axis=(0, 1))).max() < 1.0  # same mean colour


def test_object_scale_and_clutter_cover_more_patches():
    """The harder-data knobs: larger shapes cover more pixels; clutter adds specks in the shapes' colours."""
    scene = (Entity("circle", "red", "large", 1, "plain", 0, 0), Entity("square", "blue", "small", 3, "plain", 2, 2))

    def draw(scale: float = 1.0, clutter: int = 0) -> np.ndarray:
        return render_scene(scene, 96, np.random.default_rng(5), noise=0, max_distractors=0,
                            object_scale=scale, clutter=clutter).astype(float)

    def bright(img: np.ndarray) -> int:  # background is dark (< 110), shapes and clutter are not
        return int((img.max(axis=2) > 110).sum())

    plain, big, cluttered = draw(), draw(scale=1.25), draw(clutter=30)
    assert bright(big) > 1.4 * bright(plain)
    assert bright(plain) < bright(cluttered) < bright(plain) + 30 * 9  # specks are 1-3 px a side
    # the specks are hues of the palette, not grey
    extra = (cluttered.max(axis=2) > 110) & (plain.max(axis=2) <= 110)
    assert (cluttered[extra].max(axis=1) - cluttered[extra].min(axis=1)).mean() > 40


def test_three_entities_every_scene(tmp_path):
    images = json.loads(generate_dataset(tmp_path, 6, 0, 3, image_size=48, n_entities=(3, 3)).read_text())["images"]
    assert {len(im["objects"]) for im in images} == {3}


def test_json_records_the_generator_settings(data, tmp_path):
    assert data["generator"] == {"seed": 0, "image_size": SIZE, "family_size": 3, "n_entities": [2, 3], "captions_per_image": 5,
                                 "noise": 4.0, "max_distractors": 4, "object_scale": 1.0, "clutter": 0}
    # what is recorded is enough to make the same files again
    first = generate_dataset(tmp_path / "a", 4, 0, 3, image_size=48, seed=2, object_scale=1.1, clutter=3, n_entities=(3, 3))
    recorded = json.loads(first.read_text())["generator"]
    again = generate_dataset(tmp_path / "b", 4, 0, 3, **recorded)
    assert again.read_bytes() == first.read_bytes() and _files(again.parent) == _files(first.parent)


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_dataset(tmp_path, 1, 0, 0, image_size=16)
    with pytest.raises(ValueError, match="n_entities"):
        generate_dataset(tmp_path, 1, 0, 0, n_entities=(1, 3))
    with pytest.raises(ValueError, match="object_scale"):
        generate_dataset(tmp_path, 1, 0, 0, object_scale=1.5)
    with pytest.raises(ValueError, match="clutter"):
        generate_dataset(tmp_path, 1, 0, 0, clutter=-1)


# -------------------------------------------------------------------------------------------- loader
def test_loader_reads_generated_data_back(shapes, data):
    split = load_karpathy(shapes, split="test")
    test = [im for im in data["images"] if im["split"] == "test"]
    assert len(split) == split.n_images == 9 and split.n_texts == 45
    assert split.image_paths[0] == shapes.parent / "images" / test[0]["filename"]
    assert split.captions == [s["raw"] for im in test for s in im["sentences"]]
    assert torch.equal(split.txt2img, torch.arange(9).repeat_interleave(5))
    assert split.img2txts == [list(range(5 * i, 5 * i + 5)) for i in range(9)]
    assert split.families.tolist() == [im["family"] for im in test]
    base, twin, variants = twin_pairs(split)
    assert len(variants) == 6 and set(variants) <= set(VARIANTS)
    assert torch.equal(split.families[base], split.families[twin])
    assert len(load_karpathy(shapes, split=("train", "val"))) == 12
    assert len(load_karpathy(shapes, split="train", limit=4)) == 4
    # a second, disjoint subset: images after the first ones, captions renumbered from 0
    rest = load_karpathy(shapes, split="test", skip=6, limit=2)
    assert rest.image_paths == split.image_paths[6:8] and rest.captions == split.captions[30:40]
    assert torch.equal(rest.txt2img, torch.arange(2).repeat_interleave(5))
    assert len(load_karpathy(shapes, split="test", skip=20)) == 0
    with pytest.raises(ValueError, match="skip"):
        load_karpathy(shapes, split="test", skip=-1)


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


def test_flickr_and_coco_layouts(tmp_path):
    sent = lambda k: [{"raw": f" caption {j} ", "tokens": ["caption"]} for j in range(k)]
    _image(tmp_path / "flickr30k-images" / "1.jpg")
    entry = {"filename": "1.jpg", "split": "test", "sentences": sent(5)}
    flickr = _write(tmp_path / "dataset_flickr30k.json", {"images": [entry]})
    split = load_karpathy(flickr, image_root=tmp_path / "flickr30k-images")
    assert split.image_paths == [tmp_path / "flickr30k-images" / "1.jpg"] and split.captions[0] == "caption 0"
    assert split.families is None and twin_pairs(split)[2] == []
    _image(tmp_path / "coco" / "val2014" / "a.jpg")
    _image(tmp_path / "coco" / "val2014" / "b.jpg")
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "train", "sentences": sent(5)},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": sent(7)},
    ]
    coco = _write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    split = load_karpathy(coco, image_root=tmp_path / "coco", split="train")
    assert len(split) == 2 and split.n_texts == 10  # restval joins train; 5 captions per image
    assert load_karpathy(coco, image_root=tmp_path / "coco", split="train", captions_per_image=None).n_texts == 12


def test_loader_errors_name_the_path(tmp_path, shapes):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(missing)
    bad = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ValueError, match="bad.json.*invalid JSON"):
        load_karpathy(bad)
    with pytest.raises(ValueError, match=r'keys.json.*"images"'):
        load_karpathy(_write(tmp_path / "keys.json", {"annotations": []}))
    entry = {"filename": "x.png", "split": "test"}
    with pytest.raises(ValueError, match=r'nosent.json.*images\[0\] has no "sentences"'):
        load_karpathy(_write(tmp_path / "nosent.json", {"images": [entry]}))
    with pytest.raises(ValueError, match=r"split 'testing' not in .*dataset_shapes.json.*\['test', 'train', 'val'\]"):
        load_karpathy(shapes, split="testing")
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images .*x.png"):
        load_karpathy(_write(tmp_path / "noimg.json", {"images": [{**entry, "sentences": [{"raw": "a"}]}]}))
    assert load_karpathy(tmp_path / "noimg.json", check_images=False).image_paths == [tmp_path / "x.png"]


# ------------------------------------------------------------------------------- tokenizer, processing
def test_word_tokenizer_covers_the_captions(shapes):
    split = load_karpathy(shapes, split="train")
    tok = build_word_tokenizer(split.captions, max_length=48)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    enc = tok(split.captions, padding=True, return_tensors="pt")
    assert (enc["input_ids"] != tok.unk_token_id).all()
    assert (enc["input_ids"][:, 0] == 2).all() and ((enc["input_ids"] == 3).sum(1) == 1).all()
    lengths = enc["attention_mask"].sum(1)
    assert torch.equal(enc["input_ids"][torch.arange(len(lengths)), lengths - 1], torch.full_like(lengths, 3))
    assert build_word_tokenizer(split.captions[::-1]).get_vocab() == tok.get_vocab()  # order-free vocabulary
    short = tok(split.captions[:1], truncation=True, max_length=6)["input_ids"][0]
    assert len(short) == 6 and short[-1] == 3


def test_pair_collator_uses_the_processor(shapes):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    split = load_karpathy(shapes, split="val")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = (images, build_word_tokenizer(split.captions))
    assert processor_parts(processor) == processor
    with pytest.raises(TypeError, match="image_processor"):
        processor_parts(object())
    data = PairDataset(split)
    batch = PairCollator(processor, max_length=40)([data[t] for t in (0, 5, 14)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 40)
    assert batch["image_index"].tolist() == [0, 1, 2]


def test_scene_targets_name_each_cell():
    from crossget.tools.data.shapes import COLOURS, SCENE_CLASSES, SHAPES, scene_targets

    scene = [{"shape": "cross", "colour": "red", "size": "small", "count": 3, "texture": "plain", "row": 2, "col": 1},
             {"shape": "circle", "colour": "cyan", "size": "large", "count": 1, "texture": "dotted", "row": 0, "col": 0}]
    t = scene_targets([scene, []])
    assert t.shape == (2, 9, len(SCENE_CLASSES)) and not t[1].any()
    assert t[0, 7].tolist() == [list(COLOURS).index("red") + 1, SHAPES.index("cross") + 1, 1, 1, 3]
    assert t[0, 0].tolist() == [list(COLOURS).index("cyan") + 1, SHAPES.index("circle") + 1, 2, 3, 1]
    assert (t[0, [1, 2, 3, 4, 5, 6, 8]] == 0).all()
    assert (t.max(axis=(0, 1)) < np.array(SCENE_CLASSES)).all()
    with pytest.raises(ValueError, match="bad object"):
        scene_targets([[{**scene[0], "colour": "mauve"}]])
    with pytest.raises(ValueError, match="grid"):
        scene_targets([[{**scene[0], "row": 3}]])


def test_loader_keeps_the_scenes(shapes, data):
    split = load_karpathy(shapes, split="test")
    assert split.scenes == [e["objects"] for e in data["images"] if e["split"] == "test"]
