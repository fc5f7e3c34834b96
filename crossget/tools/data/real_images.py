"""Real pictures with English captions from two Debian packages, fetched on request.

    crossget data-real --source tuxpaint|emoji|both --out data/real [--photos-only]

Sources (downloaded with ``apt-get download`` and unpacked with ``dpkg -x``, neither needs root):

- ``tuxpaint``: the stamps of ``tuxpaint-stamps-default`` (GPL-2),
  ``usr/share/tuxpaint/stamps/<category>/<sub>/.../NAME.png`` with ``NAME.txt``. The first line
  of the text file is the English caption ("A blackbird."); the other lines are translations
  (``fr.utf8=...``), of which the ``en_*`` ones are kept as further captions where they differ
  ("colour" for "color"). Stamps that exist only as SVG are skipped (no SVG renderer is needed
  or used), so are PNGs without a caption (``NAME_mirror.png`` variants). A stamp is *photo-like*
  when it lies outside every ``cartoon/`` folder, its ``NAME.dat`` does not mark it
  ``colorable``/``tintable`` (one-colour line art Tux Paint recolours), and its 8 most common
  colours cover under 30 % of its opaque pixels (flat drawings are a few colours; photo cut-outs
  are noise); ``--photos-only`` keeps those.
- ``emoji``: the colour bitmaps (CBDT table, one PNG per glyph) of ``NotoColorEmoji.ttf`` from
  ``fonts-noto-color-emoji`` (OFL-1.1), read with ``fontTools`` (imported only here). Glyphs are
  mapped to code point sequences through the font's ``cmap`` and its GSUB ligatures, and named
  through ``emoji-test.txt`` of Debian's ``unicode-data`` (fetched too): its CLDR name is the
  caption ("grinning face", "waving hand: light skin tone", "flag: Germany") and its group /
  subgroup the class. Glyphs that file does not list (the font's newer emoji, bare regional
  indicators, digits) are skipped. Without ``unicode-data`` the names come from
  :mod:`unicodedata` (single code points only, sequences skipped) and the class is the first
  word of the name.

Every image becomes an RGB PNG of ``size`` x ``size`` pixels: transparent parts on white, the
picture scaled to fit (aspect kept) and centred. Written under ``out``:

- ``images/tuxpaint/<stamp folders>/NAME.png``, ``images/emoji/emoji_u<hex>[_<hex>...].png``;
- ``dataset_real.json``: Karpathy format (``filepath``, ``filename``, ``split``, ``sentences``
  with ``raw`` and ``tokens``), read by :func:`crossget.tools.data.karpathy.load_karpathy`; each
  image also has ``source``, ``label``, ``group``, ``original`` (its file in the package) and, for
  stamps, ``photo`` (emoji: ``codepoints``). Top level: ``sources`` (package, version, licence,
  copyright file), ``settings`` and ``label_names``;
- ``classes_real.json``: the same images and splits with integer ``label`` indices into
  ``label_names``, read by :func:`load_classification`;
- ``licenses/<package>.copyright``: each package's Debian copyright file.

Classes: a stamp's is ``tuxpaint/<category>/<sub>`` (its first two folders, ``cartoon`` left out;
``tuxpaint/<category>`` for a stamp directly in a category), an emoji's
``emoji/<group>/<subgroup>``.

Splits (default 70/10/20, seeded): images are split in *groups* that always land together,
stamps of the same caption ("A grave marker." x3, the outlined and filled "The letter o.") and
the skin-tone variants of one emoji; within each class the groups are shuffled and each goes
where the split is furthest below its share, so every class starts in train and both files
share one split. Same packages and arguments -> the same files.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("tuxpaint", "emoji")
PACKAGES = {"tuxpaint": "tuxpaint-stamps-default", "emoji": "fonts-noto-color-emoji"}
EMOJI_NAMES_PACKAGE = "unicode-data"  # emoji-test.txt: names, groups, subgroups
LICENSES = {"tuxpaint-stamps-default": "GPL-2", "fonts-noto-color-emoji": "OFL-1.1",
            "unicode-data": "Unicode-DFS-2016"}
STAMPS_DIR = "usr/share/tuxpaint/stamps"
EMOJI_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)
PHOTO_TOP_COLOURS, PHOTO_MAX_COVER = 8, 0.3
RECOLOURED = ("colorable", "tintable")
SKIN_TONES = range(0x1F3FB, 0x1F400)
VS16 = 0xFE0F
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Item:
    """One picture to write: ``data`` is a PNG file or PNG bytes; ``name`` its output path under
    ``images/`` without the suffix; ``group`` the unit of the split."""

    source: str
    name: str
    captions: tuple[str, ...]
    label: str
    group: str
    data: Path | bytes
    original: str
    photo: bool | None = None
    codepoints: str | None = None


# ------------------------------------------------------------------------------------------ packages
def fetch_package(package: str, dest: str | os.PathLike, debs: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Unpack Debian ``package`` into ``dest/package``; return that folder and the package version.

    The ``.deb`` is taken from ``debs`` if one ``<package>_*.deb`` is there, else downloaded into
    ``debs`` (a temporary folder when None) with ``apt-get download``.

    Raises:
        OSError: ``apt-get`` / ``dpkg`` missing or failing (the message has their output).
    """
    for tool in ("apt-get", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise OSError(f"{tool} not found: fetching {package} needs Debian's apt-get and dpkg")
    with tempfile.TemporaryDirectory() if debs is None else nullcontext(debs) as where:
        where = Path(where)
        where.mkdir(parents=True, exist_ok=True)
        found = sorted(where.glob(f"{package}_*.deb"))
        if not found:
            _run(["apt-get", "download", package], where,
                 f"apt-get download {package} failed (no package lists? run apt-get update)")
            found = sorted(where.glob(f"{package}_*.deb"))
        if len(found) != 1:
            raise OSError(f"expected one {package}_*.deb in {where}, found {[p.name for p in found]}")
        version = _run(["dpkg-deb", "-f", str(found[0]), "Version"], where, f"dpkg-deb cannot read {found[0]}").strip()
        root = Path(dest) / package
        root.mkdir(parents=True, exist_ok=True)
        _run(["dpkg", "-x", str(found[0]), str(root)], where, f"dpkg -x {found[0].name} failed")
    return root, version


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{what}: {' '.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


# --------------------------------------------------------------------------------------------- stamps
def stamp_captions(text: str) -> list[str]:
    """The English captions of a stamp's ``NAME.txt``: the first line, then its distinct ``en_*`` lines."""
    lines = text.splitlines()
    out: list[str] = []
    for n, line in enumerate(lines):
        if n == 0:
            raw = line
        else:
            key, sep, raw = line.partition("=")
            if not sep or not re.fullmatch(r"en(_[A-Za-z]+)?(\.utf-?8)?", key.strip()):
                continue
        raw = " ".join(raw.split())
        if raw and raw not in out:
            out.append(raw)
    return out


def stamp_label(folders: Sequence[str]) -> str:
    """``<category>/<sub>`` of a stamp's folders below the stamps root (``cartoon`` left out)."""
    kept = [f for f in folders if f != "cartoon"]
    return "/".join(kept[:2]) if kept else "misc"


def photo_like(rgba: np.ndarray, top: int = PHOTO_TOP_COLOURS, max_cover: float = PHOTO_MAX_COVER) -> bool:
    """Whether the ``top`` most common colours of the opaque pixels (alpha >= 250) of ``[H, W, 4]``
    cover less than ``max_cover`` of them (photos: yes; flat drawings: no; under 64 opaque pixels: no)."""
    opaque = rgba[..., 3] >= 250
    colours = rgba[..., :3][opaque].astype(np.int64)
    if len(colours) < 64:
        return False
    _, counts = np.unique(colours @ np.array([1 << 16, 1 << 8, 1]), return_counts=True)
    return float(np.sort(counts)[::-1][:top].sum()) / len(colours) < max_cover


def _recoloured(dat: Path) -> bool:
    if not dat.is_file():
        return False
    return any(line.strip() in RECOLOURED for line in dat.read_text(encoding="utf-8", errors="replace").splitlines())


def stamp_items(stamps: str | os.PathLike) -> tuple[list[Item], dict[str, int]]:
    """The captioned PNG stamps under ``stamps`` (sorted by path) and what was skipped."""
    stamps = Path(stamps)
    if not stamps.is_dir():
        raise FileNotFoundError(f"no Tux Paint stamps folder: {stamps}")
    items, skipped = [], Counter()
    for png in sorted(stamps.rglob("*.png")):
        txt = png.with_suffix(".txt")
        captions = stamp_captions(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else []
        if not captions:
            skipped["png without caption"] += 1
            continue
        rel = png.relative_to(stamps)
        with Image.open(png) as im:
            rgba = np.asarray(im.convert("RGBA"))
        photo = "cartoon" not in rel.parts[:-1] and not _recoloured(png.with_suffix(".dat")) and photo_like(rgba)
        items.append(Item(
            source="tuxpaint", name=f"tuxpaint/{rel.with_suffix('').as_posix()}", captions=tuple(captions),
            label=f"tuxpaint/{stamp_label(rel.parts[:-1])}", group=f"tuxpaint/{' '.join(caption_tokens(captions[0]))}",
            data=png, original=f"{STAMPS_DIR}/{rel.as_posix()}", photo=photo,
        ))
    for svg in sorted(stamps.rglob("*.svg")):
        if not svg.with_suffix(".png").is_file():
            skipped["svg only"] += 1
    return items, dict(skipped)


# ---------------------------------------------------------------------------------------------- emoji
@dataclass(frozen=True)
class EmojiName:
    """One line of ``emoji-test.txt``."""

    codepoints: tuple[int, ...]
    status: str  # component | fully-qualified | minimally-qualified | unqualified
    name: str
    group: str
    subgroup: str


def parse_emoji_test(text: str) -> list[EmojiName]:
    """The entries of Unicode's ``emoji-test.txt``, in file order."""
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif line.strip() and not line.startswith("#"):
            codes, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            name = re.sub(r"^\S+\s+E\d+\.\d+\s+", "", comment.strip())
            out.append(EmojiName(tuple(int(c, 16) for c in codes.split()), status.strip(), name, group, subgroup))
    return out


def _key(codepoints: Iterable[int]) -> tuple[int, ...]:
    return tuple(c for c in codepoints if c != VS16)


def ligature_sequences(
    cmap: Mapping[int, str], ligatures: Iterable[tuple[str, Sequence[str], str]]
) -> dict[tuple[int, ...], str]:
    """Code point sequence (U+FE0F left out) -> glyph, from a ``cmap`` and ligature rules
    ``(first glyph, other components, ligature glyph)``. A rule whose components the cmap does not
    name is skipped; the first rule or code point for a sequence wins."""
    char_of: dict[str, int] = {}
    for cp, glyph in sorted(cmap.items()):
        char_of.setdefault(glyph, cp)
    out = {_key((cp,)): glyph for cp, glyph in sorted(cmap.items()) if cp != VS16}
    for first, rest, glyph in ligatures:
        parts = [first, *rest]
        if all(p in char_of for p in parts):
            out.setdefault(_key(char_of[p] for p in parts), glyph)
    return out


def font_bitmaps(font: str | os.PathLike) -> tuple[dict[tuple[int, ...], str], dict[str, bytes]]:
    """``(sequence -> glyph, glyph -> PNG bytes)`` of a CBDT colour font (largest strike), via fontTools.

    Raises:
        ImportError: fontTools is not installed.
        ValueError: the font has no CBDT bitmaps.
    """
    try:
        from fontTools.ttLib import TTFont
    except ImportError as err:  # pragma: no cover - fontTools comes with matplotlib
        raise ImportError("reading emoji bitmaps needs fontTools: pip install fonttools") from err
    tt = TTFont(str(font), lazy=True)
    if "CBDT" not in tt or "CBLC" not in tt:
        raise ValueError(f"{font} has no CBDT/CBLC colour bitmaps")
    rules = []
    if "GSUB" in tt:
        for lookup in tt["GSUB"].table.LookupList.Lookup:
            for sub in lookup.SubTable:
                sub = getattr(sub, "ExtSubTable", sub)
                for first, ligs in (getattr(sub, "ligatures", None) or {}).items():
                    rules += [(first, list(lig.Component), lig.LigGlyph) for lig in ligs]
    strikes = tt["CBLC"].strikes
    best = max(range(len(strikes)), key=lambda i: strikes[i].bitmapSizeTable.ppemY)
    bitmaps = {}
    for glyph, bitmap in tt["CBDT"].strikeData[best].items():
        data = getattr(bitmap, "imageData", b"")
        if data.startswith(PNG_SIGNATURE):
            bitmaps[glyph] = bytes(data)
    return ligature_sequences(tt.getBestCmap(), rules), bitmaps


def _hex(codepoints: Iterable[int]) -> str:
    return "_".join(f"{c:x}" for c in codepoints)


def emoji_items(
    sequences: Mapping[tuple[int, ...], str], bitmaps: Mapping[str, bytes], names: Sequence[EmojiName] | None
) -> tuple[list[Item], dict[str, int]]:
    """One item per emoji bitmap that has a name: from ``names`` (``emoji-test.txt``; fully
    qualified and component entries, in its order) or, when None, from :mod:`unicodedata` for
    single code points. Returns the items and the counts of glyphs skipped."""
    items, used = [], set()
    if names is not None:
        for e in names:
            glyph = sequences.get(_key(e.codepoints))
            if e.status not in ("fully-qualified", "component") or glyph not in bitmaps or glyph in used:
                continue
            used.add(glyph)
            items.append(_emoji_item(_key(e.codepoints), e.name, f"{e.group}/{e.subgroup}", bitmaps[glyph]))
    else:
        for seq, glyph in sorted(sequences.items()):
            name = unicodedata.name(chr(seq[0]), "").lower() if len(seq) == 1 else ""
            if not name or glyph not in bitmaps or glyph in used:
                continue
            used.add(glyph)
            items.append(_emoji_item(seq, name, name.split()[0], bitmaps[glyph]))
    unnamed = len(set(bitmaps) - used)
    return items, ({"glyphs without a name": unnamed} if unnamed else {})


def _emoji_item(seq: tuple[int, ...], name: str, label: str, png: bytes) -> Item:
    stem = f"emoji_u{_hex(seq)}"
    return Item(
        source="emoji", name=f"emoji/{stem}", captions=(name,), label=f"emoji/{label}",
        group=f"emoji/{_hex(c for c in seq if c not in SKIN_TONES)}", data=png, original=f"{EMOJI_FONT}:{stem}",
        codepoints=" ".join(f"U+{c:04X}" for c in seq),
    )


# ----------------------------------------------------------------------------------- images and splits
def fit_image(image: Image.Image, size: int) -> Image.Image:
    """RGB ``size`` x ``size``: transparent parts on white, scaled to fit (aspect kept), centred."""
    rgba = image.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    scale = size / max(rgb.size)
    w, h = (max(1, min(size, round(d * scale))) for d in rgb.size)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb.resize((w, h), Image.Resampling.LANCZOS), ((size - w) // 2, (size - h) // 2))
    return canvas


def _convert(task: tuple[Path | bytes, Path, int]) -> None:
    data, dest, size = task
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        fit_image(im, size).save(dest)


def caption_tokens(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-case words (letters of any script, digits), punctuation dropped."""
    return re.findall(r"[^\W_]+", raw.lower())


def assign_splits(items: Sequence[Item], seed: int = 0, fractions: Sequence[float] = FRACTIONS) -> list[str]:
    """Each item's split: groups kept whole, shuffled within their class (a group's class: its most
    common label), each to the split furthest below its share of the class."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {list(fractions)}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        members[item.group].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, idx in sorted(members.items()):
        labels = Counter(items[i].label for i in idx)
        by_class[min(labels, key=lambda lab: (-labels[lab], lab))].append(group)
    out = [""] * len(items)
    for label, groups in sorted(by_class.items()):
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(label.encode())]))
        counts, total = [0] * len(SPLITS), 0
        for g in rng.permutation(len(groups)):
            idx = members[groups[int(g)]]
            total += len(idx)
            s = max(range(len(SPLITS)), key=lambda k: (fractions[k] * total - counts[k], -k))
            counts[s] += len(idx)
            for i in idx:
                out[i] = SPLITS[s]
    return out


# --------------------------------------------------------------------------------------------- writing
def write_dataset(
    out: str | os.PathLike, items: Sequence[Item], splits: Sequence[str], size: int = 224,
    sources: Mapping[str, dict] | None = None, settings: Mapping | None = None, workers: int = 1,
) -> tuple[Path, Path]:
    """Write the images, ``dataset_real.json`` and ``classes_real.json``; return the two JSON paths."""
    out = Path(out)
    label_names = sorted({item.label for item in items})
    index = {name: n for n, name in enumerate(label_names)}
    tasks, images, classes, sentid = [], [], [], 0
    for imgid, (item, split) in enumerate(zip(items, splits)):
        path = out / "images" / f"{item.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tasks.append((item.data, path, size))
        filepath, filename = path.parent.relative_to(out).as_posix(), path.name
        sentences = [{"tokens": caption_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid + k}
                     for k, raw in enumerate(item.captions)]
        sentid += len(sentences)
        entry = {"filepath": filepath, "filename": filename, "imgid": imgid, "split": split,
                 "sentids": [s["sentid"] for s in sentences], "sentences": sentences, "source": item.source,
                 "label": item.label, "group": item.group, "original": item.original}
        if item.photo is not None:
            entry["photo"] = item.photo
        if item.codepoints is not None:
            entry["codepoints"] = item.codepoints
        images.append(entry)
        classes.append({"filepath": filepath, "filename": filename, "split": split, "label": index[item.label]})
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_convert, tasks, chunksize=32))
    else:
        for task in tasks:
            _convert(task)
    head = {"dataset": "real", "sources": dict(sources or {}), "settings": dict(settings or {}), "label_names": label_names}
    karpathy, classification = out / "dataset_real.json", out / "classes_real.json"
    karpathy.write_text(json.dumps({**head, "images": images}, ensure_ascii=False))
    classification.write_text(json.dumps({**head, "images": classes}, ensure_ascii=False))
    return karpathy, classification


