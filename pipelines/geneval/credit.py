"""Partial credit beside GenEval's all-or-nothing score: what of a prompt an image gets right before it gets all of it.

Per image, from its prompt's metadata and the detections (GenEval's `include` entries name the objects):
- `count`: the image holds as many objects (of any shape and colour) as the prompt asks for (1 for one object, N for
  "N circles", 2 for two objects, a position or two colours): the layout, which training learns first;
- `colors`: the share of the colours the prompt names that some object has (colours and colour-attribution prompts);
- `shapes`: the share of the shapes the prompt names that some object has;
- `relation`: for position prompts, the subject stands in the named relation to the reference object; where the
  detector finds only one of the two named shapes, the other is the most confident remaining object, so a layout with
  one shape wrong still counts; with neither shape found, 0;
- `empty`: no object at all (guidance can push a one-object prompt below one);
- `objects`: the number of objects, beside `asked`, the number the prompt asks for.
A field that does not apply to a prompt (`colors` where none is named, `relation` outside position prompts) is None.

Aggregates are per task the mean over the images where a field applies, and overall the unweighted mean over the
tasks, as GenEval's overall score. Their chance level is the same images scored against shuffled prompts
(`shuffled`): what a network that ignored its prompt would get with the same images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from pipelines.geneval import TAGS, relative_position
from pipelines.geneval.detect import Detection

FIELDS = ("count", "colors", "shapes", "relation", "empty", "objects", "asked")
# the fields whose shuffled-prompt level is a chance level; `empty` and `objects` do not read the prompt
PROMPTED = ("count", "colors", "shapes", "relation")


def asked_objects(meta: dict) -> int:
    """How many objects the prompt asks for."""
    return sum(int(want["count"]) for want in meta.get("include", []))


def _relation(meta: dict, detections: Sequence[Detection]) -> float:
    """1.0 when the position prompt's subject is in its relation to the reference (see the module docstring)."""
    reference, subject = meta["include"][0], meta["include"][1]
    relation = subject["position"][0]
    ranked = sorted(detections, key=lambda d: -d.score)
    pick = {role: next((d for d in ranked if d.cls == want["class"]), None)
            for role, want in (("subject", subject), ("reference", reference))}
    if pick["subject"] is None and pick["reference"] is None:
        return 0.0
    for role in ("subject", "reference"):
        if pick[role] is None:
            taken = [d for d in pick.values() if d is not None]
            pick[role] = next((d for d in ranked if all(d is not t for t in taken)), None)
    if pick["subject"] is None or pick["reference"] is None:
        return 0.0
    return float(relation in relative_position(pick["subject"].box, pick["reference"].box))


def partial_credit(meta: dict, detections: Sequence[Detection]) -> dict[str, float | None]:
    """The image's partial credits (`FIELDS`) against its prompt's metadata."""
    include = meta.get("include", [])
    found_classes = {d.cls for d in detections}
    found_colors = {d.color for d in detections}
    named_classes = {want["class"] for want in include}
    named_colors = [want["color"] for want in include if "color" in want]
    asked = asked_objects(meta)
    return {
        "count": float(len(detections) == asked),
        "colors": sum(c in found_colors for c in named_colors) / len(named_colors) if named_colors else None,
        "shapes": len(named_classes & found_classes) / len(named_classes) if named_classes else None,
        "relation": _relation(meta, detections) if any("position" in w for w in include) else None,
        "empty": float(not detections),
        "objects": float(len(detections)),
        "asked": float(asked),
    }


def aggregate(rows: Iterable[tuple[str, dict]]) -> dict:
    """{"overall": {field: mean}, "tasks": {tag: {field: mean}}} over (tag, credit) rows; a field that applies to
    no image of a task is left out of that task."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tag, credit in rows:
        for name, value in credit.items():
            if value is not None:
                values[tag][name].append(float(value))
    tasks = {t: {f: float(np.mean(values[t][f])) for f in FIELDS if values[t].get(f)} for t in TAGS if t in values}
    overall = {f: float(np.mean(v)) for f in FIELDS if (v := [tasks[t][f] for t in tasks if f in tasks[t]])}
    return {"overall": overall, "tasks": tasks}


def detections_of(result: dict) -> list[Detection]:
    """A result row's detections (its `details`, as `dataclasses.asdict` wrote them)."""
    return [Detection(d["cls"], tuple(d["box"]), d["color"], d["score"]) for d in result.get("details", [])]


def shuffled_partners(prompts: Sequence[str], seed: int = 0) -> np.ndarray:
    """For each image, another image whose prompt it is scored against: a fixed random permutation in which no image
    meets its own prompt (while no prompt holds more than half the images). The images are laid out prompt by prompt
    (prompts in random order) and each takes the prompt of the image as many places on as the largest prompt has
    images, so the two always fall in different prompts."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    names = list(groups)
    order = np.array([i for g in rng.permutation(len(names)) for i in rng.permutation(groups[names[g]])], dtype=int)
    step = max((len(g) for g in groups.values()), default=0)
    partners = np.empty(len(prompts), dtype=np.int64)
    partners[order] = np.roll(order, -step)
    return partners


def shuffled(results: Sequence[dict], score) -> dict:
    """The chance levels: each image's detections scored against a shuffled prompt (`shuffled_partners`), aggregated
    by the task of the prompt scored against: {"geneval": overall, "tasks": {tag: share correct}, "credit": ...}.
    `score(meta, detections) -> (correct, reasons)` is GenEval's rule (`scoring.score_image`)."""
    partners = shuffled_partners([r["metadata"]["prompt"] for r in results])
    correct: dict[str, list[bool]] = defaultdict(list)
    credits = []
    for result, partner in zip(results, partners, strict=True):
        meta, found = results[int(partner)]["metadata"], detections_of(result)
        correct[meta["tag"]].append(bool(score(meta, found)[0]))
        credit = partial_credit(meta, found)
        credits.append((meta["tag"], {f: credit[f] for f in PROMPTED}))
    tasks = {t: float(np.mean(correct[t])) for t in TAGS if t in correct}
    return {"geneval": float(np.mean(list(tasks.values()))) if tasks else 0.0, "tasks": tasks,
            "credit": aggregate(credits)}


def credit_line(summary: dict) -> str:
    """The overall partial credits of a summary, each beside its chance level where the summary has one: "count 0.42
    (chance 0.30), colors ..., empty 0.12, objects 1.7 of 1.8 asked"."""
    got = summary.get("credit", {}).get("overall", {})
    chance = summary.get("chance", {}).get("credit", {}).get("overall", {})
    parts = [f"{f} {got[f]:.2f}" + (f" (chance {chance[f]:.2f})" if f in chance else "") for f in PROMPTED if f in got]
    if "empty" in got:
        parts.append(f"empty {got['empty']:.2f}")
    if "objects" in got:
        parts.append(f"objects {got['objects']:.2f} of {got['asked']:.2f} asked")
    return ", ".join(parts) or "none"


def overall_credit(fields: dict) -> dict[str, float]:
    """Of flat metric fields (`inline.metric_fields`, a run's summary), the overall partial credits `credit_<field>`
    and the chance levels `chance_*`, leaving out the per-task ones: a study's trial row."""
    return {k: v for k, v in fields.items()
            if k.startswith("chance_") or (k.startswith("credit_") and k.removeprefix("credit_") in FIELDS)}
