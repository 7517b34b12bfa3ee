"""Preemption and stop requests on a real local Ray with real DeepSpeed: a SIGTERM to a training worker (a pod or a
spot machine going away) and to the training driver (the job being stopped) each cost no step: the ranks agree on
the next step boundary, checkpoint it, and the run (restarted, or started again with the same command) repeats no
optimizer step and reaches the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_train import train_worker_pids
from test_train_faults import tiny_conf

from conf.train import TrainConf
from pipelines import schema
from pipelines.interrupt import sigterm_stops
from pipelines.preprocess import run as preprocess
from pipelines.runtime import cli
from workloads.train import checkpointing, preemption
from workloads.train.driver import run
from workloads.train.runlog import EVENTS, read_records

STEPS = 8


def conf(data: str, storage: Path, name: str) -> TrainConf:
    cfg = tiny_conf(data, str(storage), name, workers=2, steps=STEPS)
    cfg.trainer.max_failures = 0  # a preemption must not need a failure's retry
    return cfg


def losses(folder: Path) -> list[float]:
    records = read_records(str(folder))
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "a step was repeated or skipped"
    return [r["loss"] for r in records]


def when_step(folder: Path, step: int, action, timeout: float = 240) -> threading.Thread:
    """Run `action()` in a thread once `folder`'s metrics hold `step` records."""
    def wait_then_act() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(read_records(str(folder))) < step:
            time.sleep(0.05)
        action()
    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


_uninterrupted: dict[str, Path] = {}


def uninterrupted_run(data: str, tmp_path_factory) -> Path:
    """The reference trajectory, trained once per session (the full-disk tests compare against it too)."""
    if data not in _uninterrupted:
        storage = tmp_path_factory.mktemp("runs")
        run(conf(data, storage, "uninterrupted"))
        _uninterrupted[data] = storage / "uninterrupted"
    return _uninterrupted[data]


@pytest.fixture
def uninterrupted(train_dataset, tmp_path_factory) -> Path:
    return uninterrupted_run(train_dataset, tmp_path_factory)


pytestmark = pytest.mark.faults  # `make test-faults`


@pytest.fixture(autouse=True)
def fast_failure_detection(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def test_sigterm_to_a_worker_checkpoints_that_step_and_the_restart_repeats_none(train_dataset, tmp_path,
                                                                                 uninterrupted):
    """Bound: zero steps repeated (the restart resumes at the step the signal's boundary checkpointed), the losses
    equal the uninterrupted run's, and the restart spends no failure (`trainer.max_failures=0`)."""
    folder = tmp_path / "sigterm"
    sent: dict = {}

    def sigterm_a_worker() -> None:
        sent["pid"], sent["at"] = train_worker_pids()[-1], time.time()
        os.kill(sent["pid"], signal.SIGTERM)

    thread = when_step(folder, 3, sigterm_a_worker)
    result = run(conf(train_dataset, tmp_path, "sigterm"))
    thread.join(5)
    assert result.error is None and "pid" in sent
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", preemption.PREEMPTED, "resumed", "finished"], events
    preempted, resumed = events[1], events[2]
    assert preempted["reason"].startswith("SIGTERM to rank") and 3 <= preempted["step"] < STEPS
    assert resumed["step"] == preempted["step"]  # zero steps repeated
    assert resumed["checkpoint"].endswith(checkpointing.dir_name(preempted["step"]))
    assert losses(folder) == losses(uninterrupted)
    checkpointed = (folder / checkpointing.dir_name(preempted["step"])).stat().st_mtime - sent["at"]
    print(f"preempted after step {preempted['step']} (signal at step >= 3), its checkpoint {checkpointed:.1f} s after "
          f"the signal; resumed at step {resumed['step']}")


def test_sigterm_to_the_driver_stops_at_a_checkpoint_and_the_same_command_resumes(train_dataset, tmp_path,
                                                                                   uninterrupted, capsys):
    """Bound: the job exits 0 (the entry point returns) after checkpointing the step boundary the signal reached,
    with one line saying where and how to resume; the same command then repeats no step and reaches the
    uninterrupted run's losses. The signal is sent as soon as the driver's handler is in place (while the workers
    start), so the stop always lands before the last step however fast the steps run."""
    folder = tmp_path / "driver"
    command = _overrides(train_dataset, tmp_path, "driver")

    def sigterm_the_driver_once_training() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            handler = getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
            if handler.startswith(preemption.driver_sigterm.__name__):  # ours, while training: never Ray's exit
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=sigterm_the_driver_once_training, daemon=True)
    thread.start()
    cli("train", run, argv=command)  # returns: exit status 0
    thread.join(5)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1 and "run the same command to resume" in lines[0], out[-2000:]
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", preemption.INTERRUPTED], events
    stopped_at = events[1]["step"]
    assert f"after step {stopped_at} of {STEPS}" in lines[0] and stopped_at < STEPS
    cli("train", run, argv=command)
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events][2:] == ["resumed", "finished"] and events[2]["step"] == stopped_at
    assert losses(folder) == losses(uninterrupted)
    print(lines[0])


def _overrides(data: str, storage: Path, name: str) -> list[str]:
    from test_train_faults import tiny_overrides

    return [*tiny_overrides(data, str(storage), name, workers=2, steps=STEPS), "trainer.max_failures=0"]


def preprocess_overrides(train_dataset: str, output: Path) -> list[str]:
    """The session dataset's preprocessing again (its input and tiny models) into `output`, as a command line."""
    root = Path(train_dataset).parent
    stage = ["batch_size=8", "num_cpus=0.5"]
    return [f"input={root / 'shapes' / 'folder'}", f"output={output}", "buckets=[64x64,80x48]", "folder_shard_size=8",
            "models.kind=tiny", f"models.tiny_dir={root / 'tiny'}", "models.caption_max_new_tokens=8",
            "compute.decode_num_cpus=0.25", "compute.decode_batch_size=8", "compute.write_batch_size=8",
            *[f"compute.{s}.{o}" for s in ("vae", "caption", "text") for o in stage]]


def markers(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (output / schema.MARKERS_DIR).glob("*.json")}


def test_sigterm_to_the_preprocessing_driver_keeps_finished_shards_and_the_rerun_redoes_none(train_dataset, tmp_path,
                                                                                              capsys):
    """Bound: the job exits 0 at the signal with one line; every shard marked done before it is kept untouched and
    the same command redoes none of them, finishing the rest."""
    output = tmp_path / "data"
    command = preprocess_overrides(train_dataset, output)

    def sigterm_after_the_first_shard() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not markers(output):
            time.sleep(0.05)
        handler = getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
        if handler.startswith(sigterm_stops.__name__):  # ours, while shards are processed: never Ray's exit
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=sigterm_after_the_first_shard, daemon=True)
    thread.start()
    cli("preprocess", preprocess, argv=command)  # returns: exit status 0
    thread.join(5)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    kept = markers(output)
    assert len(lines) == 1 and f"{len(kept)} of 8 shards done and kept" in lines[0], out[-2000:]
    assert 0 < len(kept) < 8 and not (output / schema.MANIFEST).exists()
    cli("preprocess", preprocess, argv=command)
    assert f"8 folder shards: {len(kept)} done, {8 - len(kept)} to do" in capsys.readouterr().out
    assert {name: t for name, t in markers(output).items() if name in kept} == kept  # nothing finished was redone
    assert json.loads((output / schema.MANIFEST).read_text())["counts"] == {"read": 64, "written": 64, "rejected": 0}
    print(lines[0])
