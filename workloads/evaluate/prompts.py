"""GenEval prompt sets for the shapes' classes and colours, in GenEval's metadata format (one JSON object a line).

GenEval's own file has 553 prompts (`PROMPTS_PER_TAG`). The shapes have 5 classes and 6 colours, so some tasks have
fewer distinct prompts than GenEval asks for (5 single objects): each task lists all of its distinct prompts in a
seeded order and repeats that list to its count, so every prompt appears before any appears twice.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from pipelines import geneval
from pipelines.synthetic.shapes import COLORS, SHAPES


def prompt_set(seed: int = 0, per_tag: dict[str, int] | None = None, classes: Sequence[str] = SHAPES,
               colors: Sequence[str] = tuple(COLORS)) -> list[dict]:
    """`per_tag` prompts of each task (GenEval's counts by default), tasks in GenEval's order."""
    per_tag = geneval.PROMPTS_PER_TAG if per_tag is None else per_tag
    out = []
    for tag in geneval.TAGS:
        pool = geneval.distinct_prompts(tag, classes, colors)
        random.Random(f"{seed}/{tag}").shuffle(pool)
        out += [pool[i % len(pool)] for i in range(per_tag.get(tag, 0))]
    return out


def write_jsonl(prompts: list[dict], path: str) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_prompts(per_tag: dict[str, int], held_out: dict[str, int], seed: int = 0,
                     classes: Sequence[str] = SHAPES, colors: Sequence[str] = tuple(COLORS)) -> list[dict]:
    """Up to `per_tag` distinct prompts of each task that the evaluation set `prompt_set(seed, held_out)` does not
    contain, for training on prompts (preference pairs) while GenEval scores held-out ones. A task with fewer left
    gets what is left (single objects: of 5 shapes, 4 held out leave 1)."""
    evaluation = {p["prompt"] for p in prompt_set(seed, held_out, classes, colors)}
    out = []
    for tag in geneval.TAGS:
        pool = [p for p in geneval.distinct_prompts(tag, classes, colors) if p["prompt"] not in evaluation]
        random.Random(f"train/{seed}/{tag}").shuffle(pool)
        out += pool[:per_tag.get(tag, 0)]
    return out
