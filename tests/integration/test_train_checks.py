"""The training job's start-up checks on a real preprocessed dataset: data that does not fit the model, and a
resolution stage without the previous stage's weights, both before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conf.train import TrainConf
from workloads.train.driver import plan


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
