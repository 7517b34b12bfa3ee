"""`workloads.reproduce`'s statistics and verdicts on hand-made study results (no Ray): each claim's test says
reproduced, not reproduced or inconclusive for the reason it states."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from conf.reproduce import PRESETS, TABLE_1, Finding, ReproduceConf
from conf.sweep import Study, SweepConf
from model.formulations import paper_global_rank
from workloads.reproduce import findings, paper
from workloads.reproduce.stats import differs, geneval_se, spearman_test


def test_spearman_permutation_p_value_is_exact_for_few_points():
    rho, p = spearman_test([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 120)  # only the identity ranks as high
    rho, p = spearman_test([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1.0)
    assert spearman_test([1, 2], [1, 2]) == pytest.approx((1.0, 0.5))  # two points: one of two orders
    assert math.isnan(spearman_test([1], [1])[0]) and math.isnan(spearman_test([1, 2, 3], [4, 4, 4])[0])
    rho, p = spearman_test(range(12), range(12))  # sampled permutations above 8 points
    assert rho == pytest.approx(1.0) and p < 0.001


def test_geneval_error_and_difference():
    assert geneval_se(0.0, 100) > 0 and geneval_se(0.5, 400) == pytest.approx(0.025, rel=0.01)
    se = geneval_se(0.5, 400)
    assert differs(0.5, 0.6, se, se) == 1 and differs(0.6, 0.5, se, se) == -1 and differs(0.5, 0.52, se, se) == 0


def test_shift_rule_is_the_square_root_of_the_pixel_ratio():
    assert paper.shift_rule(128 ** 2, 64 ** 2) == pytest.approx(2.0)
    assert paper.shift_rule(1024 ** 2, 256 ** 2) == pytest.approx(4.0)


def test_every_table_1_formulation_has_its_paper_rank():
    assert all(paper_global_rank(f) is not None for f in TABLE_1)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"findings": []}, "findings is empty"),
    ({"depths": [2]}, "at least 2 distinct"),
    ({"study_depth": 7}, "study_depth=7 must be one of depths"),
    ({"high_resolution": 64}, "high_resolution"),
    ({"formulations": ["rf/lognorm(0.00,1.00)"]}, "at least 2 to rank"),
    ({"caption_mix": 0.0}, "caption_mix"),
])
def test_bad_settings_fail_on_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        ReproduceConf(**overrides)


def test_presets_name_only_fields_of_the_schema():
    fields = set(ReproduceConf.__dataclass_fields__)
    for preset in PRESETS.values():
        assert set(preset) <= fields


def formulation_results(order: list[str], geneval: list[float]) -> pd.DataFrame:
    """Trials whose validation losses rank the formulations in `order`."""
    return pd.DataFrame({"formulation": order, "depth": 2, "val_loss": [0.5 + 0.01 * i for i in range(len(order))],
                         "geneval": geneval})


def test_formulations_in_the_papers_order_are_reproduced_and_reversed_are_not():
    cfg = ReproduceConf()
    sweep = SweepConf(study=Study.formulation, data="unused", formulations=list(TABLE_1))
    paper_order = sorted(TABLE_1, key=paper_global_rank)
    section = findings.formulation(cfg, formulation_results(paper_order, [0.8 - 0.1 * i for i in range(8)]), sweep)
    (verdict,) = section.verdicts
    assert verdict.status == findings.REPRODUCED and verdict.ours == "Spearman 1.000"
    assert "formulations.png" in "".join(section.plots)
    reversed_order = paper_order[::-1]
    section = findings.formulation(cfg, formulation_results(reversed_order, [0.8 - 0.1 * i for i in range(8)]), sweep)
    assert section.verdicts[0].status == findings.NOT_REPRODUCED
    rows = [line for line in section.body.splitlines() if line.startswith("| edm")]
    assert rows and rows[0].split(" | ")[2] == "1"  # first by loss: the table carries each formulation's ranks


def shift_row(values: dict[float, float], metric: str = "geneval") -> pd.DataFrame:
    row = {f"{metric}@shift={s:g}": v for s, v in values.items()}
    row |= {f"lfd@shift={s:g}": 1.0 + abs(s - 2) for s in values} if metric == "geneval" else {}
    return pd.DataFrame([{"depth": 2, "train_shift": 1.0, "formulation": "rf/lognorm(0.00,1.00)", **row}])


@pytest.mark.parametrize(("low", "high", "status"), [
    ({1.0: 0.6, 2.0: 0.3, 4.0: 0.1}, {1.0: 0.1, 2.0: 0.6, 4.0: 0.3}, findings.REPRODUCED),  # 1 -> 2: the rule's 2x
    ({1.0: 0.1, 2.0: 0.6, 4.0: 0.3}, {1.0: 0.6, 2.0: 0.3, 4.0: 0.1}, findings.NOT_REPRODUCED),
    ({1.0: 0.30, 2.0: 0.31, 4.0: 0.30}, {1.0: 0.30, 2.0: 0.30, 4.0: 0.31}, findings.INCONCLUSIVE),  # noise
])
def test_shift_verdict_by_geneval(low, high, status):
    cfg = ReproduceConf(sampling_shifts=[1.0, 2.0, 4.0], geneval_prompts_per_task=20, geneval_images_per_prompt=4)
    sweeps = {f"shift-{r}": SweepConf(study=Study.shift, data="unused", sampling_shifts=[1.0, 2.0, 4.0])
              for r in (cfg.resolution, cfg.high_resolution)}
    section = findings.shift(cfg, shift_row(low), shift_row(high), sweeps)
    by_geneval = section.verdicts[0]
    assert by_geneval.status == status, by_geneval.reason
    assert section.verdicts[1].status == findings.NOT_REPRODUCED  # LFD is best at shift 2 at both resolutions
    assert {"shift-64-shift.png", "shift-128-shift.png"} <= set(section.plots)


def test_captions_and_dpo_verdicts_compare_against_the_sampling_error():
    cfg = ReproduceConf(geneval_prompts_per_task=20, geneval_images_per_prompt=4)
    tasks = {f"geneval_{t}": 0.5 for t in ("single_object", "counting")}
    original = pd.DataFrame([{"geneval": 0.30, "val_loss": 0.6, **tasks}])
    better = pd.DataFrame([{"geneval": 0.45, "val_loss": 0.6, **tasks}])
    assert findings.captions(cfg, original, better).verdicts[0].status == findings.REPRODUCED
    assert findings.captions(cfg, original, original).verdicts[0].status == findings.INCONCLUSIVE
    assert findings.captions(cfg, better, original).verdicts[0].status == findings.NOT_REPRODUCED
    skipped = findings.dpo(cfg, None)
    assert skipped.verdicts[0].status == findings.INCONCLUSIVE and "did not run" in skipped.body


def test_every_finding_has_an_analysis():
    assert {s.value for s in Finding} == {"formulation", "depth", "shift", "steps", "captions", "dpo"}

