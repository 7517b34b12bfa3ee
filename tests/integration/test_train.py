"""Training on Ray Train + DeepSpeed ZeRO from a preprocessed shapes dataset (2 CPU workers, the debug MM-DiT):
outputs, a killed worker, a restarted job, partial checkpoints, local and s3:// storage, and the export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conf.train import TrainConf
from pipelines.geneval.stats import PairedChange, paired_change
from pipelines.storage import filesystem, join
from workloads.train import checkpointing
from workloads.train.driver import plan, run
from workloads.train.runlog import EVENTS, METRICS, read_records
from workloads.train.validation import geneval_results

STEPS = 12  # 6 or 7 steps per epoch (58 training rows, 6 held out by id): the runs cross an epoch boundary


def train_conf(data: str, storage: str, name: str, stage: int, steps: int = STEPS) -> TrainConf:
    cfg = TrainConf(data=data)
    t = cfg.trainer
    t.num_workers, t.batch_size, t.max_steps, t.max_failures = 2, 8, steps, 2
    cfg.deepspeed.stage = stage
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 2
    cfg.ema.decay = 0.9
    v = cfg.validation
    v.every, v.samples, v.batch_size, v.grid_prompts, v.grid_per_prompt, v.sample_steps = 6, 8, 8, 2, 2, 4
    cfg.checkpoint.every, cfg.checkpoint.keep = 4, 2
    cfg.loader.shuffle_buffer = 16
    # ZeRO-2 runs stream every epoch from storage; ZeRO-3 runs (on S3) read the small data into the object store
    # once (the `auto` choice); the two trajectories are compared, so both paths feed the same rows.
    cfg.loader.materialize = False if stage == 2 else None
    cfg.run.storage, cfg.run.name = storage, name
    return cfg


def losses(run_uri: str) -> list[float]:
    records = read_records(run_uri)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture(autouse=True)
def fast_failure_detection(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def with_geneval(cfg: TrainConf) -> TrainConf:
    """GenEval-shapes at every validation: one prompt of each task, two images each."""
    v = cfg.validation
    v.geneval_every, v.geneval_prompts_per_task, v.geneval_images_per_prompt = v.every, 1, 2
    return cfg


@pytest.fixture(scope="module")
def zero2_run(train_dataset, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("runs"))
    result = run(with_geneval(train_conf(train_dataset, storage, "zero2", stage=2)))
    return Path(storage) / "zero2", result


def test_run_writes_metrics_checkpoints_samples_and_export(zero2_run, train_dataset):
    folder, result = zero2_run
    assert result.error is None and result.metrics["step"] == STEPS
    records = read_records(str(folder))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["bucket"] for r in records} == {"bucket=64x64", "bucket=80x48"}  # batches share one bucket each
    per_epoch = sum(plan(train_conf(train_dataset, "unused", "unused", stage=2)).batches.values())
    assert per_epoch < STEPS and [r["epoch"] for r in records] == [(s - 1) // per_epoch for s in range(1, STEPS + 1)]
    first = records[0]
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "data_wait", "loss_t0", "skipped"):
        assert key in first
    assert "mfu" not in first  # no peak on CPU unless configured
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    scored = [r for r in records if "geneval" in r]  # validation.geneval_every: the six tasks, each scored
    assert [r["step"] for r in scored] == [6, 12] and all(0.0 <= r["geneval"] <= 1.0 for r in scored)
    assert all({f"geneval_{t}" for t in ("single_object", "counting", "color_attr")} <= set(r) for r in scored)
    assert sorted(p.name for p in (folder / "geneval").iterdir()) == ["step_00000006.jsonl", "step_00000012.jsonl"]
    assert all(np.isfinite(r["val_loss_at_0.500"]) for r in records if "val_loss" in r)
    for r in (r for r in records if "val_loss" in r):  # the prompt-use measure beside every validation loss
        assert r["text_gap"] == pytest.approx(r["val_loss_shuffled_text"] / r["val_loss"] - 1)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[-1]["lr"] == pytest.approx(1e-3)  # warm-up
    kept = sorted(p.name for p in folder.glob(f"{checkpointing.PREFIX}*"))
    assert kept == [checkpointing.dir_name(8), checkpointing.dir_name(12)]  # keep the last 2
    assert checkpointing.find_latest(str(folder)).uri.endswith(checkpointing.dir_name(12))
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["step_00000006.png", "step_00000012.png"]
    assert list((folder / "tensorboard").iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["val_source"] == "held-out rows"
    assert summary["geneval"] == scored[-1]["geneval"]
    assert [e["event"] for e in read_records(str(folder), EVENTS)] == ["started", "finished"]


def ema_network(checkpoint: Path):
    from model import FLAVORS, MMDiT

    names, tensors = checkpointing.full_ema(checkpoint)
    net = MMDiT(FLAVORS["debug"])
    state = dict(zip(names, tensors, strict=True))
    state["pos_embed"] = net.pos_embed
    net.load_state_dict(state, strict=True)
    return net.eval()


def assert_export_is_ema(folder: Path) -> None:
    """diffusers loads <run>/export and gives the same output as the EMA weights of the final checkpoint."""
    from diffusers import SD3Transformer2DModel

    ours = ema_network(folder / checkpointing.dir_name(STEPS))
    theirs = SD3Transformer2DModel.from_pretrained(str(folder / "export")).eval()
    c = ours.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, 8, 10, generator=gen)
    t = torch.rand(2, generator=gen)
    context, pooled = torch.randn(2, 154, c.context_dim, generator=gen), torch.randn(2, c.pooled_dim, generator=gen)
    with torch.no_grad():
        expected = ours(x, t, context, pooled)
        got = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled,
                     return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_loads_in_diffusers_with_the_ema_weights(zero2_run):
    assert_export_is_ema(zero2_run[0])


def train_worker_pids() -> list[int]:
    """The Ray Train workers of this session's cluster, oldest first: descendants of this process (its raylet
    started them), so another cluster on the machine (a parallel test worker, a user's job) is never touched."""
    workers = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("RayTrainWorker" in part for part in p.cmdline()):
                workers.append((p.create_time(), p.pid))
    return [pid for _, pid in sorted(workers)]


@pytest.fixture(scope="module")
def zero3_s3_reference(s3, train_dataset):
    fs, _ = filesystem(s3.uri("datasets"))
    fs.put(train_dataset + "/", s3.uri("datasets/shapes") + "/", recursive=True)
    data = s3.uri("datasets/shapes")
    run(train_conf(data, s3.uri("runs"), "zero3", stage=3))
    return data, s3.uri("runs/zero3")


def reference(request, stage: int) -> tuple[str, str, str]:
    """(data, storage for new runs, reference run) of the uninterrupted run at `stage`: ZeRO-2 on local disk,
    ZeRO-3 on the S3 server."""
    if stage == 2:
        folder, _ = request.getfixturevalue("zero2_run")
        return request.getfixturevalue("train_dataset"), str(request.getfixturevalue("tmp_path")), str(folder)
    data, uri = request.getfixturevalue("zero3_s3_reference")
    name = request.node.name.replace("[", "-").replace("]", "")
    return data, request.getfixturevalue("s3").uri(f"runs/{name}"), uri


# ZeRO-3 resumption from a checkpoint is covered by the restarted-job test (a whole-job restart reads the same
# checkpoint a replaced worker group does); one stage here keeps the fault tier within its time budget.
@pytest.mark.faults  # `make test-faults`
@pytest.mark.parametrize("stage", [2])
def test_killed_worker_is_replaced_and_the_trajectory_is_unchanged(request, stage):
    """SIGKILL a worker after the step-4 checkpoint: Ray Train restarts the group, which resumes from the latest
    complete checkpoint and reproduces the uninterrupted run's losses exactly."""
    data, storage, expected = reference(request, stage)
    cfg = train_conf(data, storage, "killed", stage=stage)
    uri = join(storage, "killed")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(cfg)))
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if checkpointing.find_latest(uri) and len(read_records(uri)) >= 4:  # step 4's checkpoint is complete
            break
        time.sleep(0.05)
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=400)
    result = outcome["result"]
    assert result.error is None and result.metrics["step"] == STEPS
    events = read_records(uri, EVENTS)
    assert [e["event"] for e in events] == ["started", "failed", "resumed", "finished"]  # the kill is recorded
    assert events[2]["step"] in (4, 8)
    assert losses(uri) == losses(expected)


