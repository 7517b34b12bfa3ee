"""A procedural dataset of coloured geometric shapes whose captions are GenEval prompts, with ground-truth boxes.

Each image holds one to four flat-coloured shapes on a light pastel background. Its caption is a prompt of one of
GenEval's six tasks (`pipelines.geneval`): a single object, two objects, a count ("a photo of three circles"), a
colour, a position read off the drawn boxes by GenEval's own rule, or two coloured objects; so every caption is true
of its image and a folder of samples is a GenEval ground truth. Objects whose colour the caption does not name get a
random one. Each sample also has a synthetic caption, standing in for the paper's VLM (CogVLM) captions: every object
with its colour, the count, and the relation of two objects (`synthetic_caption`). Sample `i` of a seed depends only
on `(seed, i)`, so any sample can be regenerated alone and shards can be written in any order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from conf.shapes import Style
from pipelines import geneval

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (235, 200, 20),
    "green": (34, 160, 60),
    "blue": (37, 90, 220),
    "purple": (130, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
MIN_SIZE = 32

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges, exact colour inside each shape
DEFAULT_STYLE = Style()


@dataclass
class Sample:
    """One image, its caption, its synthetic caption, and the objects drawn in it (in the order the caption names
    them)."""

    key: str
    image: Image.Image
    caption: str  # a terse GenEval prompt
    synthetic_caption: str  # every object described, as a captioning model would
    objects: list[dict]
    metadata: dict  # the caption's GenEval metadata


def sample_key(seed: int, index: int) -> str:
    return f"{seed:04d}-{index:06d}"


def relation(subject: dict, reference: dict) -> str | None:
    """The one GenEval relation of `subject` to `reference` by their boxes; None when there is none or two."""
    found = geneval.relative_position(subject["bbox"], reference["bbox"])
    return found.pop() if len(found) == 1 else None


def synthetic_caption(objects: list[dict]) -> str:
    """Every object with its colour, in the caption's order; the count when all are of one shape; for two objects the
    `relation` of the first to the second when there is one. E.g. "a photo of a purple circle", "a photo of an orange
    star left of a green cross", "a photo of three squares: a red square, a blue square and a red square"."""
    named = [geneval.noun_phrase(o["shape"], o["color"]) for o in objects]
    related = relation(objects[0], objects[1]) if len(objects) == 2 else None
    scene = f"{named[0]} {related} {named[1]}" if related else _listing(named)
    shapes = {o["shape"] for o in objects}
    if len(objects) > 1 and len(shapes) == 1:
        return f"a photo of {geneval.NUMBER_WORDS[len(objects)]} {geneval.plural(shapes.pop())}: {scene}"
    return f"a photo of {scene}"


def _listing(phrases: list[str]) -> str:
    """Phrases as a list is read out: "x", "x and y", "x, y and z"."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def _star() -> list[tuple[float, float]]:
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles), strict=True))


_OUTLINES: dict[str, Callable[[], list[tuple[float, float]]]] = {
    "square": lambda: [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": lambda: [(0.5, 0), (1, 1), (0, 1)],
    "star": _star,
    "cross": lambda: [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1), (1, 1)],
}


def _polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The shape's outline stretched to fill `box` exactly, so the box is the tight bounding box."""
    points = np.asarray(_OUTLINES[shape](), dtype=np.float64)
    lo, hi = points.min(axis=0), points.max(axis=0)
    unit = (points - lo) / (hi - lo)
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in unit]


def _specs(tag: str, rng: np.random.Generator, counts: tuple[int, ...]) -> list[tuple[str, str]]:
    """(color, shape) of each object: two objects of different shapes where the prompt names two, two to four of one
    shape for counting, colours at random."""
    colors = list(COLORS)

    def color() -> str:
        return colors[rng.integers(len(colors))]

    if tag == "counting":
        shape = SHAPES[rng.integers(len(SHAPES))]
        return [(color(), shape) for _ in range(int(rng.choice(counts)))]
    n = 1 if tag in ("single_object", "colors") else 2
    return [(color(), SHAPES[j]) for j in rng.choice(len(SHAPES), size=n, replace=False)]


def _overlaps(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _layout(specs: list[tuple[str, str]], tag: str, size: int, rng: np.random.Generator,
            style: Style = DEFAULT_STYLE) -> list[dict]:
    """Non-overlapping boxes inside the canvas (and an unambiguous relation for `position`), by rejection."""
    margin, gap = max(1, size // 64), max(2, size // 32)
    scale = 1.0
    for attempt in range(2000):
        if attempt and attempt % 200 == 0:
            scale *= 0.85  # crowded draws are rare; shrinking guarantees progress
        lo = max(4, round(style.min_side * size * scale))
        hi = max(lo, round(style.max_side * size * scale))
        objects: list[dict] = []
        for color, shape in specs:
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(margin, size - margin - side + 1, size=2))
            bbox = [x0, y0, x0 + side, y0 + side]
            if any(_overlaps(bbox, other["bbox"], gap) for other in objects):
                break
            objects.append({"shape": shape, "color": color, "bbox": bbox,
                            "center": [(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2]})
        else:
            if tag != "position" or relation(objects[0], objects[1]) is not None:
                return objects
    raise RuntimeError(f"no layout for {specs} on a {size}px canvas")


def _metadata(tag: str, objects: list[dict]) -> dict:
    shapes = [o["shape"] for o in objects]
    if tag == "counting":
        return geneval.metadata(tag, shapes[:1], count=len(objects))
    if tag == "position":
        return geneval.metadata(tag, shapes, relation=relation(objects[0], objects[1]))
    colors = [o["color"] for o in objects] if tag in ("colors", "color_attr") else ()
    return geneval.metadata(tag, shapes, colors)


def draw(objects: list[dict], background: tuple[int, int, int], size: int) -> Image.Image:
    f = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * f, size * f), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        box = (x0 * f, y0 * f, x1 * f - 1, y1 * f - 1)
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon(_polygon(obj["shape"], box), fill=color)
    return canvas.resize((size, size), Image.Resampling.BOX)


def make_sample(seed: int, index: int, size: int = 256, style: Style = DEFAULT_STYLE) -> Sample:
    """Sample `index` of `seed`: a function of (seed, index, size, style) alone."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    rng = np.random.default_rng([seed, index])
    tag = geneval.TAGS[rng.integers(len(geneval.TAGS))]
    background = tuple(int(v) for v in rng.integers(style.background_low, 256, size=3))
    counts = tuple(c for c in geneval.COUNTS if c <= style.max_objects)  # what counting prompts draw
    objects = _layout(_specs(tag, rng, counts), tag, size, rng, style)
    meta = _metadata(tag, objects)
    return Sample(sample_key(seed, index), draw(objects, background, size), meta["prompt"],
                  synthetic_caption(objects), objects, meta)


def generate(n: int, seed: int, size: int = 256, style: Style = DEFAULT_STYLE) -> Iterator[Sample]:
    """Samples 0 .. n-1 of `seed`, deterministic for the seed and style."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for index in range(n):
        yield make_sample(seed, index, size, style)
