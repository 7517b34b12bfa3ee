"""The jobs' configs: one training schema carried by the sweep and the demo, self-validating sections, and the
command line's one-line errors with exit status 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from conf.demo import DemoConf
from conf.sweep import SweepConf
from conf.train import TrainConf
from workloads import runtime
from workloads.demo import driver as demo
from workloads.demo import preference
from workloads.sweep import driver as sweep
from workloads.sweep import studies
from workloads.train import driver as train

ROOT = Path(__file__).resolve().parents[2]


def trials(cfg: SweepConf) -> list[TrainConf]:
    return [sweep.trial_train_conf(cfg, p) for p in studies.trial_params(cfg)]


def test_a_field_of_the_sweeps_train_section_reaches_every_trial_and_its_run_key():
    plain = runtime.compose("sweep", ["data=/data", "depths=[1,2]"])
    tuned = runtime.compose("sweep", ["data=/data", "depths=[1,2]", "train.optim.weight_decay=0.05",
                                      "train.loader.shuffle_buffer=7"])
    tuned_trials = trials(tuned)
    assert [c.model.depth for c in tuned_trials] == [1, 2]
    for before, after in zip(trials(plain), tuned_trials, strict=True):
        assert (after.optim.weight_decay, after.loader.shuffle_buffer) == (0.05, 7)
        assert (before.optim.weight_decay, before.loader.shuffle_buffer) != (0.05, 7)
        assert after.run.name == sweep.run_key(after) != before.run.name  # the key hashes the resolved config
        # the trial set only its axis: depth with the width rule, data from the sweep, its own run folder
        depth = after.model.depth
        assert (before.model.depth, after.model.hidden_size, after.model.num_heads) == (depth, 64 * depth, depth)
        assert after.data == "/data" and after.run.storage == "sweeps/runs"
    other_data = dataclasses.replace(plain, data="/other")
    assert {c.run.name for c in trials(other_data)}.isdisjoint(c.run.name for c in trials(plain))


def test_the_run_key_ignores_where_the_run_is_stored_and_only_that():
    c = trials(runtime.compose("sweep", ["data=/data"]))[0]
    moved = dataclasses.replace(c, run=dataclasses.replace(c.run, storage="s3://elsewhere", name="x"))
    assert sweep.run_key(moved) == sweep.run_key(c)
    assert sweep.run_key(dataclasses.replace(c, export=False)) != sweep.run_key(c)


def test_the_demos_main_run_is_its_sweeps_trial_with_the_demos_train_section(tmp_path):
    cfg = runtime.compose("demo", [f"out_dir={tmp_path}", "train.trainer.max_steps=7", "train.ema.decay=0.5"])
    layout = demo.Layout.under(demo.storage_of(cfg))
    main = demo.main_run_conf(cfg, layout)
    assert (main.trainer.max_steps, main.ema.decay, main.model.depth) == (7, 0.5, cfg.main_depth)
    assert main.run.name in {c.run.name for c in trials(demo.sweep_conf(cfg, layout))}


def test_the_demos_dpo_run_is_its_main_run_turned_to_dpo_on_the_pairs(tmp_path):
    """The demo's last stage: LoRA adapters on the main run's weights, `objective=dpo` on the pairs, GenEval-shapes of
    the held-out prompts (the ones make_pairs leaves out) before and after, the main run's other settings kept."""
    from conf.checks import Objective

    cfg = runtime.compose("demo", [f"out_dir={tmp_path}", "dpo_steps=30", "dpo_rank=8"])
    at = demo.Layout.under(demo.storage_of(cfg))
    main = demo.main_run_conf(cfg, at)
    base = demo.bases(cfg, at)["main run"]
    dpo, pairs = preference.dpo_conf(cfg, at.storage, base), preference.pairs_conf(cfg, at.storage, base)
    assert dpo.objective.kind == Objective.dpo and dpo.lora.rank == 8 and dpo.trainer.max_steps == 30
    assert dpo.data == pairs.out and pairs.run == dpo.init_from == f"{main.run.storage}/{main.run.name}"
    assert pairs.data == at.data and pairs.guidance == dpo.validation.guidance == cfg.geneval_guidance
    assert dpo.validation.geneval_before and dpo.validation.geneval_every == 30
    assert pairs.held_out_prompts_per_task == dpo.validation.geneval_prompts_per_task
    assert (dpo.optim, dpo.model, dpo.trainer.batch_size) == (main.optim, main.model, main.trainer.batch_size)
    assert dpo.run.name != main.run.name and dpo.objective.text_drop_prob == 0.0


def test_the_demo_also_tunes_the_shipped_reference_model_at_its_own_resolution_and_guidance(tmp_path):
    """The second base: the shipped weights as the DPO run's init_from, its network (not the main run's), a dataset
    of its kind (its resolution and autoencoder) under the demo's storage, its own sampling guidance, its own pairs
    folder and run name; `reference=false` leaves only the main run."""
    from workloads.reference import shipped

    cfg = runtime.compose("demo", [f"out_dir={tmp_path}"])
    at = demo.Layout.under(demo.storage_of(cfg))
    made = shipped.recipe()
    bases = demo.bases(cfg, at)
    main, ref = bases["main run"], bases["reference model"]
    dpo, pairs = preference.dpo_conf(cfg, at.storage, ref), preference.pairs_conf(cfg, at.storage, ref)
    assert dpo.init_from == pairs.run == str(shipped.folder())
    assert dpo.model == made.train.model != main.train.model
    assert pairs.guidance == dpo.validation.guidance == made.train.validation.guidance
    assert pairs.out != preference.pairs_conf(cfg, at.storage, main).out
    assert dpo.run.name != preference.dpo_conf(cfg, at.storage, main).run.name
    data = demo.reference_conf(cfg, at)
    assert (data.resolution, data.latent_channels, data.images) == (made.resolution, made.latent_channels,
                                                                     cfg.reference_images)
    assert pairs.data == f"{data.storage}/data"
    assert set(demo.geneval_confs(cfg, at, main.train, "/untrained")) == {"main run", "ground truth", "untrained",
                                                                         "reference model"}
    off = runtime.compose("demo", [f"out_dir={tmp_path}", "reference=false"])
    assert list(demo.bases(off, at)) == ["main run"]
    assert "reference model" not in demo.geneval_confs(off, at, main.train, "/untrained")


