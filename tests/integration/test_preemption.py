"""Preemption and stop requests on a real local Ray with real DeepSpeed: a SIGTERM to a training worker (a pod or a
spot machine going away) and to the training driver (the job being stopped) each cost no step: the ranks agree on
the next step boundary, checkpoint it, and the run (restarted, or started again with the same command) repeats no
optimizer step and reaches the uninterrupted run's losses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from test_train import train_worker_pids
from test_train_faults import tiny_conf

from conf.train import TrainConf
from pipelines import schema
from pipelines.interrupt import sigterm_stops
from pipelines.preprocess import run as preprocess
from pipelines.runtime import JobStopped, cli, free_port
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


def test_past_max_preemptions_the_run_ends_at_its_checkpoint_and_resumes_later(train_dataset, tmp_path,
                                                                              uninterrupted):
    """`trainer.max_preemptions=0`: a SIGTERM to a worker still checkpoints that step, and the run then ends with an
    error instead of restarting. Bound: the same command with preemptions allowed resumes at that step (zero steps
    repeated) and reaches the uninterrupted run's losses."""
    folder = tmp_path / "capped"
    cfg = conf(train_dataset, tmp_path, "capped")
    cfg.trainer.max_preemptions = 0
    thread = when_step(folder, 3, lambda: os.kill(train_worker_pids()[-1], signal.SIGTERM))
    with pytest.raises(JobStopped, match=r"preempted more than trainer\.max_preemptions=0 times") as stopped:
        run(cfg)
    thread.join(5)
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events][:2] == ["started", preemption.PREEMPTED], events
    stopped_at = events[1]["step"]
    assert str(stopped.value).endswith(f"{checkpointing.dir_name(stopped_at)}: run the same command to resume")
    cfg.trainer.max_preemptions = -1
    assert run(cfg).error is None
    resumed = [e for e in read_records(str(folder), EVENTS) if e["event"] == "resumed"]
    assert resumed[-1]["step"] == stopped_at and losses(folder) == losses(uninterrupted)
    print(f"capped run: preempted after step {stopped_at}: error: {stopped.value}")


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


def sigterm_after_the_first_marker(output: Path) -> threading.Thread:
    """A thread that sends this process a SIGTERM once `output` holds a shard's done marker, while the job's own
    handler is in place (never Ray's, which would exit)."""
    def send() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not markers(output):
            time.sleep(0.05)
        handler = getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
        if handler.startswith(sigterm_stops.__name__):
            os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def markers(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (output / schema.MARKERS_DIR).glob("*.json")}


def test_sigterm_to_the_preprocessing_driver_keeps_finished_shards_and_the_rerun_redoes_none(train_dataset, tmp_path,
                                                                                              capsys):
    """Bound: the job exits 0 at the signal with one line; every shard marked done before it is kept untouched and
    the same command redoes none of them, finishing the rest."""
    output = tmp_path / "data"
    command = preprocess_overrides(train_dataset, output)

    thread = sigterm_after_the_first_marker(output)
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


@pytest.mark.usefixtures("ray_local")
def test_sigterm_to_the_dedup_driver_keeps_finished_shards_and_the_rerun_redoes_none(planted, tmp_path, capsys):
    """Bound: the dedup job returns at the signal with one line and no manifest; every embedding shard marked done
    before it is kept untouched, and the same command embeds only the images of the shards that were not."""
    from test_dedup_job import dedup_conf

    from pipelines.dedup.job import run as dedup

    folder, _ = planted
    output = tmp_path / "dedup"
    done = output / "embeddings"

    thread = sigterm_after_the_first_marker(done)
    assert dedup(dedup_conf(folder, str(output))) == {"stopped": True}
    thread.join(5)
    lines = [line for line in capsys.readouterr().out.splitlines() if "stopped by SIGTERM" in line]
    kept = markers(done)
    assert len(lines) == 1 and "run the same command to finish the rest" in lines[0]
    assert kept and not (output / schema.MANIFEST).exists()
    read = sum(json.loads((done / schema.MARKERS_DIR / name).read_text())["rows_read"] for name in kept)
    again = dedup(dedup_conf(folder, str(output)))
    assert again["counts"]["images"] == read + again["last_run"]["embed_images"]  # none embedded twice
    assert {name: t for name, t in markers(done).items() if name in kept} == kept  # nothing finished was redone
    print(f"{lines[0]}; {len(kept)} shards ({read} images) kept, {again['last_run']['embed_images']} embedded after")


