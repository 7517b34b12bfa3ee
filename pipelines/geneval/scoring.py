"""GenEval's scoring of one image against its prompt's metadata, and the summary over a prompt set.

As GenEval's `evaluate_images.py`: detections are grouped by class, most confident first; every `include` must hold
(at least `count` of the class, the first `count` of them of the asked colour, each of them in the asked relation to
every object of the earlier include it names) and any `exclude` fails the image (`count` or more of the class, so
counting asks for exactly N). Per task the share of correct images; overall the unweighted mean of the tasks. Beside
it, the partial credits of `credit` and, where the rows carry their prompts' metadata and detections, their chance
levels (the same images against shuffled prompts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict

from pipelines.geneval import TAGS, credit, relative_position
from pipelines.geneval.detect import Detection


def score_image(meta: dict, detections: list[Detection]) -> tuple[bool, list[str]]:
    """(correct, reasons it is not) for one image's detections."""
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in sorted(detections, key=lambda d: -d.score):
        by_class[d.cls].append(d)
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for want in meta.get("include", []):
        cls, count = want["class"], want["count"]
        found = by_class[cls][:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in want and sum(d.color == want["color"] for d in found) < count:
            ok = False
            reasons.append(f"expected {want['color']} {cls}>={count}, found {[d.color for d in found]}")
        elif "position" in want:
            relation, target = want["position"]
            group = matched[target]
            if group is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            elif not all(relation in relative_position(d.box, t.box) for d in found for t in group):
                ok = False
                reasons.append(f"expected {cls} {relation} target")
        correct &= ok
        matched.append(found if ok else None)
    for avoid in meta.get("exclude", []):
        if len(by_class[avoid["class"]]) >= avoid["count"]:
            correct = False
            reasons.append(f"expected {avoid['class']}<{avoid['count']}, found {len(by_class[avoid['class']])}")
    return correct, reasons


def summarize(results: Iterable[dict]) -> dict:
    """{"overall", "tasks": {tag: share correct}, "images", "prompts", "correct_images", "prompts_any_correct"} over
    per-image results ({"tag", "prompt_index", "correct"}); overall is the mean over the tasks present. Rows with a
    `credit` (`credit.partial_credit`) add "credit" (`credit.aggregate`); rows that also carry `metadata` and
    `details` (the detections) add "chance" (`credit.shuffled`)."""
    results = list(results)
    per_tag: dict[str, list[bool]] = defaultdict(list)
    per_prompt: dict[object, bool] = {}
    for r in results:
        per_tag[r["tag"]].append(bool(r["correct"]))
        key = r.get("prompt_index", r.get("prompt"))
        per_prompt[key] = per_prompt.get(key, False) or bool(r["correct"])
    tasks = {t: sum(v) / len(v) for t in TAGS if (v := per_tag.get(t))}
    images = sum(len(v) for v in per_tag.values())
    summary = {"overall": sum(tasks.values()) / len(tasks) if tasks else 0.0, "tasks": tasks, "images": images,
               "prompts": len(per_prompt),
               "correct_images": sum(sum(v) for v in per_tag.values()) / images if images else 0.0,
               "prompts_any_correct": sum(per_prompt.values()) / len(per_prompt) if per_prompt else 0.0}
    if results and all("credit" in r for r in results):
        summary["credit"] = credit.aggregate((r["tag"], r["credit"]) for r in results)
    if results and all("metadata" in r and "details" in r for r in results):
        summary["chance"] = credit.shuffled(results, score_image)
    return summary


def score_detections(meta: dict, detections: list[Detection]) -> dict:
    """The result fields of one image: {"correct", "reason", "credit", "details"} (the detections as dicts)."""
    correct, reasons = score_image(meta, detections)
    return {"correct": correct, "reason": "\n".join(reasons), "credit": credit.partial_credit(meta, detections),
            "details": [asdict(d) for d in detections]}
