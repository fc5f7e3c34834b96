"""Seeded generator of spatial shape scenes with captions, written in Karpathy's retrieval format.

Each image shows 2-3 *entities* on a 3x3 grid (rows top/middle/bottom x columns left/middle/right).
An entity is either one large shape with a texture (plain, striped or dotted) or a cluster of 1-4 small
plain shapes of one kind ("three small red circles"). Every caption names every entity in full
(count, size, texture of large shapes, colour, shape) and places them, either absolutely ("in the top
left") or relative to each other ("below and to the right of").

What makes it hard for token merging: the captions hinge on exactly what merging averages away.
- Images come in *families*: a base scene and twins that differ in one detail only (``VARIANTS``):
  two entities swap places, one entity moves, a cluster gains or loses a shape, a large shape changes
  texture, or two entities swap colours. A family always lands in one split, so the test split holds
  its own hard negatives.
- Captions are chosen so that none of them is also a true description of another member of the family:
  a caption of a "move" twin states a relation or a position that changed.
- Textures keep the mean colour of the shape (stripes and dots are +-delta around it), so an average
  of patches cannot tell plain from striped; neither can it count three small shapes in one cell.
- Backgrounds are noisy or blotchy and carry small grey distractor specks, so background tokens are
  not all identical.
- Harder variants (``object_scale``, ``clutter``, ``n_entities``): larger shapes, specks in the
  shapes' own colours, more entities per scene. The JSON's ``generator`` field records the settings.

The JSON matches ``dataset_coco.json`` (``filepath`` + ``filename``) and adds three fields per image
that Karpathy loaders ignore: ``family``, ``variant`` ("base" or a member of ``VARIANTS``) and
``objects`` (the scene). Same arguments -> byte-identical JSON and PNG files.

    crossget data --out data/shapes --train 8000 --val 400 --test 1000 --image-size 96
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# mid-range channels so +-TEXTURE_DELTA stays inside [0, 255] and textures keep the mean colour
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 55, 55),
    "green": (60, 175, 70),
    "blue": (60, 95, 210),
    "yellow": (200, 190, 55),
    "purple": (145, 65, 195),
    "orange": (210, 125, 50),
    "cyan": (55, 185, 195),
}
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
VARIANTS = ("swap", "move", "count", "texture", "colour")
SPLITS = ("train", "val", "test")
MAX_COUNT = 4
TEXTURE_DELTA = 55.0
SUPERSAMPLE = 4
IMAGE_PATTERN = "shapes_{image_id:06d}.png"  # image file of imgid


@dataclass(frozen=True)
class Entity:
    """One captioned thing: ``count`` shapes of one kind in grid cell (``row``, ``col``)."""

    shape: str
    colour: str
    size: str  # "small" (count 1..MAX_COUNT, plain) | "large" (count 1, any texture)
    count: int
    texture: str
    row: int
    col: int

    @property
    def desc(self) -> tuple[int, str, str, str, str]:
        """What a caption says about the entity apart from where it is."""
        return (self.count, self.size, self.texture, self.colour, self.shape)


Scene = tuple[Entity, ...]


# ----------------------------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, n_entities: tuple[int, int] = (2, 3)) -> Scene:
    """A random scene of ``n_entities[0]..n_entities[1]`` entities in distinct cells, unique (colour, shape)."""
    k = int(rng.integers(n_entities[0], n_entities[1] + 1))
    cells = rng.choice(9, size=k, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=k, replace=False)
    colours = list(COLOURS)
    out = []
    for cell, kind in zip(cells, kinds):
        colour, shape = colours[int(kind) // len(SHAPES)], SHAPES[int(kind) % len(SHAPES)]
        if rng.random() < 0.5:
            size, count, texture = "small", int(rng.integers(1, MAX_COUNT + 1)), "plain"
        else:
            size, count, texture = "large", 1, TEXTURES[int(rng.integers(len(TEXTURES)))]
        out.append(Entity(shape, colour, size, count, texture, int(cell) // 3, int(cell) % 3))
    return tuple(out)


def _valid(scene: Scene) -> bool:
    cells = {(e.row, e.col) for e in scene}
    kinds = {(e.colour, e.shape) for e in scene}
    return len(cells) == len(scene) == len(kinds)


def _facts(scene: Scene) -> frozenset:
    return frozenset((e.desc, e.row, e.col) for e in scene)


# what each grid cell holds, as class indices (0 = empty cell): colour, shape, size, texture, count
SCENE_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(TEXTURES) + 1, MAX_COUNT + 1)


def scene_targets(scenes: list[list[dict]]) -> np.ndarray:
    """Per-cell classes of scenes (the JSON ``objects`` lists): ``[I, 9, 5]`` int64, cell ``3 * row + col``.

    Columns follow :data:`SCENE_CLASSES`; every column is 0 for an empty cell.

    Raises:
        ValueError: an object names an unknown colour, shape, size or texture, or a bad cell or count.
    """
    vocab = (list(COLOURS), list(SHAPES), list(SIZES), list(TEXTURES))
    out = np.zeros((len(scenes), 9, len(SCENE_CLASSES)), dtype=np.int64)
    for i, objects in enumerate(scenes):
        for o in objects:
            try:
                cell = 3 * int(o["row"]) + int(o["col"])
                classes = [v.index(o[k]) + 1 for v, k in zip(vocab, ("colour", "shape", "size", "texture"))]
                count = int(o["count"])
            except (KeyError, ValueError) as err:
                raise ValueError(f"scene {i}: bad object {o}: {err}") from None
            if not (0 <= int(o["row"]) < 3 and 0 <= int(o["col"]) < 3 and 1 <= count <= MAX_COUNT):
                raise ValueError(f"scene {i}: object outside the 3x3 grid or count not in 1..{MAX_COUNT}: {o}")
            out[i, cell] = classes + [count]
    return out


def _twin_swap(scene: Scene, rng: np.random.Generator) -> Scene | None:
    i, j = (int(x) for x in rng.choice(len(scene), size=2, replace=False))
    out = list(scene)
    out[i], out[j] = replace(scene[i], row=scene[j].row, col=scene[j].col), replace(scene[j], row=scene[i].row, col=scene[i].col)
    return tuple(out)


def _twin_move(scene: Scene, rng: np.random.Generator) -> Scene | None:
    i = int(rng.integers(len(scene)))
    free = sorted(set(range(9)) - {e.row * 3 + e.col for e in scene})
    cell = int(rng.choice(free))
    return tuple(replace(e, row=cell // 3, col=cell % 3) if n == i else e for n, e in enumerate(scene))


def _twin_count(scene: Scene, rng: np.random.Generator) -> Scene | None:
    small = [n for n, e in enumerate(scene) if e.size == "small"]
    if not small:
        return None
    i = int(rng.choice(small))
    count = int(rng.choice([c for c in range(1, MAX_COUNT + 1) if c != scene[i].count]))
    return tuple(replace(e, count=count) if n == i else e for n, e in enumerate(scene))


def _twin_texture(scene: Scene, rng: np.random.Generator) -> Scene | None:
    large = [n for n, e in enumerate(scene) if e.size == "large"]
    if not large:
        return None
    i = int(rng.choice(large))
    texture = str(rng.choice([t for t in TEXTURES if t != scene[i].texture]))
    return tuple(replace(e, texture=texture) if n == i else e for n, e in enumerate(scene))


def _twin_colour(scene: Scene, rng: np.random.Generator) -> Scene | None:
    i, j = (int(x) for x in rng.choice(len(scene), size=2, replace=False))
    if scene[i].colour == scene[j].colour:
        return None
    out = list(scene)
    out[i], out[j] = replace(scene[i], colour=scene[j].colour), replace(scene[j], colour=scene[i].colour)
    return tuple(out)


TWINS: dict[str, Callable[[Scene, np.random.Generator], Scene | None]] = {
    "swap": _twin_swap,
    "move": _twin_move,
    "count": _twin_count,
    "texture": _twin_texture,
    "colour": _twin_colour,
}


def sample_family(
    rng: np.random.Generator, size: int, n_entities: tuple[int, int] = (2, 3)
) -> list[tuple[Scene, str]]:
    """A base scene and up to ``size - 1`` twins, each differing from the base in one ``VARIANTS`` way.

    Returns ``[(scene, variant), ...]`` with variant "base" first; variants are drawn in a random order
    without repetition (then cycled), skipping those that do not apply or repeat a member.
    """
    base = sample_scene(rng, n_entities)
    family = [(base, "base")]
    seen = {_facts(base)}
    order = [str(v) for v in rng.permutation(VARIANTS)]
    for attempt in range(4 * len(VARIANTS)):
        if len(family) >= size:
            break
        variant = order[attempt % len(order)]
        twin = TWINS[variant](base, rng)
        if twin is None or not _valid(twin) or _facts(twin) in seen:
            continue
        family.append((twin, variant))
        seen.add(_facts(twin))
    return family


# --------------------------------------------------------------------------------------------- captions
NUMBERS = {2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
TEXTURE_WORDS = {"plain": ("plain", "solid"), "striped": ("striped",), "dotted": ("dotted", "spotted")}
PLURAL = {"cross": "crosses"}
POSITIONS = {
    (0, 0): ("in the top left", "in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "at the top center"),
    (0, 2): ("in the top right", "in the top right corner", "at the top right"),
    (1, 0): ("on the left", "in the middle left", "at the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "in the middle right", "at the right side"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
# (sign of row difference, sign of column difference) of A relative to B -> "A ... B"
RELATIONS = {
    (0, -1): ("to the left of", "left of"),
    (0, 1): ("to the right of", "right of"),
    (-1, 0): ("above", "over"),
    (1, 0): ("below", "under", "beneath"),
    (-1, -1): ("above and to the left of", "to the upper left of"),
    (-1, 1): ("above and to the right of", "to the upper right of"),
    (1, -1): ("below and to the left of", "to the lower left of"),
    (1, 1): ("below and to the right of", "to the lower right of"),
}
PREFIXES = ("", "an image with ", "a picture of ", "a scene with ", "there is ")
MAX_WORDS = 38  # words + punctuation marks: captions fit a 40-token text model with <bos> and <eos>

# A claim is ("at", desc, row, col) or ("rel", desc_a, sign_row, sign_col, desc_b).
Claim = tuple
Caption = tuple[str, tuple[Claim, ...]]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def noun(e: Entity) -> str:
    return PLURAL.get(e.shape, e.shape + "s") if e.count > 1 else e.shape


def _phrase(e: Entity, rng: np.random.Generator) -> str:
    """Full description of an entity: 'three small red circles', 'a large striped blue square'."""
    words = [_pick(rng, SIZE_WORDS[e.size])]
    if e.size == "large":
        texture = _pick(rng, TEXTURE_WORDS[e.texture])
        words += [texture, e.colour] if rng.random() < 0.5 else [e.colour, texture]
    else:
        words.append(e.colour)
    words.append(noun(e))
    if e.count > 1:
        head = NUMBERS[e.count]
    else:
        head = "one" if rng.random() < 0.15 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([head, *words])


def _short(e: Entity) -> str:
    return f"the {e.colour} {noun(e)}"


def _be(e: Entity) -> str:
    return "are" if e.count > 1 else "is"


def relation(a: Entity, b: Entity) -> tuple[int, int]:
    return (int(np.sign(a.row - b.row)), int(np.sign(a.col - b.col)))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap_absolute(s: list[Entity], rng: np.random.Generator) -> Caption:
    """'a scene with a large striped red circle in the top left and two small blue squares at the bottom'."""
    prefix = _pick(rng, PREFIXES)
    if prefix == "there is " and s[0].count > 1:
        prefix = "there are "
    text = prefix + _join([f"{_phrase(e, rng)} {_pick(rng, POSITIONS[(e.row, e.col)])}" for e in s])
    return text, tuple(("at", e.desc, e.row, e.col) for e in s)


def _cap_relation(s: list[Entity], rng: np.random.Generator) -> Caption:
    """'two small blue squares below a large striped red circle, and a green triangle left of the red circle'."""
    a, b = s[0], s[1]
    text = f"{_phrase(a, rng)} {_pick(rng, RELATIONS[relation(a, b)])} {_phrase(b, rng)}"
    claims: list[Claim] = [("rel", a.desc, *relation(a, b), b.desc)]
    if len(s) > 2:
        c, ref = s[2], s[int(rng.integers(2))]
        text += f", and {_phrase(c, rng)} {_pick(rng, RELATIONS[relation(c, ref)])} {_short(ref)}"
        claims.append(("rel", c.desc, *relation(c, ref), ref.desc))
    return text, tuple(claims)


def _cap_mixed(s: list[Entity], rng: np.random.Generator) -> Caption:
    """'a large red circle in the center with three small blue squares above it, and ... in the top left'."""
    a, b = s[0], s[1]
    pronoun = "them" if a.count > 1 else "it"
    text = (
        f"{_phrase(a, rng)} {_pick(rng, POSITIONS[(a.row, a.col)])} with "
        f"{_phrase(b, rng)} {_pick(rng, RELATIONS[relation(b, a)])} {pronoun}"
    )
    claims: list[Claim] = [("at", a.desc, a.row, a.col), ("rel", b.desc, *relation(b, a), a.desc)]
    for c in s[2:]:
        text += f", and {_phrase(c, rng)} {_pick(rng, POSITIONS[(c.row, c.col)])}"
        claims.append(("at", c.desc, c.row, c.col))
    return text, tuple(claims)


def _cap_counting(s: list[Entity], rng: np.random.Generator) -> Caption:
    """'three small red circles and a large dotted blue square; the red circles are above the blue square'."""
    text = _join([_phrase(e, rng) for e in s])
    a, b = s[0], s[1]
    text += f"; {_short(a)} {_be(a)} {_pick(rng, RELATIONS[relation(a, b)])} {_short(b)}"
    claims: list[Claim] = [("rel", a.desc, *relation(a, b), b.desc)]
    if len(s) > 2:
        c = s[2]
        text += f" and {_short(c)} {_be(c)} {_pick(rng, RELATIONS[relation(c, b)])} {_short(b)}"
        claims.append(("rel", c.desc, *relation(c, b), b.desc))
    return text, tuple(claims)


TEMPLATES = (_cap_absolute, _cap_relation, _cap_mixed, _cap_counting)


def holds(caption: Caption, scene: Scene) -> bool:
    """True if the caption is a correct description of ``scene`` (it names exactly its entities)."""
    _, claims = caption
    by_desc = {e.desc: e for e in scene}
    named = {c[1] for c in claims} | {c[4] for c in claims if c[0] == "rel"}
    if named != set(by_desc):
        return False
    for c in claims:
        if c[0] == "at" and (by_desc[c[1]].row, by_desc[c[1]].col) != (c[2], c[3]):
            return False
        if c[0] == "rel" and relation(by_desc[c[1]], by_desc[c[4]]) != (c[2], c[3]):
            return False
    return True


def make_captions(
    scene: Scene, others: list[Scene], rng: np.random.Generator, n: int = 5, tries: int = 30, max_words: int = MAX_WORDS
) -> list[str]:
    """``n`` distinct captions of ``scene`` of at most ``max_words`` words and punctuation marks, none of
    which is also true of a scene in ``others``.

    Captions 0-3 use the templates absolute, relation, mixed, counting, later ones a random template,
    each with the entities in a random order. A draw that is too long, repeats a caption or also
    describes another family member is redrawn; after ``tries // 2`` draws only the absolute template
    is used, which names every cell and so always tells distinct scenes apart.
    """
    out: list[str] = []
    for k in range(n):
        for attempt in range(tries):
            template = TEMPLATES[k if k < len(TEMPLATES) else int(rng.integers(len(TEMPLATES)))]
            template = template if attempt < tries // 2 else _cap_absolute
            order = [scene[int(i)] for i in rng.permutation(len(scene))]
            caption = template(order, rng)
            fits = len(re.findall(r"\w+|[^\w\s]+", caption[0])) <= max_words
            if fits and caption[0] not in out and not any(holds(caption, o) for o in others):
                break
        out.append(caption[0])
    return out


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", raw.lower())


# -------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float) -> None:
    """Draw one filled shape of diameter ``d`` centred at (cx, cy) on an 'L' canvas (supersampled coords)."""
    r = d / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=255)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# offsets of the items of a small cluster, in units of the item spacing
CLUSTERS = {
    1: ([(0.0, 0.0)],),
    2: ([(-0.5, 0.0), (0.5, 0.0)], [(0.0, -0.5), (0.0, 0.5)], [(-0.5, -0.5), (0.5, 0.5)]),
    3: ([(-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)], [(0.0, -0.5), (-0.55, 0.45), (0.55, 0.45)], [(0.0, -1.0), (0.0, 0.0), (0.0, 1.0)]),
    4: ([(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],),
}


def _entity_alpha(e: Entity, size: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Soft coverage mask ``[size, size]`` in [0, 1] of all shapes of an entity (supersampled, box-filtered);
    ``scale`` multiplies shape sizes and cluster spacing."""
    cell = size / 3
    ss = SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx = (e.col + 0.5 + rng.uniform(-0.07, 0.07)) * cell
    cy = (e.row + 0.5 + rng.uniform(-0.07, 0.07)) * cell
    if e.size == "large":
        _draw_shape(draw, e.shape, cx * ss, cy * ss, cell * rng.uniform(0.62, 0.74) * scale * ss)
    else:
        layouts = CLUSTERS[e.count]
        layout = layouts[int(rng.integers(len(layouts)))]
        spacing, d = cell * 0.33 * scale, cell * rng.uniform(0.22, 0.26) * scale
        # keep the whole cluster inside the image
        ex = max(abs(ox) for ox, _ in layout) * spacing + d / 2 + 1
        ey = max(abs(oy) for _, oy in layout) * spacing + d / 2 + 1
        cx, cy = min(max(cx, ex), size - ex), min(max(cy, ey), size - ey)
        for ox, oy in layout:
            _draw_shape(draw, e.shape, (cx + ox * spacing) * ss, (cy + oy * spacing) * ss, d * ss)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(e: Entity, alpha: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Brightness modulation ``[size, size]`` whose alpha-weighted mean is ~0 (the mean colour is kept)."""
    if e.texture == "plain":
        return np.zeros((size, size), np.float32)
    x, y = _grid(size)
    period = max(3.0, round(size / 28))
    if e.texture == "striped":
        ax, ay = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(4))]
        dark = np.mod(x * ax + y * ay + rng.uniform(0, period), period) < period / 2
    elif e.texture == "dotted":
        q = period + 1.5
        px, py = np.mod(x + rng.uniform(0, q), q) - q / 2, np.mod(y + rng.uniform(0, q), q) - q / 2
        dark = px * px + py * py < (q * 0.3) ** 2
    else:
        raise ValueError(f"unknown texture {e.texture!r}; expected one of {TEXTURES}")
    f = float((alpha * dark).sum() / max(alpha.sum(), 1e-6))  # dark share of the shape
    f = min(max(f, 0.05), 0.95)
    return np.where(dark, -1.0, f / (1 - f)).astype(np.float32) * min(1.0, (1 - f) / f)


def _background(size: int, rng: np.random.Generator, max_distractors: int, clutter: int = 0) -> np.ndarray:
    """Dark tinted background ``[size, size, 3]`` float: flat, gradient or blotchy, plus grey specks and
    ``clutter`` specks in the shapes' colours (dimmed), which look like bits of small shapes to a merge."""
    base = rng.uniform(25, 70) + rng.uniform(-8, 8, size=3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    x, y = _grid(size)
    kind = int(rng.integers(3))
    if kind == 1:
        ang = rng.uniform(0, 2 * np.pi)
        img = img + (rng.uniform(8, 20) * ((x * np.cos(ang) + y * np.sin(ang)) / size))[..., None]
    elif kind == 2:
        coarse = rng.uniform(-14, 14, size=(5, 5)).astype(np.float32)
        blotch = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))
        img = img + blotch[..., None]
    for _ in range(int(rng.integers(max_distractors + 1))):
        g = rng.uniform(95, 140)
        px, py = (int(v) for v in rng.integers(0, size - 3, size=2))
        if rng.random() < 0.5:
            w, h = (int(v) for v in rng.integers(1, 4, size=2))
        else:
            w, h = (int(rng.integers(4, 9)), 1) if rng.random() < 0.5 else (1, int(rng.integers(4, 9)))
        img[py : py + h, px : px + w] = g
    colours = list(COLOURS.values())
    for _ in range(clutter):
        c = np.asarray(colours[int(rng.integers(len(colours)))], np.float32) * rng.uniform(0.6, 1.0)
        px, py = (int(v) for v in rng.integers(0, size - 3, size=2))
        w, h = (int(v) for v in rng.integers(1, 4, size=2))
        img[py : py + h, px : px + w] = c
    return img


