"""Real captioned pictures from Debian packages (crossget data-real), on a fake stamps tree and a tiny
colour font built here: nothing is downloaded."""

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from crossget.tools.cli import main
from crossget.tools.data import real_images as ri
from crossget.tools.data.karpathy import load_karpathy

TUX, EMOJI, NAMES = ri.PACKAGES["tuxpaint"], ri.PACKAGES["emoji"], ri.EMOJI_NAMES_PACKAGE


def noise_rgba(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    a[..., 3] = 255
    a[:4, :, 3] = 0  # a transparent band
    return Image.fromarray(a, "RGBA")


def flat_rgba(colour=(200, 30, 30), size=(30, 40)) -> Image.Image:
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (size[0] // 2, size[1]), colour + (255,)), (size[0] // 4, 0))
    return im


def stamp(folder, name, image, caption, extra="", dat=""):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption + "\n" + extra, encoding="utf-8")
    if dat:
        (folder / f"{name}.dat").write_text(dat)


def fake_tuxpaint(root):
    s = root / ri.STAMPS_DIR
    stamp(s / "animals/birds", "blackbird", noise_rgba(0), "A blackbird.", "fr.utf8=Un merle.\nen_GB.utf8=A blackbird.\n")
    stamp(s / "animals/birds", "robin", noise_rgba(1), "A colorful robin.",
          "de.utf8=Ein Rotkehlchen.\nen_GB.utf8=A colourful robin.\n")
    stamp(s / "animals/birds/cartoon", "owl", noise_rgba(2), "A cartoon owl.")
    stamp(s / "animals/mammals/dogs", "dingo", noise_rgba(3), "A dingo.")
    stamp(s / "animals/mammals/dogs", "husky", noise_rgba(4), "A husky.")
    stamp(s / "symbols/alphabets/english/outlined", "o", flat_rgba(), "The letter o.", dat="colorable\n")
    stamp(s / "symbols/alphabets/english/filled", "o", flat_rgba((0, 0, 0)), "The letter o.")
    stamp(s / "medical", "bandage", flat_rgba((220, 180, 140)), "A bandage.")
    flat_rgba().save(s / "medical/bandage_mirror.png")  # no caption: skipped
    (s / "medical/pill.svg").write_text("<svg/>")  # SVG only: skipped
    (s / "medical/pill.txt").write_text("A pill.\n")
    doc = root / "usr/share/doc" / TUX
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("License: GPL-2\n")
    return root


def png_bytes(colour, size=(20, 16)) -> bytes:
    b = io.BytesIO()
    Image.new("RGBA", size, colour).save(b, "PNG")
    return b.getvalue()


GLYPHS = {  # glyph -> colour of its bitmap
    "u1F600": (250, 200, 0, 255),
    "u1F44B": (255, 0, 0, 255),
    "u1F3FB": (0, 255, 0, 255),
    "wave_light": (0, 0, 255, 255),
    "u1F1E6": (9, 9, 9, 255),  # a bare regional indicator: emoji-test does not name it
}
CMAP = {0x1F600: "u1F600", 0x1F44B: "u1F44B", 0x1F3FB: "u1F3FB", 0x1F1E6: "u1F1E6", 0x200D: "uni200D"}
EMOJI_TEST = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
# group: People & Body
# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
# group: Component
# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
"""


def tiny_font(path):
    """A TrueType font with CBDT colour bitmaps for GLYPHS and one ligature (waving hand + light skin tone)."""
    pytest.importorskip("fontTools")
    from fontTools.feaLib.builder import addOpenTypeFeaturesFromString
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    order = [".notdef", "uni200D", *GLYPHS]
    fb = FontBuilder(unitsPerEm=128, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap(CMAP)
    fb.setupGlyf({g: TTGlyphPen(None).glyph() for g in order})
    fb.setupHorizontalMetrics({g: (128, 0) for g in order})
    fb.setupHorizontalHeader(ascent=101, descent=-27)
    fb.setupNameTable({"familyName": "Tiny", "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    addOpenTypeFeaturesFromString(fb.font, "feature ccmp { sub u1F44B u1F3FB by wave_light; } ccmp;")
    zeros = "".join(f'<{t} value="0"/>' for t in (
        "ascender", "descender", "widthMax", "caretSlopeNumerator", "caretSlopeDenominator", "caretOffset",
        "minOriginSB", "minAdvanceSB", "maxBeforeBL", "minAfterBL", "pad1", "pad2"))
    first, last = order.index(next(iter(GLYPHS))), len(order) - 1
    locs = "".join(f'<glyphLoc id="{order.index(g)}" name="{g}"/>' for g in GLYPHS)
    metrics = ('<SmallGlyphMetrics><height value="16"/><width value="20"/><BearingX value="0"/>'
               '<BearingY value="12"/><Advance value="20"/></SmallGlyphMetrics>')
    bitmaps = "".join(f'<cbdt_bitmap_format_17 name="{g}">{metrics}<rawimagedata>{png_bytes(c).hex()}</rawimagedata>'
                      "</cbdt_bitmap_format_17>" for g, c in GLYPHS.items())
    xml = f"""<?xml version="1.0" encoding="UTF-8"?><ttFont sfntVersion="\\x00\\x01\\x00\\x00" ttLibVersion="4.0">
<CBLC><header version="3.0"/><strike index="0"><bitmapSizeTable>
<sbitLineMetrics direction="hori">{zeros}</sbitLineMetrics><sbitLineMetrics direction="vert">{zeros}</sbitLineMetrics>
<colorRef value="0"/><startGlyphIndex value="{first}"/><endGlyphIndex value="{last}"/><ppemX value="16"/>
<ppemY value="16"/><bitDepth value="32"/><flags value="1"/></bitmapSizeTable>
<eblc_index_sub_table_1 imageFormat="17" firstGlyphIndex="{first}" lastGlyphIndex="{last}">{locs}</eblc_index_sub_table_1>
</strike></CBLC><CBDT><header version="3.0"/><strikedata index="0">{bitmaps}</strikedata></CBDT></ttFont>"""
    fb.font.importXML(io.StringIO(xml))
    path.parent.mkdir(parents=True, exist_ok=True)
    fb.font.save(path)
    return path


def fake_emoji(root):
    tiny_font(root / ri.EMOJI_FONT)
    return root


def fake_names(root):
    (root / ri.EMOJI_TEST).parent.mkdir(parents=True)
    (root / ri.EMOJI_TEST).write_text(EMOJI_TEST, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("packages")
    return {TUX: fake_tuxpaint(base / TUX), EMOJI: fake_emoji(base / EMOJI), NAMES: fake_names(base / NAMES)}


# ------------------------------------------------------------------------------------------- stamps
def test_stamp_captions_first_line_and_distinct_english_variants():
    text = "A colorful  robin.\nfr.utf8=Un rouge-gorge.\nen_GB.utf8=A colourful robin.\nen_AU.utf8=A colorful robin.\n"
    assert ri.stamp_captions(text) == ["A colorful robin.", "A colourful robin."]
    assert ri.stamp_captions("A calculator.  6x7=42\nach.utf8=Kalkuleta.\n") == ["A calculator. 6x7=42"]
    assert ri.stamp_captions("") == []


def test_stamp_label_drops_cartoon_and_keeps_two_folders():
    assert ri.stamp_label(("animals", "birds", "cartoon")) == "animals/birds"
    assert ri.stamp_label(("symbols", "alphabets", "english", "outlined")) == "symbols/alphabets"
    assert ri.stamp_label(("medical",)) == "medical"


def test_photo_like_tells_noise_from_flat_drawings():
    assert ri.photo_like(np.asarray(noise_rgba(0)))
    assert not ri.photo_like(np.asarray(flat_rgba()))
    assert not ri.photo_like(np.asarray(noise_rgba(0, size=(6, 6))))  # too few opaque pixels


def test_stamp_items(roots):
    items, skipped = ri.stamp_items(roots[TUX] / ri.STAMPS_DIR)
    assert skipped == {"png without caption": 1, "svg only": 1}
    by = {i.name: i for i in items}
    assert len(items) == 8
    robin = by["tuxpaint/animals/birds/robin"]
    assert robin.captions == ("A colorful robin.", "A colourful robin.") and robin.label == "tuxpaint/animals/birds"
    assert robin.photo and robin.original == f"{ri.STAMPS_DIR}/animals/birds/robin.png"
    assert not by["tuxpaint/animals/birds/cartoon/owl"].photo  # noisy, but in cartoon/
    assert by["tuxpaint/animals/birds/cartoon/owl"].label == "tuxpaint/animals/birds"
    assert not by["tuxpaint/symbols/alphabets/english/filled/o"].photo
    outlined, filled = by["tuxpaint/symbols/alphabets/english/outlined/o"], by["tuxpaint/symbols/alphabets/english/filled/o"]
    assert outlined.group == filled.group == "tuxpaint/the letter o"
    assert by["tuxpaint/medical/bandage"].label == "tuxpaint/medical"


def test_fit_image_white_background_centred_aspect_kept():
    im = Image.new("RGBA", (40, 20), (0, 0, 255, 255))
    im.paste(Image.new("RGBA", (10, 20), (0, 0, 0, 0)), (0, 0))  # left quarter transparent
    out = ri.fit_image(im, 64)
    a = np.asarray(out)
    assert out.mode == "RGB" and out.size == (64, 64)
    assert (a[:14] == 255).all() and (a[-14:] == 255).all()  # padding above and below (picture is 64 x 32)
    assert tuple(a[32, 40]) == (0, 0, 255) and tuple(a[32, 4]) == (255, 255, 255)
    tall = ri.fit_image(Image.new("L", (10, 50), 0), 100)
    assert np.asarray(tall)[50, 50].tolist() == [0, 0, 0] and np.asarray(tall)[50, 5].tolist() == [255, 255, 255]


# -------------------------------------------------------------------------------------------- emoji
def test_parse_emoji_test():
    names = ri.parse_emoji_test(EMOJI_TEST)
    assert [n.name for n in names] == ["grinning face", "waving hand", "waving hand: light skin tone", "light skin tone"]
    assert names[2].codepoints == (0x1F44B, 0x1F3FB) and names[2].group == "People & Body"
    assert names[2].subgroup == "hand-fingers-open" and names[3].status == "component"


def test_ligature_sequences_resolve_components_and_drop_fe0f():
    cmap = {0x2764: "heart", 0xFE0F: "vs16", 0x200D: "zwj", 0x1F525: "fire"}
    rules = [("heart", ["vs16", "zwj", "fire"], "heart_on_fire"), ("fire", ["zwj", "heart"], "reversed"),
             ("heart", ["unknown"], "never")]
    seqs = ri.ligature_sequences(cmap, rules)
    assert seqs[(0x2764, 0x200D, 0x1F525)] == "heart_on_fire"
    assert seqs[(0x1F525, 0x200D, 0x2764)] == "reversed" and seqs[(0x2764,)] == "heart"
    assert "never" not in seqs.values() and (0xFE0F,) not in seqs


def test_font_bitmaps_of_a_tiny_colour_font(roots):
    seqs, bitmaps = ri.font_bitmaps(roots[EMOJI] / ri.EMOJI_FONT)
    assert set(bitmaps) == set(GLYPHS)
    assert seqs[(0x1F44B, 0x1F3FB)] == "wave_light" and seqs[(0x1F600,)] == "u1F600"
    assert Image.open(io.BytesIO(bitmaps["wave_light"])).getpixel((3, 3)) == GLYPHS["wave_light"]


def test_emoji_items_named_by_emoji_test_or_unicodedata():
    seqs = {(0x1F600,): "a", (0x1F44B,): "b", (0x1F44B, 0x1F3FB): "c", (0x1F1E6,): "d", (0x1F44B, 0x200D, 0x1F600): "e"}
    bitmaps = {g: png_bytes((1, 2, 3, 255)) for g in "abcde"}
    items, skipped = ri.emoji_items(seqs, bitmaps, ri.parse_emoji_test(EMOJI_TEST))
    assert [i.captions for i in items] == [("grinning face",), ("waving hand",), ("waving hand: light skin tone",)]
    assert items[2].name == "emoji/emoji_u1f44b_1f3fb" and items[2].codepoints == "U+1F44B U+1F3FB"
    assert items[1].group == items[2].group == "emoji/1f44b"  # skin tones stay with their emoji
    assert items[2].label == "emoji/People & Body/hand-fingers-open" and skipped == {"glyphs without a name": 2}
    items, skipped = ri.emoji_items(seqs, bitmaps, None)
    names = {i.captions[0]: i.label for i in items}
    assert names["grinning face"] == "emoji/grinning" and names["waving hand sign"] == "emoji/waving"
    assert "regional indicator symbol letter a" in names and skipped == {"glyphs without a name": 2}


# ------------------------------------------------------------------------------------------- splits
def test_assign_splits_keeps_groups_whole_and_every_class_in_train():
    items = [ri.Item("s", f"n{i}", ("c",), f"class{i % 3}", f"g{i // 2}", b"", "") for i in range(60)]
    splits = ri.assign_splits(items, seed=3)
    assert splits == ri.assign_splits(items, seed=3) and splits != ri.assign_splits(items, seed=4)
    for i in range(0, 60, 2):
        assert splits[i] == splits[i + 1]
    counts = {s: splits.count(s) for s in ri.SPLITS}
    assert abs(counts["train"] - 42) <= 4 and abs(counts["val"] - 6) <= 4 and abs(counts["test"] - 12) <= 4
    lonely = [ri.Item("s", "x", ("c",), "rare", "gx", b"", "")]
    assert ri.assign_splits(lonely) == ["train"]
    with pytest.raises(ValueError, match="fractions"):
        ri.assign_splits(items, fractions=(0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------------- the whole tool
def test_build_real_dataset_both_sources(roots, tmp_path):
    out = tmp_path / "real"
    summary = ri.build_real_dataset(out, "both", size=32, roots=roots)
    tux, emoji = summary["sources"]["tuxpaint"], summary["sources"]["emoji"]
    assert (tux["images"], tux["captions"], tux["classes"], tux["photo-like"]) == (8, 9, 4, 4)
    assert (emoji["images"], emoji["classes"], emoji["skipped"]) == (4, 3, {"glyphs without a name": 1})
    assert summary["images"] == 12 and summary["bytes"] > 0
    doc = json.loads((out / "dataset_real.json").read_text())
    assert doc["sources"][TUX]["license"] == "GPL-2" and doc["sources"][EMOJI]["license"] == "OFL-1.1"
    assert (out / doc["sources"][TUX]["copyright"]).read_text() == "License: GPL-2\n"
    entry = next(e for e in doc["images"] if e["filename"] == "robin.png")
    assert entry["filepath"] == "images/tuxpaint/animals/birds" and entry["photo"] is True
    assert entry["sentences"][1] == {"tokens": ["a", "colourful", "robin"], "raw": "A colourful robin.",
                                     "imgid": entry["imgid"], "sentid": entry["sentids"][1]}
    every = load_karpathy(out / "dataset_real.json", split=("train", "val", "test"))
    assert every.n_images == 12 and every.n_texts == 13 and every.families is None
    assert "waving hand: light skin tone" in every.captions
    train = load_karpathy(out / "dataset_real.json", split="train")
    im = Image.open(train.image_paths[0])
    assert im.mode == "RGB" and im.size == (32, 32)
    paths, labels, names = ri.load_classification(out / "classes_real.json")
    assert len(paths) == 12 and all(p.is_file() for p in paths)
    assert names == sorted(names) and "emoji/People & Body/hand-fingers-open" in names
    assert [names[k] for k in labels] == [e["label"] for e in doc["images"]]
    by_file = {p.name: names[k] for p, k in zip(paths, labels)}
    assert by_file["dingo.png"] == "tuxpaint/animals/mammals"
    for split in ri.SPLITS:
        if split in {e["split"] for e in doc["images"]}:
            sub = ri.load_classification(out / "classes_real.json", split=split)[0]
            assert len(sub) == sum(e["split"] == split for e in doc["images"])
    again = tmp_path / "again"
    ri.build_real_dataset(again, "both", size=32, roots=roots)
    assert (again / "dataset_real.json").read_text() == (out / "dataset_real.json").read_text()
    assert (again / "images/emoji/emoji_u1f600.png").read_bytes() == (out / "images/emoji/emoji_u1f600.png").read_bytes()


def test_build_photos_only_and_argument_errors(roots, tmp_path):
    summary = ri.build_real_dataset(tmp_path / "photos", "tuxpaint", size=24, roots=roots)
    assert summary["sources"].keys() == {"tuxpaint"} and summary["images"] == 8
    summary = ri.build_real_dataset(tmp_path / "photos", "tuxpaint", size=24, photos_only=True, roots=roots)
    assert summary["images"] == 4 and summary["sources"]["tuxpaint"]["skipped"]["not photo-like"] == 4
    doc = json.loads((tmp_path / "photos/dataset_real.json").read_text())
    assert all(e["photo"] for e in doc["images"]) and doc["settings"]["photos_only"] is True
    with pytest.raises(ValueError, match="photos-only"):
        ri.build_real_dataset(tmp_path / "x", "both", photos_only=True, roots=roots)
    with pytest.raises(ValueError, match="source"):
        ri.build_real_dataset(tmp_path / "x", "photos", roots=roots)


def test_emoji_without_emoji_test_falls_back_to_unicodedata(roots, tmp_path):
    bare = {EMOJI: roots[EMOJI], NAMES: tmp_path / "empty"}
    with pytest.warns(UserWarning, match="unicodedata"):
        summary = ri.build_real_dataset(tmp_path / "out", "emoji", size=24, roots=bare)
    assert summary["sources"]["emoji"]["names"].startswith("unicodedata")
    captions = load_karpathy(tmp_path / "out/dataset_real.json", split=ri.SPLITS).captions
    assert "grinning face" in captions and "waving hand sign" in captions
    assert not any(":" in c for c in captions)  # the ligature has no single-code-point name


def test_load_classification_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ri.load_classification(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match="classification"):
        ri.load_classification(bad)
    bad.write_text('{"label_names": ["a"], "images": [{"filepath": "", "filename": "x.png", "split": "train", "label": 3}]}')
    with pytest.raises(ValueError, match="label 3"):
        ri.load_classification(bad)
    with pytest.raises(ValueError, match="split"):
        ri.load_classification(bad, split="test")


# ------------------------------------------------------------------- .deb files and the command line
def build_deb(root, package, folder):
    control = root / "DEBIAN"
    control.mkdir(parents=True, exist_ok=True)
    (control / "control").write_text(f"Package: {package}\nVersion: 1.0-test\nArchitecture: all\n"
                                     "Maintainer: nobody <nobody@example.org>\nDescription: fake\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(folder / f"{package}_1.0-test_all.deb")],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None, reason="needs dpkg")
def test_command_unpacks_deb_files_without_downloading(tmp_path, capsys):
    debs = tmp_path / "debs"
    debs.mkdir()
    build_deb(fake_tuxpaint(tmp_path / "t"), TUX, debs)
    build_deb(fake_emoji(tmp_path / "e"), EMOJI, debs)
    build_deb(fake_names(tmp_path / "n"), NAMES, debs)
    root, version = ri.fetch_package(TUX, tmp_path / "unpacked", debs)
    assert version == "1.0-test" and (root / ri.STAMPS_DIR / "animals/birds/blackbird.png").is_file()
    out = tmp_path / "real"
    assert main(["data-real", "--source", "both", "--out", str(out), "--debs", str(debs), "--size", "24",
                 "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "tuxpaint: 8 images, 9 captions, 4 classes, 4 photo-like" in printed
    assert "emoji: 4 images, 4 captions, 3 classes" in printed
    doc = json.loads((out / "dataset_real.json").read_text())
    assert doc["sources"][TUX]["version"] == "1.0-test" and len(doc["images"]) == 12
    assert load_karpathy(out / "dataset_real.json", split="train").n_images > 0


def test_command_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data-real", "--source", "emoji", "--photos-only", "--out", str(tmp_path)])
    assert e.value.code == 2 and "photos-only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data-real", "--fractions", "0.5,0.6,0.1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "fractions" in capsys.readouterr().err
