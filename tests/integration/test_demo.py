"""`make demo` end to end, shrunk: shapes -> Ray Data preprocessing -> Ray Train + DeepSpeed -> Ray Tune depth sweep
-> report folder, with data, runs and the sweep on the loopback S3 server (the `storage=s3://...` variant)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conf.demo import DemoConf
from conf.optim import OptimConf
from conf.train import CheckpointConf, EMAConf, TrainConf, TrainerConf, ValidationConf
from pipelines import schema
from pipelines.storage import filesystem, join
from workloads.demo import driver as demo
from workloads.train.runlog import EVENTS, read_records


def assert_picture(path: Path) -> None:
    """A PNG of a plausible size (figures at 120 dpi) showing something: not one flat colour, and not only
    white paper and grey text (the curves, bars and image tiles are coloured)."""
    with Image.open(path) as image:
        assert image.format == "PNG", path.name
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert 200 <= width <= 4000 and 100 <= height <= 4000, (path.name, width, height)
    assert pixels.std() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, path.name
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 16).mean()
    assert coloured > 0.005, (path.name, coloured)


def small(out_dir: str, storage: str) -> DemoConf:
    return DemoConf(
        out_dir=out_dir, storage=storage, images=16, image_size=64, resolution=64, shard_size=8,
        depths=[1, 2], main_depth=2, geneval_prompts_per_task=1, geneval_steps=4, dpo_steps=2,
        pairs_prompts_per_task=1, pairs_images_per_prompt=2, pairs_sample_steps=2, reference_images=8,
        train=TrainConf(trainer=TrainerConf(num_workers=2, max_steps=6, batch_size=8),
                        optim=OptimConf(lr=1e-3, warmup_steps=2), ema=EMAConf(decay=0.99),
                        validation=ValidationConf(every=3, samples=8, grid_prompts=2, grid_per_prompt=2,
                                                  sample_steps=8, geneval_every=3, geneval_prompts_per_task=1),
                        checkpoint=CheckpointConf(every=3, keep=2)))


def test_demo_runs_every_job_against_object_storage_and_writes_the_report(ray_local, s3, tmp_path, capsys):
    cfg = small(str(tmp_path / "report"), s3.uri("demo"))
    out = demo.run(cfg)
    printed = capsys.readouterr().out
    for k in range(1, 8):
        assert f"[demo] {k}/7 " in printed
    assert f"report folder: {out}" in printed
    for name in ("samples.png", "reference.png", "loss.png", "scaling.png", "reference_model.png"):
        assert_picture(out / name)
    figures = json.loads((out / "summary.json").read_text())
    assert figures["data"]["read"] == 16 == figures["data"]["written"] + figures["data"]["rejected"]
    assert figures["data"]["output"] == cfg.storage + "/data"  # Ray Data read its input from S3 and wrote there
    assert figures["train"]["steps"] == 6 and figures["train"]["workers"] == 2
    assert [s for s, _ in figures["train"]["val_loss"]] == [3, 6]
    assert [s for s, _ in figures["train"]["geneval"]] == [3, 6]  # the score against training compute
    assert [row["depth"] for row in figures["sweep"]] == [1, 2]
    assert figures["sweep"][0]["params"] < figures["sweep"][1]["params"]
    assert all(0 <= row["geneval"] <= 1 for row in figures["sweep"])
    assert set(figures["geneval"]) == {"main run", "ground truth", "untrained", "reference model"}
    assert figures["geneval"]["ground truth"]["overall"] == 1.0 and figures["geneval"]["main run"]["images"] == 12
    assert figures["geneval"]["reference model"]["images"] == 12  # the shipped model, at its own 128 px
    summary = (out / "summary.md").read_text()
    assert "| ground truth | 16 | 1.000 |" in summary
    assert "against C:" in summary and "predicted final validation loss" in summary
    assert "GenEval-shapes during training" in summary and "validation loss against GenEval-shapes" in summary
    assert f"{figures['train']['samples_per_s']:.1f} samples/s" in summary
    assert [s for s, _ in figures["train"]["text_gap"]] == [3, 6] and "each other's texts" in summary
    assert "| reference model | 12 |" in summary and "reference_model.png" in summary
    # a 6-step main run draws no correct image: the DPO stage says so and skips (`test_train.py` runs DPO itself);
    # twelve samples of the reference model make too few pairs for a DPO step
    main_section = summary.split("## Preference tuning of the main run")[1].split("##")[0]
    assert "- skipped: no prompt had both a correct and an incorrect" in main_section
    assert "- skipped:" in summary.split("## Preference tuning of the reference model")[1].split("##")[0]
    fs, root = filesystem(cfg.storage)
    folders = {p.rsplit("/", 1)[-1] for p in fs.ls(root)} - {"pairs-reference"}  # a pair or two, maybe
    assert folders == {"shapes", "data", "runs", "demo-depth", "geneval", "reference"}
    reference_data = json.loads(fs.cat_file(f"{root}/reference/data/{schema.MANIFEST}"))
    assert reference_data["resolution"] == 128 and reference_data["counts"]["written"] == 8
    main = demo.main_run_conf(cfg, demo.Layout.under(cfg.storage))
    events = [e["event"] for e in read_records(join(main.run.storage, main.run.name), EVENTS)]
    assert events == ["started", "finished"]  # the sweep's depth-2 trial reused the main run: trained once
    assert not (out / "work").exists()  # with s3 storage only the report is local


def test_demo_checks_its_config_before_any_work(s3, tmp_path):
    cfg = small(str(tmp_path / "report"), "s3://no-such-bucket-for-the-demo/x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-for-the-demo"):
        demo.check(cfg)
    assert not (tmp_path / "report").exists()