def render_scene(
    scene: Scene, size: int, rng: np.random.Generator, noise: float = 4.0, max_distractors: int = 4,
    object_scale: float = 1.0, clutter: int = 0,
) -> np.ndarray:
    """Draw a scene: uint8 array ``[size, size, 3]``. Positions, sizes and texture phases jitter with ``rng``."""
    img = _background(size, rng, max_distractors, clutter)
    for e in scene:
        alpha = _entity_alpha(e, size, rng, object_scale)
        mod = _texture(e, alpha, size, rng)
        colour = np.asarray(COLOURS[e.colour], np.float32) + TEXTURE_DELTA * mod[..., None]
        img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    if noise > 0:
        img = img + rng.normal(0, noise, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- datasets
def _family_rng(seed: int, split: str, family: int) -> np.random.Generator:
    """Independent stream per (seed, split, family): the test split does not depend on n_train."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), family]))


@dataclass(frozen=True)
class DrawSettings:
    """How every family of a data set is drawn (``generate_dataset``'s arguments); the JSON keeps
    them as ``generator``, so the files can be made again."""

    seed: int
    image_size: int
    family_size: int
    n_entities: tuple[int, int]
    captions_per_image: int
    noise: float
    max_distractors: int
    object_scale: float
    clutter: int


def _family_members(settings: DrawSettings, split: str, index: int, n_left: int | None) -> list[tuple]:
    """Family ``index`` of ``split``, cut to ``n_left`` members (``None``: whole), as
    ``(image, captions, scene, variant)`` each. Depends on nothing but its arguments, so families
    can be made in any order and process."""
    st = settings
    rng = _family_rng(st.seed, split, index)
    family = sample_family(rng, st.family_size, st.n_entities)[: st.family_size if n_left is None else n_left]
    scenes = [s for s, _ in family]
    return [
        (render_scene(scene, st.image_size, rng, st.noise, st.max_distractors, st.object_scale, st.clutter),
         make_captions(scene, scenes[:k] + scenes[k + 1 :], rng, st.captions_per_image), scene, variant)
        for k, (scene, variant) in enumerate(family)
    ]


def _split_families(n: int, make: Callable[..., list], pool, chunk: int) -> Iterator[list]:
    """The families of one split in order, ``n`` images in all. With a ``pool``, ``chunk`` families
    are made at a time, whole; only the last family can be cut short, and it is made again cut."""
    made, index = 0, 0
    while made < n:
        starts = range(index, index + (chunk if pool else 1))
        batch = list(pool.map(make, starts, [None] * len(starts))) if pool else [make(index, n - made)]
        for family in batch:
            if made + len(family) > n:  # cut: the members' captions only tell apart the ones kept
                family = make(index, n - made)
            yield family
            made += len(family)
            index += 1
            if made >= n:
                return


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 96,
    seed: int = 0,
    family_size: int = 3,
    n_entities: tuple[int, int] = (2, 3),
    captions_per_image: int = 5,
    noise: float = 4.0,
    max_distractors: int = 4,
    object_scale: float = 1.0,
    clutter: int = 0,
    workers: int = 1,
) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/dataset_shapes.json`` (Karpathy format); return the JSON path.

    Args:
        n_train, n_val, n_test: images per split; a split is filled with whole families of
            ``family_size`` (base + twins), the last one cut short if needed.
        image_size: side in pixels (96 with patch 8 -> 144 patch tokens, as the default model).
        family_size: 1 disables twins (hard negatives).
        n_entities: inclusive range of entities per scene (2..3 fit the 3x3 grid and a caption).
        object_scale: multiplies shape sizes (1..1.25: larger shapes cover more patches, so a merge
            at a given cost has to touch more of them).
        clutter: coloured specks per image (see ``_background``).
        workers: processes that draw families (every family has its own random stream, so the
            files are the same for any number).
    """
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 to draw the 3x3 grid, got {image_size}")
    if family_size < 1 or not 2 <= n_entities[0] <= n_entities[1] <= 4:
        raise ValueError(f"need family_size >= 1 and 2 <= n_entities[0] <= n_entities[1] <= 4, got {family_size}, {n_entities}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 1.0 <= object_scale <= 1.25 or clutter < 0:
        raise ValueError(f"need 1 <= object_scale <= 1.25 and clutter >= 0, got {object_scale}, {clutter}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    sentid = 0
    family_id = 0
    settings = DrawSettings(seed, image_size, family_size, tuple(n_entities), captions_per_image, noise, max_distractors,
                            object_scale, clutter)
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for split, n in zip(SPLITS, (n_train, n_val, n_test)):
            make = partial(_family_members, settings, split)
            for family in _split_families(n, make, pool, 8 * workers):
                for image, raws, scene, variant in family:
                    imgid = len(images)
                    filename = IMAGE_PATTERN.format(image_id=imgid)
                    Image.fromarray(image).save(out_dir / "images" / filename)
                    sentences = [
                        {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sentid + i} for i, raw in enumerate(raws)
                    ]
                    images.append(
                        {
                            "filepath": "images",
                            "sentids": [s["sentid"] for s in sentences],
                            "filename": filename,
                            "imgid": imgid,
                            "split": split,
                            "sentences": sentences,
                            "family": family_id,
                            "variant": variant,
                            "objects": [asdict(e) for e in scene],
                        }
                    )
                    sentid += len(sentences)
                family_id += 1
    path = out_dir / "dataset_shapes.json"
    path.write_text(json.dumps({"images": images, "dataset": "shapes", "generator": asdict(settings)}))
    return path