def test_zero3_on_s3_matches_zero2(zero3_s3_reference, zero2_run):
    _, uri = zero3_s3_reference
    np.testing.assert_allclose(losses(uri), losses(str(zero2_run[0])), rtol=1e-4)
    fs, root = filesystem(uri)
    assert fs.exists(join(root, "export", "config.json")) and fs.exists(join(root, "metrics.jsonl"))


@pytest.mark.faults  # `make test-faults`
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 resumption is covered by the killed-worker test
def test_restarted_job_resumes_and_skips_a_partial_checkpoint(request, stage, tmp_path):
    """A job stopped after step 8's checkpoint, as a killed job leaves its folder (the reference run's checkpoint 8,
    its events and all its step records, later ones included), with a newer checkpoint missing one rank's files: the
    same command resumes from step 8 (not the partial one), drops the records after it and continues the reference
    trajectory exactly."""
    data, storage, expected = reference(request, stage)
    uri = join(storage, "restart")
    fs, root = filesystem(uri)
    _, reference_root = filesystem(expected)
    for name in (METRICS, EVENTS):
        fs.copy(join(reference_root, name), join(root, name))
    kept, partial = join(root, checkpointing.dir_name(8)), join(root, checkpointing.dir_name(9))
    fs.copy(join(reference_root, checkpointing.dir_name(8)) + "/", kept + "/", recursive=True)
    fs.copy(kept + "/", partial + "/", recursive=True)
    fs.rm(join(partial, checkpointing.complete_name(1)))
    assert checkpointing.find_latest(uri).uri.endswith(checkpointing.dir_name(8))
    run(train_conf(data, storage, "restart", stage=stage))
    events = read_records(uri, EVENTS)
    assert [e["event"] for e in events] == ["started", "finished", "resumed", "finished"]
    assert events[2]["checkpoint"].endswith(checkpointing.dir_name(8)) and events[2]["step"] == 8
    assert losses(uri) == losses(expected)
    local = tmp_path / "copy"
    fs.get(root + "/", str(local) + "/", recursive=True)
    assert_export_is_ema(local)
    shutil.rmtree(local)


