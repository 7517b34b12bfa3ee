"""The sweep's scheduling and its per-run GenEval store: trials queue deepest first, and a score is found again only
under exactly the sampling setting that made it."""

from __future__ import annotations

import dataclasses

from conf.sweep import SweepConf
from pipelines.storage import Location
from workloads.sweep import driver, scores


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
                   {"images_per_prompt": 1}, {"seed": 1}):
        assert scores.read(run, dataclasses.replace(setting, **change)) is None, change