def test_make_reproduce_preference_tunes_the_shipped_reference_model_by_default(tmp_path):
    """`dpo_base=reference` (the default): DPO adapts the shipped weights on images of their kind, with the studies'
    training settings, its run beside the studies' runs; `dpo_base=study` tunes a study run on the study data."""
    from workloads.reference import shipped
    from workloads.reproduce import driver as reproduce

    cfg = runtime.compose("reproduce", ["preset=quick", f"out_dir={tmp_path}"])
    at = reproduce.Layout.of(cfg)
    reproduce.check(cfg)
    dpo = preference.dpo_conf(cfg, at.storage, reproduce.reference_tuned(cfg, at))
    assert dpo.init_from == str(shipped.folder()) and dpo.model == shipped.recipe().train.model
    assert dpo.data == f"{at.storage}/pairs-reference" and dpo.run.storage == f"{at.storage}/runs"
    assert dpo.trainer.num_workers == cfg.train.trainer.num_workers and dpo.trainer.max_steps == cfg.dpo_steps
    assert reproduce.reference_data(cfg, at).images == cfg.reference_images
    study = runtime.compose("reproduce", ["preset=quick", f"out_dir={tmp_path}", "dpo_base=study"])
    reproduce.check(study)


def test_the_workers_get_init_from_as_an_absolute_path_they_can_open_from_their_own_folder(tmp_path, monkeypatch):
    """Ray's workers start in folders of their own: a relative `init_from=` the driver could read (its checks passed)
    would name nothing there. URIs and absolute paths pass as they are."""
    monkeypatch.chdir(tmp_path)
    c = runtime.compose("train", ["data=/data", "init_from=runs/base", "lora.rank=4"])
    assert train.worker_conf(c).init_from == str(tmp_path / "runs" / "base")
    for kept in ("s3://bucket/base", "/abs/base", None):
        assert train.worker_conf(dataclasses.replace(c, init_from=kept, lora=TrainConf().lora)).init_from == kept
    assert train.worker_conf(c).data == c.data


def test_a_sweep_rejects_data_set_inside_its_train_section():
    with pytest.raises(ValueError, match="sweep level"):
        runtime.compose("sweep", ["data=/data", "train.data=/other"])


@pytest.mark.parametrize(("override", "named"), [
    ("deepspeed.stage=4", "[0, 1, 2, 3]"), ("validation.sampler=ddim", "[euler, heun, dpmpp_2m]"),
    ("trainer.dtype=int8", "bfloat16"), ("trainer.max_steps=0", "trainer.max_steps"),
    ("objective.formulation=nope", "nope"), ("ema.decay=1.5", "ema.decay"), ("loader.val_fraction=1", "val_fraction"),
    ("model=d99", "d99"), ("trainer.batch_size=3", "divisible"),
    ("lora.rank=8", "set init_from="), ("lora.dropout=1", "lora.dropout"), ("lora.targets=blocks.(", "lora.targets"),
])
def test_a_bad_value_fails_when_the_config_is_composed_naming_it(override, named):
    with pytest.raises(Exception) as error:
        runtime.compose("train", ["data=/data", override])
    assert runtime.is_user_error(error.value)
    assert named in runtime.one_line(error.value)


def test_lora_fine_tuning_composes_from_the_command_line():
    cfg = runtime.compose("train", ["data=/data", "init_from=runs/base", "lora.rank=16", "lora.alpha=32"])
    assert (cfg.lora.rank, cfg.lora.scaling, cfg.lora.enabled) == (16, 2.0, True)


def test_configs_changed_in_code_are_checked_again():
    cfg = TrainConf(data="/data")
    cfg.deepspeed.stage = 5
    with pytest.raises(ValueError, match=r"deepspeed\.stage must be one of \[0, 1, 2, 3\]"):
        train.check(cfg)
    with pytest.raises(ValueError, match="main_depth"):
        demo.check(DemoConf(main_depth=9))


def run_cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_user_error_is_one_line_and_exit_status_2_without_a_traceback(tmp_path):
    done = run_cli("workloads.train", f"data={tmp_path / 'nothing'}", "deepspeed.stage=4")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith("error: ") and "[0, 1, 2, 3]" in done.stderr and "Traceback" not in done.stderr
    missing = run_cli("workloads.train", f"data={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "run pipelines.preprocess on it first" in missing.stderr
    assert "Traceback" not in missing.stderr and "Started a local Ray instance" not in missing.stdout + missing.stderr


def test_the_traceback_flag_shows_the_traceback(tmp_path):
    done = run_cli("workloads.train", f"data={tmp_path / 'nothing'}", "--traceback")
    assert done.returncode == 1 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_submit_checks_a_schemas_own_rules_before_submitting():
    from cluster.submit import SubmitError, check_overrides
    from conf.jobs import JOBS

    with pytest.raises(SubmitError, match=r"divisible by trainer\.num_workers"):
        check_overrides(JOBS["train"], ["data=/data", "trainer.batch_size=3"])
    with pytest.raises(SubmitError, match="sweep level"):
        check_overrides(JOBS["sweep"], ["data=/data", "train.data=/other"])