@contextlib.contextmanager
def spot_nodes(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` more nodes in this session's cluster, each a `ray start --block` of 1 CPU advertising a `spot`
    resource (a multi-node local cluster); stopped (SIGTERM to the blocking process) at the end."""
    gcs = ray.get_runtime_context().gcs_address
    alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])  # noqa: E731
    before = alive()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    nodes, sockets = [], Path(tempfile.mkdtemp(prefix="spot-", dir="/tmp"))  # short: a socket path has 107 bytes
    for i in range(count):  # each node's own ports and folder (its sockets): raylets on one machine may not share
        ports = [f"--{name}-port={free_port()}" for name in ("node-manager", "object-manager", "dashboard-agent-listen",
                                                             "dashboard-agent-grpc", "runtime-env-agent",
                                                             "metrics-export")]
        low = free_port()
        nodes.append(subprocess.Popen(
            [ray_cli, "start", f"--address={gcs}", "--num-cpus=1", '--resources={"spot": 1}', *ports,
             f"--min-worker-port={low}", f"--max-worker-port={low + 50}", f"--temp-dir={sockets}/n{i}", "--block",
             "--disable-usage-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 120
        while alive() < before + count and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive() == before + count, f"{alive() - before} of {count} nodes joined the cluster"
        yield nodes
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        deadline = time.monotonic() + 60
        while alive() > before and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(sockets, ignore_errors=True)


def train_worker_node() -> str | None:
    """The node id of this run's live Ray Train worker (one worker)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return actors[0].node_id if len(actors) == 1 else None


def drain(node_id: str, deadline_s: float) -> None:
    """What a cloud's preemption notice does through the autoscaler: Ray drains the node, with a deadline."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot instance reclaimed (test)", int((time.time() + deadline_s) * 1000))
    assert accepted, why


def test_a_drained_node_checkpoints_that_step_and_the_run_moves_to_another_node(train_dataset, tmp_path,
                                                                               monkeypatch):
    """A multi-node local cluster: the worker runs on one of two `spot` nodes (`trainer.worker_resources`), which Ray
    then drains with a 120 s deadline. Bound: Ray Train's preemption watcher sees the drain within a step or two; the
    ranks checkpoint that step, the worker restarts on the other node at the same step (zero steps repeated) and the
    run finishes with `trainer.max_failures=0`."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # local runs turn it off (no node ever drains)
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")  # 5 s by default
    folder, seen, steps = tmp_path / "drained", {}, 200  # steps enough that the run outlasts the drain's notice
    cfg = tiny_conf(train_dataset, str(tmp_path), "drained", workers=1, steps=steps)
    cfg.trainer.max_failures, cfg.trainer.worker_resources = 0, {"spot": 1.0}

    def drain_the_workers_node() -> None:
        seen["node"], seen["at"] = train_worker_node(), time.time()
        drain(seen["node"], deadline_s=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and train_worker_node() in (None, seen["node"]):
            time.sleep(0.2)
        seen["moved_to"] = train_worker_node()

    with spot_nodes(2):
        thread = when_step(folder, 3, drain_the_workers_node)
        result = run(cfg)
        thread.join(60)
    assert result.error is None and seen.get("node")
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", preemption.PREEMPTED, "resumed", "finished"], events
    preempted, resumed = events[1], events[2]
    assert preempted["reason"] == "Ray drains the node of rank 0" and 3 <= preempted["step"] < steps
    assert resumed["step"] == preempted["step"]  # zero steps repeated
    assert seen["moved_to"] not in (None, seen["node"])  # the restart went to the other spot node
    assert len(losses(folder)) == steps  # every step once
    checkpointed = (folder / checkpointing.dir_name(preempted["step"])).stat().st_mtime - seen["at"]
    print(f"drained after step >= 3; checkpoint of step {preempted['step']} {checkpointed:.1f} s after the drain; "
          f"resumed at step {resumed['step']} on another node")
