"""The training job's start-up checks on a real preprocessed dataset: data that does not fit the model, and a
resolution stage without the previous stage's weights, both before any Ray work; and the default validation
hold-out on a dataset of one data file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.train import TrainConf
from pipelines import schema
from workloads.train.driver import plan
from workloads.train.holdout import held_out


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
def one_file_dataset(train_dataset, tmp_path_factory) -> str:
    """The first dataset a user tries, at small scale: one data file (the session dataset's 48 square rows merged
    into one file, with its manifest), as `preprocess resolution=64` writes for a few dozen images."""
    root = tmp_path_factory.mktemp("one-file")
    manifest = json.loads((Path(train_dataset) / schema.MANIFEST).read_text())
    square = sorted(f for f in manifest["files"] if schema.bucket_of(f) == "bucket=64x64")
    target = root / schema.DATA_DIR / "bucket=64x64" / f"{schema.shard_prefix(0)}00000000.parquet"
    target.parent.mkdir(parents=True)
    pq.write_table(pa.concat_tables([pq.read_table(f) for f in square]), target)
    manifest.update(output=str(root), files=[str(target)], buckets=["64x64"])
    (root / schema.MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def test_default_val_fraction_holds_out_rows_of_a_one_file_dataset(one_file_dataset):
    """`loader.val_fraction=0.1` (the default) holds out the tenth of the rows with the smallest id hashes, even
    from one file, and training skips them (the old file-level split stopped here: "needs at least 2 data
    files"). `test_train.py`'s runs train end to end with this default."""
    cfg = TrainConf(data=one_file_dataset)  # 2 workers
    cfg.trainer.batch_size = 4  # 2 a rank: 10 batches a rank with the hold-out, 12 without
    p = plan(cfg)
    ((bucket, files),) = p.train_files.items()
    assert len(files) == 1
    table = pq.read_table(files[0], columns=[schema.ID, schema.LATENT])
    held = held_out(table.column(schema.ID).to_pylist(), p.holdout)
    assert p.val_source == "held-out rows" and held.sum() == 5  # round(0.1 * 48) rows
    assert p.batches == {bucket: (48 - 5) // 2 // 2} == {bucket: 10}
    (group,) = p.val
    latents = table.column(schema.LATENT).combine_chunks().to_numpy_ndarray()
    assert len(group) == 4  # the 5 held-out rows, cut to a multiple of the 2 workers
    assert np.array_equal(group.columns[schema.LATENT], latents[held][:4])