@pytest.mark.faults  # `make test-faults`
def test_restarted_job_skips_a_checkpoint_cut_short_and_a_cut_metrics_line(zero2_run, train_dataset, tmp_path):
    """A job killed while it wrote its step-12 checkpoint (every rank's list there, one file cut short) and a metrics
    line: the same command resumes from step 8, the last complete checkpoint, drops the cut line and continues the
    reference trajectory exactly (ZeRO-2, local disk)."""
    reference = zero2_run[0]
    folder = tmp_path / "cut"
    folder.mkdir()
    for step in (8, 12):
        shutil.copytree(reference / checkpointing.dir_name(step), folder / checkpointing.dir_name(step))
    newest = folder / checkpointing.dir_name(12)
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
    assert all((newest / checkpointing.complete_name(r)).is_file() for r in range(2))
    assert checkpointing.find_latest(str(folder)).uri.endswith(checkpointing.dir_name(8))
    lines = (reference / METRICS).read_text().splitlines(keepends=True)
    (folder / METRICS).write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    (folder / EVENTS).write_text((reference / EVENTS).read_text().splitlines(keepends=True)[0])
    run(train_conf(train_dataset, str(tmp_path), "cut", stage=2))
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", "resumed", "finished"]
    assert events[1]["checkpoint"].endswith(checkpointing.dir_name(8)) and events[1]["step"] == 8
    assert losses(str(folder)) == losses(str(reference))
    assert checkpointing.find_latest(str(folder)).uri.endswith(checkpointing.dir_name(12))  # written whole again


def test_evaluate_samples_a_prompt_set_with_the_run_and_scores_it(zero2_run, train_dataset, tmp_path):
    """`workloads.evaluate run=... data=...`: the run's export samples the GenEval prompts (Ray Data batch
    inference), written in GenEval's layout, then detected and scored; with the settings training's
    `validation.geneval_every` used, it gives the score the run logged at its last step (the same EMA weights,
    prompts, noise, sampler and decoder)."""
    from conf.evaluate import EvaluateConf
    from pipelines import geneval
    from workloads.evaluate import driver as evaluate

    folder = zero2_run[0]
    cfg = with_geneval(train_conf(train_dataset, "unused", "unused", stage=2))
    v = cfg.validation
    summary = evaluate.run(EvaluateConf(
        run=str(folder), data=train_dataset, out=str(tmp_path / "eval"), prompts_per_task=1,
        images_per_prompt=2, steps=v.sample_steps, guidance=v.guidance, shift=cfg.objective.shift,
        seed=cfg.trainer.seed, batch_size=4))
    assert summary["images"] == 12 and summary["prompts"] == 6 and set(summary["tasks"]) == set(geneval.TAGS)
    logged = read_records(str(folder))[-1]
    assert summary["overall"] == pytest.approx(logged["geneval"])
    assert summary["tasks"] == pytest.approx({t: logged[f"geneval_{t}"] for t in geneval.TAGS})
    # image by image: the same objects found (class, colour, box) and the same verdict
    lines = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
    job = {(r["prompt_index"], int(Path(r["filename"]).stem)): r for r in map(json.loads, lines)}
    lines = (folder / "geneval" / f"step_{STEPS:08d}.jsonl").read_text().splitlines()
    hook = {(r["prompt_index"], r["k"]): r for r in map(json.loads, lines)}
    assert job.keys() == hook.keys() and len(job) == 12
    for k, r in hook.items():
        found = [(d["cls"], d["color"], d["box"]) for d in r["details"]]
        assert found == [(d["cls"], d["color"], d["box"]) for d in job[k]["details"]], k
        assert r["correct"] == job[k]["correct"], k
    assert len(list((tmp_path / "eval" / "images").glob("*/samples/*.png"))) == 12
    lines = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"filename", "tag", "prompt", "correct", "reason", "metadata"} <= set(
        json.loads(lines[0]))
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 0


