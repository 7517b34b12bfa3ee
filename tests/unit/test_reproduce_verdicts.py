"""`workloads.reproduce`'s statistics and verdicts on hand-made study results (no Ray): each claim's test says
reproduced, not reproduced or inconclusive for the reason it states."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from conf.reproduce import PRESETS, TABLE_1, Finding, ReproduceConf
from conf.sweep import Study, SweepConf
from model.formulations import paper_global_rank
from pipelines.geneval.stats import geneval_se
from workloads.reproduce import findings, paper
from workloads.reproduce.stats import differs, spearman_test


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


def depth_results(val_loss: list[float], geneval: list[float]) -> pd.DataFrame:
    """Depth trials 1-4 at doubling training compute."""
    n = len(val_loss)
    return pd.DataFrame({"depth": range(1, n + 1), "params": [1e5 * 2 ** i for i in range(n)],
                         "flops_per_sample": [1e8 * 2 ** i for i in range(n)],
                         "train_flops": [1e12 * 2 ** i for i in range(n)], "val_loss": val_loss, "geneval": geneval,
                         "samples_per_s": 10.0})


POWER_LAW = [2.0 * (1e12 * 2 ** i) ** -0.05 for i in range(4)]  # exactly L = 2 C^-0.05


@pytest.mark.parametrize(("val_loss", "geneval", "law", "predicts"), [
    (POWER_LAW, [0.1, 0.2, 0.3, 0.4], findings.REPRODUCED, findings.REPRODUCED),
    (POWER_LAW[::-1], [0.4, 0.3, 0.2, 0.1], findings.NOT_REPRODUCED, findings.REPRODUCED),  # the loss rises
    (POWER_LAW, [0.4, 0.3, 0.2, 0.1], findings.REPRODUCED, findings.NOT_REPRODUCED),  # lower loss, lower GenEval
    (POWER_LAW[:2], [0.1, 0.2], findings.INCONCLUSIVE, findings.INCONCLUSIVE),  # any 2 points fit; p 0.5
    ([0.50, 0.30, 0.45, 0.20], [0.1, 0.3, 0.2, 0.4], findings.INCONCLUSIVE, findings.REPRODUCED),  # a poor fit
])
def test_depth_verdicts_power_law_and_loss_predicting_geneval(val_loss, geneval, law, predicts):
    cfg = ReproduceConf()
    sweep = SweepConf(study=Study.depth, data="unused", depths=list(range(1, len(val_loss) + 1)))
    section = findings.depth(cfg, depth_results(val_loss, geneval), sweep)
    power_law, loss_geneval = section.verdicts
    assert "power law" in power_law.claim and power_law.status == law, power_law.reason
    assert "predicts GenEval" in loss_geneval.claim and loss_geneval.status == predicts, loss_geneval.reason


def steps_results(lfd_increase: list[float]) -> pd.DataFrame:
    """Depth trials whose latent Fréchet distance at 5 steps is `lfd_increase` % above the one at 50."""
    return pd.DataFrame([{"depth": d, "lfd@steps=50": 1.0, "lfd@steps=5": 1.0 + pct / 100, "change@steps=5": 0.1}
                         for d, pct in enumerate(lfd_increase, start=1)])


@pytest.mark.parametrize(("lfd_increase", "status"), [
    ([8.0, 6.0, 4.0, 2.0], findings.REPRODUCED),  # deeper: less lost at 5 steps (p 1/24)
    ([2.0, 4.0, 6.0, 8.0], findings.NOT_REPRODUCED),
    ([8.0, 6.0], findings.INCONCLUSIVE),  # the paper's sign, but two points are one of two orders
])
def test_steps_verdict_deeper_models_lose_less_at_few_steps(lfd_increase, status):
    cfg = ReproduceConf(sampling_steps=[5, 50])
    sweep = SweepConf(study=Study.steps, data="unused", depths=list(range(1, len(lfd_increase) + 1)),
                      sampling_steps=[5, 50])
    (verdict,) = findings.steps(cfg, steps_results(lfd_increase), sweep).verdicts
    assert verdict.status == status, verdict.reason
    assert verdict.ours.startswith(f"d1 {lfd_increase[0]:.1f}%")


def preference(before: float, after: float):
    """What `preference.preference_tune` hands back, as far as the analysis reads it."""
    from types import SimpleNamespace

    tasks = {"single_object": 0.5}
    return SimpleNamespace(summary={"geneval_before": before, "geneval_tasks_before": tasks, "geneval_after": after,
                                    "geneval_tasks_after": tasks}, pairs={"counts": {"written": 12}}, skipped=None)


@pytest.mark.parametrize(("before", "after", "status"), [
    (0.30, 0.50, findings.REPRODUCED),  # a gain above twice the sampling error
    (0.30, 0.31, findings.INCONCLUSIVE),  # within it
    (0.50, 0.30, findings.NOT_REPRODUCED),
])
def test_dpo_verdict_when_it_ran(before, after, status):
    cfg = ReproduceConf(geneval_prompts_per_task=20, dpo_geneval_images_per_prompt=4)
    section = findings.dpo(cfg, preference(before, after))
    (verdict,) = section.verdicts
    assert verdict.status == status, verdict.reason
    assert verdict.ours == f"{before:.3f} -> {after:.3f}" and "12 pairs" in section.body


def test_a_paired_dpo_change_is_decided_by_its_own_error():
    """A summary with the per-image paired change: a gain the unpaired errors call noise is beyond the paired one."""
    cfg = ReproduceConf(geneval_prompts_per_task=20, dpo_geneval_images_per_prompt=4)
    p = preference(0.30, 0.33)
    assert findings.dpo(cfg, p).verdicts[0].status == findings.INCONCLUSIVE
    p.summary |= {"geneval_change_se": 0.01, "geneval_gained": 30, "geneval_lost": 6}
    section = findings.dpo(cfg, p)
    assert section.verdicts[0].status == findings.REPRODUCED and "30 gained, 6 lost" in section.verdicts[0].reason
    assert "paired standard error 0.010" in section.body
    p.summary |= {"geneval_change_se": 0.02}
    assert findings.dpo(cfg, p).verdicts[0].status == findings.INCONCLUSIVE


def test_a_skipped_dpo_says_why():
    from types import SimpleNamespace

    cfg = ReproduceConf()
    (verdict,) = findings.dpo(cfg, SimpleNamespace(summary=None, pairs=None, skipped="no correct samples")).verdicts
    assert verdict.status == findings.INCONCLUSIVE and verdict.reason == "no correct samples"


def all_findings_inputs(cfg: ReproduceConf) -> tuple[dict[str, pd.DataFrame], object, dict[str, SweepConf]]:
    """Hand-made results of every study, each chosen to give its finding a known first verdict."""
    paper_order = sorted(TABLE_1, key=paper_global_rank)
    tasks = {f"geneval_{t}": 0.5 for t in ("single_object", "counting")}
    results = {
        "formulation": formulation_results(paper_order, [0.8 - 0.1 * i for i in range(8)]),  # reproduced
        "depth": depth_results(POWER_LAW[::-1], [0.4, 0.3, 0.2, 0.1]),  # the loss rises: not reproduced
        f"shift-{cfg.resolution}": shift_row({1.0: 0.30, 2.0: 0.31, 4.0: 0.30}),  # noise: inconclusive
        f"shift-{cfg.high_resolution}": shift_row({1.0: 0.30, 2.0: 0.30, 4.0: 0.31}),
        "steps": steps_results([8.0, 6.0, 4.0, 2.0]),  # reproduced
        "captions-original": pd.DataFrame([{"geneval": 0.45, "val_loss": 0.6, **tasks}]),  # lower with the mix
        "captions-mix": pd.DataFrame([{"geneval": 0.30, "val_loss": 0.6, **tasks}]),
    }
    sweeps = {"formulation": SweepConf(study=Study.formulation, data="unused", formulations=list(TABLE_1)),
              "depth": SweepConf(study=Study.depth, data="unused", depths=[1, 2, 3, 4]),
              "steps": SweepConf(study=Study.steps, data="unused", depths=[1, 2, 3, 4], sampling_steps=[5, 50]),
              **{f"shift-{r}": SweepConf(study=Study.shift, data="unused", sampling_shifts=[1.0, 2.0, 4.0])
                 for r in (cfg.resolution, cfg.high_resolution)}}
    for channels, geneval in ((4, [0.40, 0.40]), (8, [0.30, 0.35]), (16, [0.10, 0.40])):  # 16 catches up
        results[f"channels-c{channels}"] = pd.DataFrame({"depth": [1, 3], "val_loss": [0.6, 0.5], "geneval": geneval})
    return results, preference(0.30, 0.31), sweeps  # DPO: within the error, inconclusive


# the shipped shapes autoencoders' reconstruction as first measured: PSNR c4 > c16 > c8 at 64 px
RECONSTRUCTED = pd.DataFrame({"channels": [4, 8, 16], "size": 64, "psnr": [31.4, 27.5, 30.6],
                              "ssim": [0.95, 0.93, 0.96], "round_trip_geneval": [0.72, 0.61, 0.47]})


def test_every_finding_has_an_analysis():
    """`analyze` gives each chosen finding its own section, in the issue's order, decided on that finding's own
    results: each first verdict below follows from the inputs made for it, and no two findings share inputs."""
    assert {s.value for s in Finding} == {"formulation", "depth", "shift", "steps", "captions", "dpo", "autoencoder"}
    cfg = ReproduceConf(sampling_shifts=[1.0, 2.0, 4.0], sampling_steps=[5, 50], depths=[1, 2, 3, 4],
                        geneval_prompts_per_task=20, geneval_images_per_prompt=4, dpo_geneval_images_per_prompt=4)
    results, preference_result, sweeps = all_findings_inputs(cfg)
    sections = findings.analyze(cfg, results, preference_result, sweeps, RECONSTRUCTED)
    assert [s.finding for s in sections] == list(Finding)
    expected = {Finding.formulation: (findings.REPRODUCED, "Spearman 1.000"),
                Finding.depth: (findings.NOT_REPRODUCED, "C^(-"),
                Finding.shift: (findings.INCONCLUSIVE, "best 2 at 64 px"),
                Finding.steps: (findings.REPRODUCED, "d1 8.0%, d2 6.0%, d3 4.0%, d4 2.0%"),
                Finding.captions: (findings.NOT_REPRODUCED, "0.450 -> 0.300"),
                Finding.dpo: (findings.INCONCLUSIVE, "0.300 -> 0.310"),
                Finding.autoencoder: (findings.NOT_REPRODUCED, "PSNR 31.4 / 27.5 / 30.6 dB")}
    for section in sections:
        status, ours = expected[section.finding]
        first = section.verdicts[0]
        assert (first.status, ours in first.ours) == (status, True), (section.finding, first)
    fig_10 = sections[-1].verdicts[1:]  # from the channel series: 4 ahead at depth 1 by 0.30, even at depth 3
    assert [v.status for v in fig_10] == [findings.REPRODUCED, findings.REPRODUCED], fig_10
    # one finding chosen: only its section, from its own results
    only = findings.analyze(ReproduceConf(findings=[Finding.steps], sampling_steps=[5, 50], depths=[1, 2, 3, 4]),
                            {"steps": results["steps"]}, None, {"steps": sweeps["steps"]})
    assert [s.finding for s in only] == [Finding.steps]