def load_classification(
    path: str | os.PathLike, split: str | Sequence[str] | None = None, image_root: str | os.PathLike | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """``(image paths, label indices, label names)`` of ``classes_real.json`` (all splits when
    ``split`` is None); image ``i`` is ``image_root / filepath / filename`` (default: the JSON's folder).

    Raises:
        FileNotFoundError: no such file. ValueError: not such a file, or an unknown split / label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        names, entries = [str(n) for n in doc["label_names"]], list(doc["images"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a classification file (label_names + images): {err}") from None
    root = Path(image_root) if image_root is not None else path.parent
    if split is not None:
        wanted = {split} if isinstance(split, str) else set(split)
        present = {e.get("split") for e in entries}
        if not wanted & present:
            raise ValueError(f"split {split!r} not in {path}; it has {sorted(map(str, present))}")
        entries = [e for e in entries if e.get("split") in wanted]
    paths, labels = [], []
    for e in entries:
        label = int(e["label"])
        if not 0 <= label < len(names):
            raise ValueError(f"{path}: label {label} of {e.get('filename')} outside the {len(names)} label_names")
        paths.append(root / str(e.get("filepath", "")) / str(e["filename"]))
        labels.append(label)
    return paths, labels, names


# ------------------------------------------------------------------------------------------- the tool
def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_real_dataset(
    out: str | os.PathLike = "data/real",
    source: str = "both",
    size: int = 224,
    seed: int = 0,
    photos_only: bool = False,
    fractions: Sequence[float] = FRACTIONS,
    roots: Mapping[str, str | os.PathLike] | None = None,
    debs: str | os.PathLike | None = None,
    workers: int = 1,
) -> dict:
    """Fetch the packages of ``source`` ("tuxpaint", "emoji" or "both"), convert and write the data set.

    Args:
        roots: package name -> an already unpacked package (``dpkg -x``); the others are fetched.
        debs: where ``.deb`` files are looked for and downloaded (default: a temporary folder).
        photos_only: keep the photo-like stamps only (tuxpaint only).
        workers: processes converting images (same files for any number).

    Returns a summary: the JSON paths, per source the images, captions, classes, photo-like
    stamps and what was skipped, the splits, seconds and bytes on disk.
    """
    if source not in (*SOURCES, "both"):
        raise ValueError(f"source must be one of {[*SOURCES, 'both']}, got {source!r}")
    if photos_only and source != "tuxpaint":
        raise ValueError("--photos-only keeps photo-like stamps: use it with --source tuxpaint")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    assign_splits([], seed, fractions)  # validates the fractions before anything is fetched
    start = time.perf_counter()
    wanted = SOURCES if source == "both" else (source,)
    out = Path(out)
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    roots = {k: Path(v) for k, v in (roots or {}).items()}
    versions: dict[str, str] = {}
    items: list[Item] = []
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="crossget-real-") as work:
        def unpacked(package: str) -> Path:
            if package not in roots:
                roots[package], versions[package] = fetch_package(package, work, debs)
            copyright_file = roots[package] / "usr/share/doc" / package / "copyright"
            if copyright_file.is_file():
                shutil.copyfile(copyright_file, out / "licenses" / f"{package}.copyright")
            return roots[package]

        used = []
        if "tuxpaint" in wanted:
            found, skipped = stamp_items(unpacked(PACKAGES["tuxpaint"]) / STAMPS_DIR)
            used.append(PACKAGES["tuxpaint"])
            if photos_only:
                skipped["not photo-like"] = sum(not i.photo for i in found)
                found = [i for i in found if i.photo]
            items += found
            report["tuxpaint"] = {"skipped": skipped,
                                  "photo-like": sum(bool(i.photo) for i in found),
                                  "outside cartoon/": sum("/cartoon/" not in i.original for i in found)}
        if "emoji" in wanted:
            sequences, bitmaps = font_bitmaps(unpacked(PACKAGES["emoji"]) / EMOJI_FONT)
            used.append(PACKAGES["emoji"])
            try:
                names_file = unpacked(EMOJI_NAMES_PACKAGE) / EMOJI_TEST
                names = parse_emoji_test(names_file.read_text(encoding="utf-8"))
                used.append(EMOJI_NAMES_PACKAGE)
            except OSError as err:
                warnings.warn(f"no emoji-test.txt ({err}); naming single code points with unicodedata", stacklevel=2)
                names = None
            found, skipped = emoji_items(sequences, bitmaps, names)
            items += found
            report["emoji"] = {"skipped": skipped, "glyphs": len(bitmaps),
                               "names": "emoji-test.txt" if names is not None else f"unicodedata {unicodedata.unidata_version}"}
        if not items:
            raise ValueError(f"no captioned images found for source {source!r}")
        splits = assign_splits(items, seed, fractions)
        sources = {
            pkg: {"package": pkg, "version": versions.get(pkg, ""), "license": LICENSES[pkg],
                  "copyright": f"licenses/{pkg}.copyright" if (out / "licenses" / f"{pkg}.copyright").is_file() else None}
            for pkg in used
        }
        settings = {"source": source, "size": size, "seed": seed, "photos_only": photos_only, "fractions": list(fractions)}
        karpathy, classification = write_dataset(out, items, splits, size, sources, settings, workers)
    for name, rep in report.items():
        mine = [(i, s) for i, s in zip(items, splits) if i.source == name]
        rep.update(images=len(mine), captions=sum(len(i.captions) for i, _ in mine),
                   classes=len({i.label for i, _ in mine}), splits=dict(Counter(s for _, s in mine)))
    return {"karpathy": str(karpathy), "classification": str(classification), "sources": report,
            "images": len(items), "classes": len({i.label for i in items}), "splits": dict(Counter(splits)),
            "versions": {pkg: s["version"] for pkg, s in sources.items()},
            "seconds": round(time.perf_counter() - start, 1), "bytes": _disk_bytes(out)}