@pytest.fixture(scope="module")
def pairs(zero2_run, train_dataset, tmp_path_factory) -> tuple[str, dict, list[dict]]:
    """`workloads.make_pairs` on the ZeRO-2 run: training prompts sampled (Ray Data, the Generator actor) and judged
    by GenEval-shapes, then paired and written. A 12-step network draws no correct shapes, so the verdicts that pair
    the samples are set here (every other sample of a prompt counts as correct); the demo's trained run pairs by
    the judge's own verdicts, whose scorer `test_geneval.py` checks against ground truth."""
    from conf.pairs import MakePairsConf
    from workloads.make_pairs import driver as make_pairs

    cfg = MakePairsConf(run=str(zero2_run[0]), data=train_dataset, out=str(tmp_path_factory.mktemp("pairs") / "p"),
                        prompts_per_task=6, images_per_prompt=4, steps=4, batch_size=12)
    spec, prompts = make_pairs.check(cfg)
    resolution = make_pairs.sample_resolution(cfg, spec)  # the data's square bucket: 64
    judged = make_pairs.sample_and_judge(cfg, prompts, spec.vae, resolution)
    samples = [s | {"correct": int(s["k"]) % 2 == 0} for s in judged]
    return cfg.out, make_pairs.write_pairs(cfg, spec, prompts, samples, resolution), judged


