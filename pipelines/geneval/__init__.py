"""GenEval's prompt metadata and rules (Ghosh et al. 2023), in one place for the shapes generator (whose captions are
GenEval prompts), the evaluation prompt sets (`workloads.evaluate`) and the scorer: `detect` (the shapes detector),
`scoring` (GenEval's all-or-nothing score) and `credit` (partial credit), here so that both the shapes autoencoder's
check (`pipelines.synthetic.shapes_vae`) and the jobs in `workloads/` can score images.

A prompt's metadata is one JSON object: `tag` (one of `TAGS`), `prompt`, `include: [{class, count, color?,
position?: [relation, index]}]` and, for counting, `exclude: [{class, count}]`; a `position` names an earlier
`include` entry, the object it is relative to. Wording follows GenEval's prompt file ("a photo of a dog right of a
teddy bear", "a photo of three cups").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COUNTS = (2, 3, 4)  # GenEval's counting prompts ask for two to four objects
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
POSITION_THRESHOLD = 0.1  # GenEval: offsets count beyond 0.1 times the two boxes' summed sizes
# GenEval's prompt file: 553 prompts, 4 images each
PROMPTS_PER_TAG = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                   "color_attr": 100}
IMAGES_PER_PROMPT = 4


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _a(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def noun_phrase(cls: str, color: str | None = None) -> str:
    """One object as a prompt names it: "a circle", "an orange square"."""
    return _a(f"{color} {cls}" if color else cls)


def metadata(tag: str, classes: Sequence[str], colors: Sequence[str | None] = (), count: int = 1,
             relation: str | None = None) -> dict:
    """The prompt and metadata of one GenEval prompt. `classes` (and `colors` for colors/color_attr) name its
    objects: one for single_object, counting and colors; two for the others, the subject first (for position the
    subject is `relation` of the second)."""
    colors = list(colors) or [None] * len(classes)
    want = {"single_object": 1, "counting": 1, "colors": 1}.get(tag, 2)
    if tag not in TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}: expected one of {TAGS}")
    if len(classes) != want or len(colors) != want:
        raise ValueError(f"a {tag} prompt names {want} object(s), got classes={list(classes)} colors={colors}")
    if tag in ("two_object", "position", "color_attr") and classes[0] == classes[1]:
        raise ValueError(f"a {tag} prompt names two different classes, got {classes[0]!r} twice")
    named = tag in ("colors", "color_attr")
    if named != all(colors) or (not named and any(colors)):
        raise ValueError(f"{tag} prompts {'name' if named else 'do not name'} colours, got {colors}")
    a = classes[0]
    if tag == "counting":
        if count not in NUMBER_WORDS:
            raise ValueError(f"counting prompts ask for {sorted(NUMBER_WORDS)} objects, got {count}")
        return {"tag": tag, "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(a)}",
                "include": [{"class": a, "count": count}], "exclude": [{"class": a, "count": count + 1}]}
    if tag == "position":
        if relation not in RELATIONS:
            raise ValueError(f"position prompts use one of {RELATIONS}, got {relation!r}")
        b = classes[1]
        return {"tag": tag, "prompt": f"a photo of {noun_phrase(a)} {relation} {noun_phrase(b)}",
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]}
    include = [{"class": c, "count": 1} | ({"color": k} if k else {}) for c, k in zip(classes, colors, strict=True)]
    text = " and ".join(noun_phrase(c, k) for c, k in zip(classes, colors, strict=True))
    return {"tag": tag, "prompt": f"a photo of {text}", "include": include}


def distinct_prompts(tag: str, classes: Sequence[str], colors: Sequence[str]) -> list[dict]:
    """Every prompt of one task over the classes and colours."""
    pairs = list(itertools.permutations(classes, 2))
    if tag == "single_object":
        return [metadata(tag, [c]) for c in classes]
    if tag == "two_object":
        return [metadata(tag, list(p)) for p in itertools.combinations(classes, 2)]
    if tag == "counting":
        return [metadata(tag, [c], count=n) for c in classes for n in COUNTS]
    if tag == "colors":
        return [metadata(tag, [c], [k]) for c in classes for k in colors]
    if tag == "position":
        return [metadata(tag, list(p), relation=r) for p in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [metadata(tag, list(p), list(k)) for p in itertools.combinations(classes, 2)
                for k in itertools.permutations(colors, 2)]
    raise ValueError(f"unknown GenEval tag {tag!r}: expected one of {TAGS}")


def parse(prompt: str, classes: Sequence[str], colors: Sequence[str]) -> dict:
    """The metadata of a prompt `metadata` wrote for these classes and colours (the inverse of `metadata`)."""
    cls = "|".join(sorted(map(re.escape, classes), key=len, reverse=True))
    col = "|".join(sorted(map(re.escape, colors), key=len, reverse=True))
    plurals = {plural(c): c for c in classes}
    one = rf"an? (?:(?P<{{k}}>{col}) )?(?P<{{c}}>{cls})"
    numbers, nouns = "|".join(NUMBER_WORDS.values()), "|".join(map(re.escape, plurals))
    patterns = [
        ("counting", rf"a photo of (?P<n>{numbers}) (?P<p>{nouns})"),
        ("position", rf"a photo of {one.format(k='k1', c='c1')} (?P<r>{'|'.join(RELATIONS)}) "
                     rf"{one.format(k='k2', c='c2')}"),
        ("two", rf"a photo of {one.format(k='k1', c='c1')} and {one.format(k='k2', c='c2')}"),
        ("one", rf"a photo of {one.format(k='k1', c='c1')}"),
    ]
    for kind, pattern in patterns:
        if m := re.fullmatch(pattern, prompt.strip()):
            g = m.groupdict()
            if kind == "counting":
                count = {w: n for n, w in NUMBER_WORDS.items()}[g["n"]]
                return metadata("counting", [plurals[g["p"]]], count=count)
            if kind == "position" and not (g["k1"] or g["k2"]):
                return metadata("position", [g["c1"], g["c2"]], relation=g["r"])
            if kind == "two" and bool(g["k1"]) == bool(g["k2"]):
                tag = "color_attr" if g["k1"] else "two_object"
                return metadata(tag, [g["c1"], g["c2"]], [g["k1"], g["k2"]] if g["k1"] else ())
            if kind == "one":
                return metadata("colors" if g["k1"] else "single_object", [g["c1"]], [g["k1"]] if g["k1"] else ())
    raise ValueError(f"not a GenEval prompt over classes {list(classes)} and colours {list(colors)}: {prompt!r}")


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """GenEval's relations of box A to box B (x0, y0, x1, y1; y grows downwards): the centre offset, shrunk on each
    axis by `POSITION_THRESHOLD` times the summed box sizes, names a direction where its share of the offset's
    length is above 0.5; overlapping or near-centred boxes have no relation."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found
