"""The sampling errors of GenEval-shapes scores: one score's, and the paired change between two scorings."""

from __future__ import annotations

import math

import pytest

from pipelines.geneval.scoring import summarize
from pipelines.geneval.stats import PAIRED, PairedChange, geneval_se, paired_change


def rows(correct: dict[str, list[bool]]) -> list[dict]:
    return [{"tag": tag, "prompt_index": i // 2, "k": i % 2, "correct": c}
            for tag, flags in correct.items() for i, c in enumerate(flags)]


BEFORE = {"single_object": [True, False, False, True, False, False, True, False],
          "counting": [False, False, True, False, False, False, False, False]}
AFTER = {"single_object": [True, True, False, True, True, False, True, False],
         "counting": [False, False, True, True, False, False, False, True]}


def test_the_paired_change_is_the_change_of_the_overall_scores():
    change = paired_change(rows(BEFORE), rows(AFTER))
    assert change.before == pytest.approx(summarize(rows(BEFORE))["overall"])
    assert change.after == pytest.approx(summarize(rows(AFTER))["overall"])
    assert (change.gained, change.lost, change.images) == (4, 0, 16)


def test_the_paired_error_combines_each_tasks_per_image_differences():
    """Per task: the sample variance of the differences over n, the tasks averaged as the overall score is."""
    change = paired_change(rows(BEFORE), rows(AFTER))
    var = lambda d: sum((x - sum(d) / len(d)) ** 2 for x in d) / (len(d) - 1) / len(d)  # noqa: E731
    single, counting = [0, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 1]
    assert change.se == pytest.approx(math.sqrt(var(single) + var(counting)) / 2)
    # pairing removes the images that did not change: below the unpaired error of two independent scores
    assert change.se < 0.75 * math.hypot(geneval_se(change.before, 16), geneval_se(change.after, 16))


def test_no_change_is_within_its_error_and_a_clear_one_beyond():
    same = paired_change(rows(BEFORE), rows(BEFORE))
    assert (same.change, same.se, same.beyond()) == (0.0, 0.0, False)
    many = {"single_object": [False] * 100}
    better = {"single_object": [i % 2 == 0 for i in range(100)]}
    assert paired_change(rows(many), rows(better)).beyond()
    assert "beyond twice" in paired_change(rows(many), rows(better)).line()


def test_results_of_other_images_have_no_paired_change():
    with pytest.raises(ValueError, match="do not score the same images"):
        paired_change(rows(BEFORE), rows({"single_object": BEFORE["single_object"]}))
    shifted = [dict(r, k=r["k"] + 2) for r in rows(BEFORE)]
    with pytest.raises(ValueError, match="do not score the same images"):
        paired_change(rows(BEFORE), shifted)


def test_a_run_summary_keeps_the_change_and_gives_it_back():
    change = paired_change(rows(BEFORE), rows(AFTER))
    summary = {"geneval_before": change.before, "geneval_after": change.after, **change.summary_fields()}
    assert set(change.summary_fields()) == set(PAIRED)
    assert PairedChange.of_summary(summary, 16) == change
    assert PairedChange.of_summary({"geneval_before": 0.1, "geneval_after": 0.2}, 16) is None
