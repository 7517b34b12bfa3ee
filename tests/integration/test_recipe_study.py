"""The recipe study's quick preset end to end on the session's local Ray: data variants made by the real shapes and
preprocessing jobs, trials trained by Ray Train + DeepSpeed under Ray Tune with ASHA, the sampling knobs tried on
the best network, and the report; run again, it resumes and trains nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conf.sweep import register
from workloads.runtime import compose
from workloads.sweep import driver as sweep
from workloads.sweep import recipe


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    register()
    storage = tmp_path_factory.mktemp("recipe")
    # the quick preset at two images a prompt, so the base and a changed knob differ in more than one image
    cfg = compose("sweep", ["preset=recipe_quick", f"storage={storage}", "recipe.images=64",
                            "geneval_images_per_prompt=2"])
    return cfg, sweep.run(cfg)


def test_every_trial_is_scored_at_equal_compute_and_asha_stops_only_after_its_grace(study):
    cfg, results = study
    trials = {t["trial"] for t in recipe.trials(cfg.recipe)}
    assert set(results["trial"]) == trials == {"base", "object_size=0.3-0.45", "lr=0.003"}
    for _, row in results.iterrows():
        assert 1 <= row["reports"] <= cfg.recipe.reports and len(row["curve"]) == row["reports"]
        assert 0 <= row["geneval"] <= 1 and 0 <= row["credit_count"] <= 1 and "chance_count" in row
        stopped = not pd.isna(row["stopped_at"])  # ASHA stopped it
        assert row["reports"] == (row["stopped_at"] if stopped else cfg.recipe.reports)
        assert row["stopped_at"] >= cfg.recipe.grace if stopped else True
    budget = results.loc[results["stopped_at"].isna(), "train_flops"]
    assert len(budget) > 0  # some trial ran its whole budget
    assert (budget <= cfg.recipe.budget_flops).all() and (budget > cfg.recipe.budget_flops / 2).all()


def test_the_report_ranks_knobs_and_tries_sampling_on_the_best_network(study):
    cfg, results = study
    out = Path(cfg.storage) / sweep.sweep_name(cfg)
    report = (out / "report.md").read_text()
    assert "Knobs ranked by their effect" in report and "Highest GenEval-shapes per CPU-minute" in report
    assert (out / "recipe.png").stat().st_size > 0
    sampling = json.loads((out / "sampling.json").read_text())
    (trial, scores), = sampling.items()
    finished = results[results["stopped_at"].isna()]  # the best by the study's metric of the trials ASHA let finish
    assert finished.loc[finished["trial"] == trial, cfg.recipe.metric].iloc[0] == finished[cfg.recipe.metric].max()
    assert set(scores) == {"base", "guidance=2", "guidance_below=0.6"}
    assert all(0 <= s["overall"] <= 1 and "credit" in s for s in scores.values())
    assert "Sampling knobs on the trained network of" in report


def test_a_second_run_resumes_and_trains_nothing_again(study):
    """Every trial's run records the same events after the second run as before it: none started, resumed or
    restarted from a checkpoint."""
    cfg, results = study

    def events(run: str) -> list[str]:
        return [json.loads(line)["event"] for line in
                (Path(cfg.storage) / "runs" / run / "events.jsonl").read_text().splitlines()]

    before = {run: events(run) for run in results["run"]}
    assert all(e.count("started") == 1 for e in before.values()), before
    again = sweep.run(cfg)
    assert sorted(again["run"]) == sorted(results["run"])
    assert {run: events(run) for run in results["run"]} == before
