"""The reference model's command runs its first steps on the real jobs (shapes, Ray Data preprocessing, Ray Train +
DeepSpeed on the recipe's network) and ships what it trained: float16 weights that load as the recipe's MM-DiT, and
a card that says how it was made; run again, it resumes and trains nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conf.reference import register
from model.interop import load_diffusers
from workloads.reference import driver as reference
from workloads.runtime import compose
from workloads.train.runlog import EVENTS, read_records

STEPS = 2


@pytest.fixture(scope="module")
def made(ray_local, tmp_path_factory):
    register()
    storage, ship = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("shipped")
    overrides = [f"storage={storage}", f"ship_to={ship}", "images=48", "shard_size=16",
                 f"train.trainer.max_steps={STEPS}", "train.optim.decay_steps=0", "train.trainer.batch_size=8",
                 "train.validation.samples=8",
                 f"train.validation.every={STEPS}", "train.validation.geneval_every=0",
                 "train.validation.grid_prompts=1", "train.validation.grid_per_prompt=1",
                 "train.validation.sample_steps=2", f"train.checkpoint.every={STEPS}"]
    cfg = compose("reference", overrides)
    return cfg, reference.run(cfg), ship


def test_the_command_trains_the_recipe_network_and_ships_its_ema_export_in_float16(made):
    _, run, ship = made
    card = json.loads((ship / reference.CARD).read_text())
    assert card["step"] == STEPS and card["train_flops"] > 0 and "not SD3" in card["name"]
    assert card["autoencoder"] == "shapes-vae-c4" and card["resolution"] == 128
    assert card["recipe"]["train"]["model"]["depth"] == 3 and card["command"].startswith("python -m")
    assert card["curve"] == [] and not (ship / reference.CURVE).exists()  # scored never (geneval_every=0): no plot
    weights = load_file(ship / reference.WEIGHTS)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    exported = load_file(Path(run) / "export" / reference.WEIGHTS)  # the run's EMA export (test_train checks it)
    assert weights.keys() == exported.keys()
    assert all(torch.equal(weights[k], v.half() if v.is_floating_point() else v) for k, v in exported.items())
    network = load_diffusers(ship)
    assert (network.config.depth, network.config.hidden_size, network.config.in_channels) == (3, 192, 4)


def test_run_again_it_resumes_and_trains_nothing(made):
    cfg, run, _ = made
    before = len(read_records(run))
    assert reference.run(cfg) == run
    assert len(read_records(run)) == before
    assert [e["event"] for e in read_records(run, EVENTS)] == ["started", "finished"]  # not trained again


def test_the_shipped_model_loads_and_reads_its_prompts_above_chance(ray_local, tmp_path):
    """The repository's reference model, scored by the evaluation job on held-out GenEval prompts (fixed seeds):
    the whole prompt, the asked count and the asked shapes come out more often than under shuffled prompts (the
    card's curve has the partial credits of each scored step, on twice these images)."""
    from workloads.evaluate import driver as evaluate_job
    from workloads.reference import shipped

    card = shipped.card()
    assert "not SD3" in card["name"] and card["step"] > 0 and card["curve"]
    network = load_diffusers(shipped.folder())
    assert network.config.in_channels == card["recipe"]["latent_channels"]
    conf = shipped.evaluate_conf(str(tmp_path / "geneval"), str(tmp_path / "tiny"), prompts_per_task=4,
                                 images_per_prompt=2, steps=20, guidance=2.0)
    summary = evaluate_job.run(conf)
    credit, chance = summary["credit"]["overall"], summary["chance"]["credit"]["overall"]
    print({"overall": summary["overall"], "chance": summary["chance"]["geneval"], "credit": credit,
           "chance_credit": chance})
    assert summary["overall"] > summary["chance"]["geneval"]
    assert credit["count"] > chance["count"] and credit["shapes"] > chance["shapes"]
