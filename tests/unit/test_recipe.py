"""The recipe study without Ray: its trials (one knob at a time from the base), data variants, the training run a
trial gets at the FLOPs budget, the presets, and the analysis of made-up trial rows."""

from __future__ import annotations

import pandas as pd
import pytest

from conf.recipe import KNOBS, RecipeConf, default_base
from conf.sweep import SweepConf, register
from workloads.runtime import compose
from workloads.sweep import recipe
from workloads.sweep.studies import trial_params


def study(tmp_path, **recipe_fields) -> SweepConf:
    return SweepConf(study="recipe", storage=str(tmp_path), recipe=RecipeConf(**recipe_fields))


def test_trials_change_one_knob_at_a_time_and_skip_the_base_value(tmp_path):
    cfg = study(tmp_path, axes={"lr": [1e-3, 3e-3], "object_size": [[0.3, 0.45]], "patch_size": [4]})
    trials = recipe.trials(cfg.recipe)
    assert [t["trial"] for t in trials] == ["base", "lr=0.003", "object_size=0.3-0.45", "patch_size=4"]
    base = trials[0]["knobs"]
    for t in trials[1:]:
        changed = {k for k in KNOBS if t["knobs"][k] != base[k]}
        assert changed == {t["trial"].split("=")[0]}
    params = trial_params(cfg)
    assert [p["depth"] for p in params] == [2] * 4 and all("knobs" in p for p in params)


def test_data_knobs_make_variants_shared_by_the_trials_that_agree_on_them(tmp_path):
    cfg = study(tmp_path, axes={"lr": [3e-3], "resolution": [128], "max_objects": [3]})
    paths = {t["trial"]: recipe.variant_path(cfg, recipe.data_variant(t["knobs"])) for t in recipe.trials(cfg.recipe)}
    assert paths["lr=0.003"] == paths["base"]  # a train knob shares the base's data
    assert len({paths["base"], paths["resolution=128"], paths["max_objects=3"]}) == 3
    assert "/r128-c16-" in paths["resolution=128"]


def test_a_trials_run_spends_the_flops_budget_in_whole_reports(tmp_path):
    cfg = study(tmp_path, budget_flops=3e12, reports=3)
    knobs = recipe.trials(cfg.recipe)[0]["knobs"]
    c = recipe.trial_conf(cfg, knobs)
    per_sample = recipe.flops_per_sample(c, knobs)
    assert c.trainer.max_steps % 3 == 0 and c.validation.geneval_every == c.checkpoint.every == c.trainer.max_steps // 3
    assert 3e12 - 3 * per_sample * 32 <= c.trainer.max_steps * per_sample * 32 <= 3e12
    four = recipe.trial_conf(cfg, knobs | {"patch_size": 4, "resolution": 128, "latent_channels": 4, "depth": 3})
    model = four.model.build()
    assert (model.patch_size, model.in_channels, model.depth, model.hidden_size) == (4, 4, 3, 192)
    assert four.validation.guidance == knobs["guidance"] and four.data != c.data


def test_recipe_config_errors_name_the_knob():
    with pytest.raises(ValueError, match=r"unknown knob\(s\) \['learning_rate'\]"):
        RecipeConf(axes={"learning_rate": [1e-3]})
    with pytest.raises(ValueError, match="missing \\['lr'\\]"):
        RecipeConf(base={k: v for k, v in default_base().items() if k != "lr"})
    with pytest.raises(ValueError, match=r"recipe\.metric must be one of"):
        RecipeConf(metric="loss")
    with pytest.raises(ValueError, match=r"recipe.grace \(3\) must be < recipe.reports \(3\)"):
        RecipeConf(grace=3)
    with pytest.raises(ValueError, match=r"sweep\.data is required"):
        SweepConf(study="depth")


@pytest.mark.parametrize("preset", ["recipe", "recipe_quick"])
def test_the_presets_compose_into_a_recipe_study(preset, tmp_path):
    register()
    cfg = compose("sweep", [f"preset={preset}", f"storage={tmp_path}"])
    assert cfg.study == "recipe" and cfg.recipe.axes and cfg.train.trainer.num_workers == 1
    trials = recipe.trials(cfg.recipe)
    assert len(trials) == 1 + sum(len(v) for k, v in cfg.recipe.axes.items() if KNOBS[k][0] != "sampling")
    assert len(recipe.sampling_trials(cfg.recipe)) >= 2


def rows() -> pd.DataFrame:
    common = {"train_flops": 1e12, "cpus": 1.0, "val_loss": 0.5, "chance_count": 0.2}
    return pd.DataFrame([
        {"trial": "base", "reports": 3, "stopped_at": None, "curve": [0.05, 0.10, 0.20], "geneval": 0.20,
         "credit_count": 0.5, "train_seconds": 600.0, **common},
        {"trial": "lr=0.003", "reports": 3, "stopped_at": None, "curve": [0.10, 0.25, 0.40], "geneval": 0.40,
         "credit_count": 0.7, "train_seconds": 600.0, **common},
        {"trial": "depth=3", "reports": 1, "stopped_at": 1, "curve": [0.01], "geneval": 0.01, "credit_count": 0.3,
         "train_seconds": 300.0, **common},
    ])


def test_effects_compare_each_knob_with_the_base_where_both_got(tmp_path):
    table = recipe.effects(rows(), "geneval")
    assert table["knob"].tolist() == ["lr", "depth"]  # the larger effect first
    lr, depth = table.iloc[0], table.iloc[1]
    assert lr["difference"] == pytest.approx(0.20) and lr["at_report"] == 3
    assert depth["at_report"] == 1 and depth["base"] == 0.05 and depth["difference"] == pytest.approx(-0.04)


def test_the_report_ranks_trials_and_names_the_best_per_cpu_minute(tmp_path):
    cfg = study(tmp_path, axes={"lr": [3e-3], "depth": [3]})
    analysis = recipe.analyze(cfg, rows())
    assert analysis.table["trial"].tolist() == ["lr=0.003", "base", "depth=3"]
    assert analysis.table["cpu_minutes"].tolist() == [10.0, 10.0, 5.0]
    assert ("Highest GenEval-shapes per CPU-minute among the trials that trained their whole budget: `lr=0.003` "
            "(0.400 in 10.0 CPU-minutes" in analysis.markdown)
    assert set(analysis.plots) == {"recipe.png"}


def test_a_trials_row_is_the_one_that_got_furthest():
    rows = [{"trial": "base", "reports": 1, "run": "a"}, {"trial": "base", "reports": 3, "run": "b"},
            {"trial": "lr=0.003", "reports": 2, "run": "c"}]
    assert sorted((r["trial"], r["run"]) for r in recipe.latest_rows(rows)) == [("base", "b"), ("lr=0.003", "c")]
    assert recipe.trial_file("object_size=0.3-0.45") == "stopped-object_size=0.3-0.45.json"
