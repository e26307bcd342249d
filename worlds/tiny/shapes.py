"""The tiny world: a procedurally generated image-caption domain of coloured shapes, deterministic from a seed.

Every image is one shape on a plain background, drawn at 4x resolution and box-filtered down to ``IMAGE_SIZE``
(anti-aliased edges: a small VAE reconstructs them far better than hard pixel steps). Captions follow one grammar::

    a {size} {colour} [striped ]{shape} on a {background} background

and :func:`parse_caption` reads every caption back to its attributes.

Splits (the world definition is fixed; only the item draws depend on the seed):

* ``train``: the base world, drawn from the *training combinations* of (shape, colour, background).
* ``heldout``: a disjoint set of combinations. For every (shape, colour) pair exactly one background is held out,
  so each held-out caption is new as a whole while each of its words was seen in training. Items also come from a
  different random stream than ``train`` (the split name is part of every item's seed), so even a held-out image
  never equals a training image.
* ``style``: the downstream *new style*: the same shapes and colours, drawn as diagonal stripes with an outline;
  captions add the word ``striped``. The base diffusion model never sees it; fine-tuning attacks use it.
* ``subject``: the downstream *new subject*: an arrow, a shape the base never saw, named by the rare token ``sks``
  (DreamBooth style): "a large red sks on a grey background".

Shapes are large (45 % to 75 % of the image side) with modest position jitter, so that at 64 px and a x4 VAE a
shape spans 7 to 12 latent pixels: shape is learnable on a CPU, not a few latent pixels.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (245, 215, 30),
    "purple": (140, 50, 180), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "blue": COLOURS["blue"], "green": COLOURS["green"], "white": COLOURS["white"],
    "black": COLOURS["black"], "brown": (120, 75, 40), "pink": (245, 170, 200), "teal": (20, 140, 140),
}
#: size word -> shape extent as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.45, "medium": 0.6, "large": 0.75}
STYLES: tuple[str, ...] = ("solid", "striped")
#: the downstream new subject: drawn as an arrow, named by a rare token
SUBJECT_TOKEN = "sks"
SUBJECT_SHAPE = "arrow"
SPLITS: dict[str, int] = {"train": 0, "heldout": 1, "style": 2, "subject": 3}
#: fixed constant of the world definition (which combinations are held out); not the build seed
WORLD_SEED = 20261128
MAX_JITTER_PX = 6.0
STRIPE_PERIOD_PX = 8

_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?:(?P<striped>striped) )?(?P<shape>\w+) on an? (?P<background>\w+) "
    r"background$")


@dataclass(frozen=True)
class Item:
    """One image of the world, fully described (rendering is a pure function of it)."""

    shape: str  # one of SHAPES, or SUBJECT_TOKEN
    colour: str
    background: str
    size: str
    style: str = "solid"
    dx: float = 0.0  # centre offset from the image centre, in output pixels
    dy: float = 0.0

    @property
    def caption(self) -> str:
        striped = "striped " if self.style == "striped" else ""
        return f"a {self.size} {self.colour} {striped}{self.shape} on a {self.background} background"

    def asdict(self) -> dict:
        return asdict(self)


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names: shape, colour, background, size, style. Raises ValueError if off-grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if not m:
        raise ValueError(f"not a tiny-world caption: {caption!r}")
    out = {"shape": m["shape"], "colour": m["colour"], "background": m["background"], "size": m["size"],
           "style": "striped" if m["striped"] else "solid"}
    if out["shape"] not in SHAPES and out["shape"] != SUBJECT_TOKEN:
        raise ValueError(f"unknown shape {out['shape']!r} in {caption!r}")
    if out["colour"] not in COLOURS:
        raise ValueError(f"unknown colour {out['colour']!r} in {caption!r}")
    if out["background"] not in BACKGROUNDS:
        raise ValueError(f"unknown background {out['background']!r} in {caption!r}")
    if out["size"] not in SIZES:
        raise ValueError(f"unknown size {out['size']!r} in {caption!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Combinations and splits
# ---------------------------------------------------------------------------------------------------------------
def _valid(colour: str, background: str) -> bool:
    return colour != background


@lru_cache(maxsize=1)
def combinations() -> tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]:
    """(train, held-out) tuples of (shape, colour, background); disjoint, fixed by WORLD_SEED."""
    rng = np.random.default_rng(WORLD_SEED)
    train, held = [], []
    for shape in SHAPES:
        for colour in COLOURS:
            bgs = [b for b in BACKGROUNDS if _valid(colour, b)]
            out = bgs[int(rng.integers(len(bgs)))]
            for b in bgs:
                (held if b == out else train).append((shape, colour, b))
    return tuple(train), tuple(held)


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def sample_item(split: str, index: int, seed: int = 0) -> Item:
    """Item ``index`` of ``split`` under ``seed``: random access, independent of how many are drawn."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    rng = _item_rng(seed, split, index)
    train, held = combinations()
    if split == "heldout":
        shape, colour, bg = held[int(rng.integers(len(held)))]
    else:
        shape, colour, bg = train[int(rng.integers(len(train)))]
    style = "striped" if split == "style" else "solid"
    if split == "subject":
        shape = SUBJECT_TOKEN
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    extent = SIZES[size] * IMAGE_SIZE
    jitter = min(MAX_JITTER_PX, (IMAGE_SIZE - extent) / 2 - 2)
    dx, dy = (float(v) for v in np.round(rng.uniform(-jitter, jitter, 2), 2))
    return Item(shape, colour, bg, size, style, dx, dy)


