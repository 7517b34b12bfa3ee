"""Faults a long run meets in production, on a real local Ray: a second job's cluster on the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ray._private.services import find_gcs_addresses

from workloads.runtime import LOCAL_RAY_OWNER

ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(data: str, storage: str, name: str, workers: int, steps: int) -> list[str]:
    """A run of a few steps that validates and checkpoints only where a test asks (command-line form)."""
    return [f"data={data}", f"run.storage={storage}", f"run.name={name}", f"trainer.num_workers={workers}",
            f"trainer.batch_size={2 * workers}", f"trainer.max_steps={steps}", "validation.every=1000",
            "validation.samples=2", "validation.batch_size=2", "validation.grid_prompts=1",
            "validation.grid_per_prompt=1", "validation.sample_steps=1", "validation.text_gap=false",
            "checkpoint.every=1000", "checkpoint.final=false", "metrics.tensorboard=false", "export=false",
            "loader.materialize=true", "loader.shuffle_buffer=8"]


def test_a_job_beside_another_local_cluster_finishes(train_dataset, tmp_path):
    """`python -m workloads.train` in a process of its own while this session's cluster is up: two local clusters on
    the machine. Each process the job starts finds its own cluster through RAY_ADDRESS; before, Ray Train's placement
    group cleaner (and any state API call without an address) gave up on "Found multiple active Ray instances"."""
    assert find_gcs_addresses(), "the session's cluster should be up"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", LOCAL_RAY_OWNER)}
    proc = subprocess.run([sys.executable, "-m", "workloads.train",
                           *tiny_overrides(train_dataset, str(tmp_path), "beside", workers=1, steps=2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Found multiple active Ray instances" not in output
    assert json.loads((tmp_path / "beside" / "summary.json").read_text())["step"] == 2
    assert os.environ.get("RAY_ADDRESS") is None  # the test session's own environment is untouched
