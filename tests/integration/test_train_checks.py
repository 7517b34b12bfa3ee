"""The training job's start-up checks on a real preprocessed dataset: data that does not fit the model, and a
resolution stage without the previous stage's weights, both before any Ray work; and the default validation
hold-out on a dataset of one data file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.train import TrainConf
from pipelines import schema
from workloads.train.driver import plan, run
from workloads.train.streaming import held_out


def test_data_that_does_not_fit_the_model_fails_at_start_up(train_dataset):
    cfg = TrainConf(data=train_dataset)
    cfg.trainer.num_workers, cfg.trainer.batch_size = 1, 4
    cfg.model.context_dim = 48
    with pytest.raises(ValueError, match="'original_t5'"):
        plan(cfg)


def test_cli_stage_needs_the_previous_stage_and_fails_before_ray(train_dataset, tmp_path):
    """`stage=res512` without `init_from` stops before any Ray work, saying what to set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.train", f"data={train_dataset}", "stage=res512", "model=debug",
         f"run.storage={tmp_path / 'runs'}"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    assert "set init_from=<the previous stage's run folder>" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def one_file_dataset(ray_local, tmp_path_factory) -> str:
    """The first run a user tries, at small scale: 64 shapes preprocessed at 64 px into a single data file."""
    from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
    from pipelines.make_shapes import MakeShapesConf
    from pipelines.make_shapes import run as make_shapes
    from pipelines.preprocess import run as preprocess

    root = tmp_path_factory.mktemp("one-file")
    make_shapes(MakeShapesConf(out=str(root / "shapes"), n=64, size=96))
    stage = StageConf(batch_size=16, num_cpus=0.5)
    preprocess(PreprocessConf(
        input=str(root / "shapes" / "folder"), output=str(root / "data"), resolution=64, folder_shard_size=64,
        models=ModelsConf(kind="tiny", tiny_dir=str(root / "tiny"), caption_max_new_tokens=8),
        compute=ComputeConf(decode_num_cpus=0.25, write_batch_size=64, vae=stage, caption=stage, text=stage)))
    return str(root / "data")


def test_default_val_fraction_holds_out_rows_of_a_one_file_dataset(one_file_dataset):
    """`loader.val_fraction=0.1` (the default) holds out the tenth of the rows with the smallest id hashes, even
    from one file."""
    p = plan(TrainConf(data=one_file_dataset))  # 2 workers, global batch 32
    ((bucket, files),) = p.train_files.items()
    assert len(files) == 1
    table = pq.read_table(files[0], columns=[schema.ID, schema.LATENT])
    held = held_out(table.column(schema.ID).to_pylist(), p.holdout)
    assert p.val_source == "held-out rows" and held.sum() == 6  # round(0.1 * 64) rows
    assert p.batches == {bucket: (64 - held.sum()) // 2 // 16} == {bucket: 1}
    (group,) = p.val
    latents = table.column(schema.LATENT).combine_chunks().to_numpy_ndarray()
    assert len(group) == held.sum() // 2 * 2 > 0
    assert np.array_equal(group.columns[schema.LATENT], latents[held][: len(group)])


def test_default_config_trains_on_a_one_file_dataset(one_file_dataset, tmp_path):
    """`python -m workloads.train data=<it> model=debug` with the defaults, cut to 2 steps, trains and validates."""
    cfg = TrainConf(data=one_file_dataset)
    cfg.trainer.max_steps = 2
    cfg.run.storage = str(tmp_path)
    result = run(cfg)
    assert result.error is None and result.metrics["step"] == 2
    summary = json.loads((tmp_path / cfg.run.name / "summary.json").read_text())
    assert summary["val_source"] == "held-out rows" and np.isfinite(summary["val_loss"])