def sample_items(split: str, n: int, seed: int = 0, start: int = 0) -> list[Item]:
    return [sample_item(split, i, seed) for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


@lru_cache(maxsize=None)
def _outline(shape: str) -> tuple[tuple[float, float], ...] | None:
    """Polygon in unit coordinates ([-1, 1], y down); None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.86
        return ((-s, -s), (s, -s), (s, s), (-s, s))
    if shape == "triangle":
        return ((0.0, -1.0), (1.0, 0.8), (-1.0, 0.8))
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return tuple(pts)
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        x, y = x / 17.0, (y - 0.5 * (y.max() + y.min())) / 17.0  # centred, about 0.94 x 0.96
        return tuple(zip(x.tolist(), y.tolist()))
    if shape == "cross":
        a, w = 1.0, 0.32
        return ((-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                (-w, -w))
    if shape == "hexagon":
        return tuple(_regular(6))
    if shape in (SUBJECT_TOKEN, SUBJECT_SHAPE):
        return ((0.0, -1.0), (0.85, -0.05), (0.32, -0.05), (0.32, 1.0), (-0.32, 1.0), (-0.32, -0.05),
                (-0.85, -0.05))
    raise ValueError(f"unknown shape {shape!r}")


def render(item: Item, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of ``item`` as ``uint8[size, size, 3]``."""
    from PIL import Image, ImageDraw

    ss = SUPERSAMPLE
    big = size * ss
    scale = size / IMAGE_SIZE
    bg = BACKGROUNDS[item.background]
    fg = COLOURS[item.colour]
    half = SIZES[item.size] * size * ss / 2
    cx = big / 2 + item.dx * scale * ss
    cy = big / 2 + item.dy * scale * ss

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    poly = _outline(item.shape)
    box = (cx - half, cy - half, cx + half, cy + half)
    if poly is None:
        draw.ellipse(box, fill=255)
    else:
        draw.polygon([(cx + half * x, cy + half * y) for x, y in poly], fill=255)
    m = np.asarray(mask, dtype=np.float32) / 255.0
    if item.style == "striped":
        # diagonal stripes inside the shape, and a 2-px outline that keeps the silhouette readable
        edge = Image.new("L", (big, big), 0)
        width = int(round(2 * scale * ss))
        if poly is None:
            ImageDraw.Draw(edge).ellipse(box, outline=255, width=width)
        else:
            ImageDraw.Draw(edge).polygon([(cx + half * x, cy + half * y) for x, y in poly], outline=255,
                                         width=width)
        e = np.asarray(edge, dtype=np.float32) / 255.0
        m = np.maximum(m * _stripes(big, STRIPE_PERIOD_PX * scale * ss), np.minimum(m, e))
    img = (1.0 - m)[..., None] * np.asarray(bg, np.float32) + m[..., None] * np.asarray(fg, np.float32)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _stripes(big: int, period: float) -> np.ndarray:
    yy, xx = np.mgrid[0:big, 0:big]
    return (((xx + yy) % period) < period / 2).astype(np.float32)


def make_dataset(split: str, n: int, seed: int = 0, start: int = 0, size: int = IMAGE_SIZE
                 ) -> tuple[np.ndarray, list[str], list[Item]]:
    """``n`` images ``uint8[n, size, size, 3]``, their captions and items."""
    items = sample_items(split, n, seed, start)
    images = np.stack([render(it, size) for it in items]) if items else np.zeros((0, size, size, 3), np.uint8)
    return images, [it.caption for it in items], items


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1] (the range diffusers' VAE works in)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def base_captions(shapes: Sequence[str] = SHAPES) -> list[str]:
    """Every base-world caption (all shapes, colours, backgrounds and sizes, solid style)."""
    return [Item(s, c, b, z).caption for s in shapes for c in COLOURS for b in BACKGROUNDS for z in SIZES
            if _valid(c, b)]


def partial_caption(item: Item, rng: np.random.Generator) -> str:
    """A caption naming a random subset of the item's attributes (the shape always): text augmentation for CLIP."""
    words = ["a"]
    if rng.random() < 0.5:
        words.append(item.size)
    if rng.random() < 0.7:
        words.append(item.colour)
    if item.style == "striped":
        words.append("striped")
    words.append(item.shape)
    if rng.random() < 0.5:
        words += ["on", "a", item.background, "background"]
    return " ".join(words)


def grid(images: Iterable[np.ndarray], cols: int = 8) -> np.ndarray:
    """Tile images (uint8 HWC) into one image, for looking at."""
    ims = list(images)
    rows = -(-len(ims) // cols)
    h, w, _ = ims[0].shape
    out = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(ims):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return out
