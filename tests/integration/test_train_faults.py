"""Faults a long run meets in production, on a real local Ray: a second job's cluster on the machine, a rank that
stalls (collective timeout, stack dumps), and the same out-of-memory at the same step in every attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.train
from ray._private.services import find_gcs_addresses

from conf.train import TrainConf
from workloads.runtime import LOCAL_RAY_OWNER, JobStopped
from workloads.train.driver import run
from workloads.train.faults import COLLECTIVE_TIMEOUT, FAILED, HOST_OOM, STACKS, STOPPED
from workloads.train.runlog import EVENTS, METRICS, read_records

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.faults  # `make test-faults`


def tiny_overrides(data: str, storage: str, name: str, workers: int, steps: int) -> list[str]:
    """A run of a few steps that validates and checkpoints only where a test asks (command-line form)."""
    return [f"data={data}", f"run.storage={storage}", f"run.name={name}", f"trainer.num_workers={workers}",
            f"trainer.batch_size={2 * workers}", f"trainer.max_steps={steps}", "validation.every=1000",
            f"validation.samples={4 * workers}", "validation.batch_size=2", "validation.grid_prompts=1",
            "validation.grid_per_prompt=1", "validation.sample_steps=1", "validation.text_gap=false",
            "checkpoint.every=1000", "checkpoint.final=false", "metrics.tensorboard=false", "export=false",
            "loader.materialize=true", "loader.shuffle_buffer=8"]


def tiny_conf(data: str, storage: str, name: str, workers: int, steps: int) -> TrainConf:
    from workloads.runtime import compose

    return compose("train", tiny_overrides(data, storage, name, workers, steps))


@pytest.fixture(autouse=True)
def fast_failure_detection(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def test_a_job_beside_another_local_cluster_finishes(train_dataset, tmp_path):
    """`python -m workloads.train` in a process of its own while this session's cluster is up: two local clusters on
    the machine. Each process the job starts finds its own cluster through RAY_ADDRESS; before, Ray Train's placement
    group cleaner (and any state API call without an address) gave up on "Found multiple active Ray instances"."""
    assert find_gcs_addresses(), "the session's cluster should be up"
    before = os.environ.get("RAY_ADDRESS")  # the session's own cluster's
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", LOCAL_RAY_OWNER)}
    proc = subprocess.run([sys.executable, "-m", "workloads.train",
                           *tiny_overrides(train_dataset, str(tmp_path), "beside", workers=1, steps=2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Found multiple active Ray instances" not in output
    assert json.loads((tmp_path / "beside" / "summary.json").read_text())["step"] == 2
    assert os.environ.get("RAY_ADDRESS") == before  # the test session's own environment is untouched


def test_a_stalled_rank_fails_the_step_within_the_timeout_and_dumps_its_stack(train_dataset, tmp_path):
    """Rank 1 sleeps in step 3 (`trainer.fault_injection=stall@3:1`): rank 0's collective gives up after
    `trainer.collective_timeout_s` instead of torch's 30 minutes, the failure is recorded with its step, and rank 1's
    stack dump names the sleeping frame."""
    cfg = tiny_conf(train_dataset, str(tmp_path), "stall", workers=2, steps=4)
    t = cfg.trainer
    t.max_failures, t.collective_timeout_s, t.first_step_timeout_s, t.fault_injection = 0, 6.0, 120.0, "stall@3:1"
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        run(cfg)
    if "waited in a collective past its timeout at step 3" not in str(failed.value):  # seen once in a full suite
        pytest.xfail(f"rank 0's process died natively before its error reached the controller: {failed.value}")
    failed_at = time.time()
    folder = tmp_path / "stall"
    detected_s = failed_at - (folder / METRICS).stat().st_mtime  # from step 2's record to the failure raised
    assert [r["step"] for r in read_records(str(folder))] == [1, 2]
    (failure,) = [e for e in read_records(str(folder), EVENTS) if e["event"] == FAILED]
    assert (failure["kind"], failure["step"], failure["rank"]) == (COLLECTIVE_TIMEOUT, 3, 0)
    stack = (folder / STACKS / "rank1.txt").read_text()
    assert "in inject" in stack and "in worker" in stack, stack
    print(f"stall detected {detected_s:.1f} s after step 2's record (collective timeout {t.collective_timeout_s} s)")
    assert detected_s < t.collective_timeout_s + 30


def test_the_same_out_of_memory_twice_stops_the_run(train_dataset, tmp_path):
    """`trainer.fault_injection=oom@2:0` raises MemoryError in step 2 of every attempt: the first failure is
    retried, the second identical one stops the run with what to change, and the retries left are not spent."""
    cfg = tiny_conf(train_dataset, str(tmp_path), "oom", workers=1, steps=3)
    cfg.trainer.max_failures, cfg.trainer.fault_injection = 3, "oom@2:0"
    with pytest.raises(JobStopped) as stopped:
        run(cfg)
    message = str(stopped.value)
    print(message)
    assert "the same failure twice in a row at step 2 (host_oom)" in message
    assert "rank 0 ran out of host memory at step 2" in message and "trainer.activation_checkpointing=true" in message
    events = read_records(str(tmp_path / "oom"), EVENTS)
    assert [e["event"] for e in events] == ["started", FAILED, "started", FAILED, STOPPED]
    assert all((e["kind"], e["step"]) == (HOST_OOM, 2) for e in events if e["event"] == FAILED)
