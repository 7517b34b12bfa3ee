"""The sweep's scheduling and its per-run GenEval store: trials queue deepest first, and a score is found again only
under exactly the sampling setting that made it, sampler and skip-layer guidance included."""

from __future__ import annotations

import dataclasses

from conf.sweep import SweepConf
from model.sampling import SD35_MEDIUM_SLG
from pipelines.storage import Location
from workloads.sweep import driver, scores, studies


def test_trials_queue_deepest_first():
    cfg = SweepConf(study="depth", data="unused", depths=[1, 3, 2, 5])
    assert [p["depth"] for p in driver.param_space(cfg)["params"]["grid_search"]] == [5, 3, 2, 1]


def test_a_score_is_read_back_only_at_its_own_setting(tmp_path):
    run = Location.of(str(tmp_path / "run"))
    setting = scores.GenEvalSetting(steps=20, shift=3.0, guidance=4.0, prompts_per_task=8, images_per_prompt=2, seed=0)
    assert scores.read(run, setting) is None
    summary = {"overall": 0.25, "tasks": {"counting": 0.5, "colors": 0.0}, "images": 96}
    scores.write(run, setting, summary)
    assert scores.read(run, setting) == {"overall": 0.25, "tasks": {"counting": 0.5, "colors": 0.0}}
    for change in ({"steps": 50}, {"shift": 1.0}, {"guidance": 1.0}, {"prompts_per_task": 4},
                   {"images_per_prompt": 1}, {"seed": 1}, {"sampler": "dpmpp_2m"}, {"slg": SD35_MEDIUM_SLG}):
        assert scores.read(run, dataclasses.replace(setting, **change)) is None, change


def test_scores_kept_before_the_sampler_joined_the_key_are_found_as_eulers():
    """This setting's file name from before the key had a sampler (all Euler, no skip-layer guidance)."""
    setting = scores.GenEvalSetting(steps=20, shift=3.0, guidance=4.0, prompts_per_task=8, images_per_prompt=2, seed=0)
    assert setting.path() == "scores/geneval-623b227f5938.json"
    assert dataclasses.replace(setting, sampler="heun").path() != setting.path()


def test_the_sweeps_geneval_samples_with_its_sampler_and_keys_its_scores_by_it():
    euler = SweepConf(study="depth", data="unused", depths=[2])
    dpm = dataclasses.replace(euler, sampler="dpmpp_2m")
    dpm_slg = dataclasses.replace(dpm, skip_layers=[1])
    c = driver.trial_train_conf(euler, studies.trial_params(euler)[0])
    assert driver.geneval_sampling(euler, c, 10, 3.0).method == "euler"
    how = driver.geneval_sampling(dpm_slg, c, 10, 3.0)
    assert (how.method, how.slg) == ("dpmpp_2m", dataclasses.replace(SD35_MEDIUM_SLG, layers=(1,)))
    keys = [driver.geneval_setting(cfg, c, 10, 3.0) for cfg in (euler, dpm, dpm_slg)]
    assert [(k.sampler, k.slg) for k in keys] == [("euler", None), ("dpmpp_2m", None), (how.method, how.slg)]
    assert len({k.path() for k in keys}) == 3
    # a sweep sampling otherwise does not resume another's finished trials
    assert [driver.sweep_name(cfg) for cfg in (euler, dpm, dpm_slg)] == ["depth-toy", "depth-toy-dpmpp_2m",
                                                                         "depth-toy-dpmpp_2m-slg"]
