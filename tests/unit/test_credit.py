"""Partial credit beside GenEval-shapes: each credit on hand-made detections, the chance level of shuffled prompts,
and the flat metric fields training logs."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import geneval
from pipelines.geneval.credit import PROMPTED, aggregate, credit_line, partial_credit, shuffled_partners
from pipelines.geneval.detect import Detection
from pipelines.synthetic.shapes import generate
from workloads.evaluate.inline import PromptSet, geneval_summary, metric_fields

RED_CIRCLE = Detection("circle", (0, 0, 10, 10), "red", 0.9)
BLUE_STAR = Detection("star", (30, 0, 40, 10), "blue", 0.8)
GREEN_SQUARE = Detection("square", (0, 30, 10, 40), "green", 0.7)


def test_count_is_the_layout_whatever_the_shapes():
    three = geneval.metadata("counting", ["cross"], count=3)
    assert partial_credit(three, [RED_CIRCLE, BLUE_STAR, GREEN_SQUARE])["count"] == 1.0  # three objects, no cross
    assert partial_credit(three, [RED_CIRCLE, BLUE_STAR])["count"] == 0.0
    one = geneval.metadata("single_object", ["star"])
    credit = partial_credit(one, [])
    assert credit["count"] == 0.0 and credit["empty"] == 1.0 and credit["objects"] == 0.0 and credit["asked"] == 1.0
    assert partial_credit(one, [BLUE_STAR])["count"] == 1.0


def test_colors_and_shapes_are_shares_of_what_the_prompt_names():
    attr = geneval.metadata("color_attr", ["circle", "star"], ["red", "green"])
    credit = partial_credit(attr, [RED_CIRCLE, BLUE_STAR])
    assert credit["colors"] == 0.5 and credit["shapes"] == 1.0  # red found, green not; both shapes
    assert credit["relation"] is None
    plain = geneval.metadata("two_object", ["circle", "cross"])
    credit = partial_credit(plain, [RED_CIRCLE, BLUE_STAR])
    assert credit["colors"] is None and credit["shapes"] == 0.5


def test_relation_counts_the_layout_when_one_shape_is_wrong():
    left = geneval.metadata("position", ["circle", "star"], relation="left of")  # circle left of star
    assert partial_credit(left, [RED_CIRCLE, BLUE_STAR])["relation"] == 1.0
    right = geneval.metadata("position", ["circle", "star"], relation="right of")
    assert partial_credit(right, [RED_CIRCLE, BLUE_STAR])["relation"] == 0.0
    # the subject drawn as a square: the reference star is found, the other object stands in for the subject
    square_left = [Detection("square", RED_CIRCLE.box, "red", 0.9), BLUE_STAR]
    assert partial_credit(left, square_left)["relation"] == 1.0
    # neither named shape: the layout cannot be read against the prompt
    assert partial_credit(left, [GREEN_SQUARE, Detection("cross", (30, 30, 40, 40), "red", 0.5)])["relation"] == 0.0
    assert partial_credit(left, [BLUE_STAR])["relation"] == 0.0  # one object, no pair


def test_aggregate_means_per_task_then_over_tasks():
    rows = [("single_object", {"count": 1.0, "colors": None}), ("single_object", {"count": 0.0, "colors": None}),
            ("colors", {"count": 1.0, "colors": 1.0})]
    summary = aggregate(rows)
    assert summary["tasks"] == {"single_object": {"count": 0.5}, "colors": {"count": 1.0, "colors": 1.0}}
    assert summary["overall"] == {"count": 0.75, "colors": 1.0}


def test_shuffled_partners_never_pair_an_image_with_its_own_prompt():
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    partners = shuffled_partners(prompts)
    assert all(prompts[p] != prompts[i] for i, p in enumerate(partners))
    assert sorted(partners.tolist()) == list(range(len(prompts)))  # a permutation: every prompt used once
    assert (shuffled_partners(prompts) == partners).all()


def test_ground_truth_scores_full_credit_far_above_its_shuffled_chance():
    samples = list(generate(120, seed=5, size=64))
    prompts = PromptSet([s.metadata for s in samples], {}, per_prompt=1)
    summary = geneval_summary(np.stack([np.asarray(s.image) for s in samples]), prompts)
    credit, chance = summary["credit"]["overall"], summary["chance"]["credit"]["overall"]
    assert credit["count"] == credit["shapes"] == credit["colors"] == credit["relation"] == 1.0
    assert credit["empty"] == 0.0 and credit["objects"] == pytest.approx(credit["asked"])
    assert summary["chance"]["geneval"] < 0.3  # images against other prompts mostly fail
    for field in PROMPTED:
        assert chance[field] < credit[field], field
    fields = metric_fields(summary)
    assert fields["credit_count"] == 1.0 and fields["credit_colors_colors"] == 1.0
    assert fields["chance_geneval"] == summary["chance"]["geneval"] and "chance_count" in fields
    assert "chance_empty" not in fields  # not read from the prompt: no chance level
    line = credit_line(summary)
    assert line.startswith("count 1.00 (chance ") and "empty 0.00" in line


def test_the_demo_report_sets_each_partial_credit_beside_its_chance_level():
    from workloads.demo.report import credit_lines

    main = {"credit": {"overall": {"count": 0.5, "colors": 0.25, "objects": 1.2, "asked": 1.8, "empty": 0.1}},
            "chance": {"credit": {"overall": {"count": 0.3, "colors": 0.125}}}}
    truth = {"credit": {"overall": {"count": 1.0, "objects": 1.8, "asked": 1.8}}, "chance": main["chance"]}
    lines = credit_lines({"main run": main, "ground truth": truth})
    assert "| main run | 0.500 | 0.250 |  |  | 0.100 | 1.20 of 1.80 |" in lines
    assert "| main run, shuffled prompts (chance) | 0.300 | 0.125 |  |  |  |  |" in lines
    assert not any(line.startswith("| ground truth, shuffled") for line in lines)  # its chance is no network's
    assert credit_lines({"main run": {"overall": 0.1, "tasks": {}}}) == []  # scored before partial credit