def test_make_pairs_writes_judged_pairs_of_held_out_free_prompts_as_a_dataset(pairs, train_dataset):
    import pyarrow.parquet as pq

    from pipelines import geneval, schema
    from workloads.evaluate.prompts import prompt_set
    from workloads.train.data import latent_shape, read_spec

    out, manifest, judged = pairs
    n = 4 * sum(manifest["prompts"].values())
    assert manifest["kind"] == "pairs" and manifest["counts"]["read"] == n == len(judged)
    assert [(int(s["prompt_index"]), int(s["k"])) for s in judged] == [(i // 4, i % 4) for i in range(n)]
    spec = read_spec(train_dataset)
    # sampled at the data's square bucket, the latents of its training rows
    assert {s["latent"].shape for s in judged} == {latent_shape(spec.location, spec.files_by_bucket["bucket=64x64"][0])}
    assert all(s["correct"] in (True, False) for s in judged)
    assert manifest["counts"]["written"] == sum(manifest["pairs"].values()) == 2 * sum(manifest["prompts"].values())
    assert all(manifest["pairs"][t] <= manifest["correct"][t] for t in geneval.TAGS)
    spec = read_spec(out)
    assert spec.pairs and spec.tensor_columns[-1] == schema.LOSER_LATENT and spec.text == read_spec(train_dataset).text
    (file,) = [f for files in spec.files_by_bucket.values() for f in files]
    table = pq.read_table(file)
    held_out = {p["prompt"] for p in prompt_set(0, dict.fromkeys(geneval.TAGS, 4))}
    assert not set(table.column(schema.CAPTION).to_pylist()) & held_out  # GenEval's prompts stay unseen
    winners = table.column(schema.LATENT).combine_chunks().to_numpy_ndarray()
    losers = table.column(schema.LOSER_LATENT).combine_chunks().to_numpy_ndarray()
    assert winners.shape == losers.shape and not np.array_equal(winners, losers)

    def drawn_by(latent: np.ndarray, parity: int) -> bool:  # a sample with an even k was set correct above
        return any(np.allclose(np.float32(latent), np.asarray(s["latent"], np.float32), rtol=1e-3, atol=1e-2)
                   for s in judged if int(s["k"]) % 2 == parity)

    assert all(drawn_by(w, 0) for w in winners) and all(drawn_by(w, 1) for w in losers)  # never the wrong way round
    assert (Path(out) / "pairs.png").stat().st_size > 0


def test_dpo_on_zero3_trains_only_lora_adapters_scores_before_and_after_and_exports_both_forms(
        pairs, zero2_run, train_dataset, tmp_path):
    """`objective=dpo data=<pairs> init_from=<run>` under ZeRO-3: at step 1 the adapters are zero, so policy =
    reference and the loss is exactly log 2; the run logs DPO's accuracy and margin, validates the base objective on
    held-out real data (val_data=) and writes GenEval-shapes before and after in its summary. As any LoRA run
    (`lora.rank=`), it trains, checkpoints and exports the adapters only, and a worker killed after the step-2
    checkpoint is replaced: the group resumes from an adapters-only checkpoint (the base from init_from again).
    Its merged export equals the base with the exported adapters loaded by diffusers itself (`load_lora_adapter`).
    (That a resumed LoRA step equals the uninterrupted one is `test_zero_two_ranks.py`'s check.)"""
    import math

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from conf.checks import Objective
    from conf.train import LoraConf
    from model import FLAVORS
    from workloads.train.lora import LORA_DIR, LORA_WEIGHTS, lora_numel

    data, _, _ = pairs
    base = zero2_run[0]
    cfg = with_geneval(train_conf(data, str(tmp_path), "dpo", stage=3, steps=4))
    cfg.trainer.batch_size = 2  # one pair per worker: a few pairs make a dataset
    cfg.init_from, cfg.val_data, cfg.lora = str(base), train_dataset, LoraConf(rank=4, alpha=8.0)
    cfg.loader.materialize = False
    cfg.objective.kind, cfg.objective.synthetic_caption_prob, cfg.objective.text_drop_prob = Objective.dpo, 0.0, 0.0
    cfg.validation.every = cfg.validation.geneval_every = cfg.checkpoint.every = 2
    cfg.validation.geneval_before = True
    folder = tmp_path / "dpo"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(cfg)))
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (checkpointing.find_latest(str(folder))
                                               and len(read_records(str(folder))) >= 2):
        time.sleep(0.05)
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=400)
    assert outcome["result"].error is None
    records = read_records(str(folder))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and records[0]["dpo_accuracy"] == 0.0
    assert all(0.0 <= r["dpo_accuracy"] <= 1.0 and np.isfinite(r["dpo_reward_margin"]) for r in records)
    assert records[-1]["loss"] != records[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val_source"] == "val_data" and summary["lora_rank"] == 4
    assert 0.0 <= summary["geneval_before"] <= 1.0 and summary["geneval_after"] == records[-1]["geneval"]
    assert set(summary["geneval_tasks_before"]) == set(summary["geneval_tasks_after"]) >= {"counting", "position"}
    results = [read_records(str(folder), geneval_results(step)) for step in (0, 4)]  # the same prompts and noise
    assert PairedChange.of_summary(summary, len(results[0])) == paired_change(*results)
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", "geneval_before", "failed", "resumed", "finished"]
    assert events[3]["step"] in (2, 4)
    assert summary["trained_params"] == lora_numel(FLAVORS["debug"], cfg.lora) < summary["params"] / 5
    full = sum(p.stat().st_size for p in (base / checkpointing.dir_name(STEPS)).rglob("*") if p.is_file())
    assert summary["checkpoint_bytes"] < full / 3  # adapters and their optimizer state only, no frozen base
    gen = torch.Generator().manual_seed(0)
    c = FLAVORS["debug"]
    x, t = torch.randn(2, c.in_channels, 8, 10, generator=gen), torch.rand(2, generator=gen)
    context, pooled = torch.randn(2, 154, c.context_dim, generator=gen), torch.randn(2, c.pooled_dim, generator=gen)

    def output(net):
        with torch.no_grad():
            return net(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled,
                       return_dict=False)[0]

    merged = SD3Transformer2DModel.from_pretrained(str(folder / "export")).eval()
    adapted = SD3Transformer2DModel.from_pretrained(str(base / "export")).eval()
    before = output(adapted)
    adapted.load_lora_adapter(StableDiffusion3Pipeline.lora_state_dict(str(folder / "export" / LORA_DIR)),
                              prefix="transformer")
    assert (folder / "export" / LORA_DIR / LORA_WEIGHTS).is_file()
    torch.testing.assert_close(output(adapted), output(merged), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(output(merged), before, atol=1e-6)  # the adapters learned something
