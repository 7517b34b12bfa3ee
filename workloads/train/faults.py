"""Faults a long run meets, made legible: a stalled rank (each step's deadline dumps every rank's Python stacks and
names where it is), a failed step (its rank, step and kind, with what to change for an out-of-memory), and the same
failure at the same step in two attempts in a row, which stops the run instead of spending every retry on it.

Failures are recorded as `failed` events in the run's `events.jsonl` by Ray Train's controller (`FailureLog`), which
sees every rank's error, a process killed by Ray's memory monitor included; the workers of the next attempt read
them before building anything (`repeated_failure`)."""

from __future__ import annotations

import datetime
import faulthandler
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

import ray.train
import torch
import torch.distributed as dist

from conf.train import FaultInjection, TrainConf, TrainerConf
from pipelines.storage import Location
from workloads.runtime import logger, one_line
from workloads.train.runlog import EVENTS, METRICS, jsonl, read_records

LOG = logger("train")
STACKS = "stacks"
FAILED, STOPPED = "failed", "stopped"
# Kinds of failure; the ones with a step that is the run's own (not a node's death) stop the run when repeated.
HOST_OOM, CUDA_OOM, KILLED_OOM = "host_oom", "cuda_oom", "killed_oom"
COLLECTIVE_TIMEOUT, DIED = "collective_timeout", "died"
TIMEOUT_WORDS = ("timed out", "timeout")


class StepFailure(RuntimeError):
    """A rank's failure in the step loop, with what the controller records: kind, step and rank."""

    def __init__(self, message: str, kind: str, step: int, rank: int) -> None:
        super().__init__(message)
        self.kind, self.step, self.rank = kind, step, rank

    def __reduce__(self):  # Ray pickles it to the controller
        return (type(self), (str(self), self.kind, self.step, self.rank))


def memory_advice(cfg: TrainConf) -> str:
    """What to change so a step fits, leaving out what the run already does."""
    t = cfg.trainer
    options = [] if t.activation_checkpointing else ["trainer.activation_checkpointing=true"]
    options.append(f"a smaller per-worker batch (now {t.batch_size // t.num_workers}: lower trainer.batch_size or "
                   "raise trainer.num_workers)")
    if cfg.deepspeed.stage < 3:
        options.append("deepspeed.stage=3")
    if not cfg.deepspeed.offload:
        options.append("deepspeed.offload=true")
    return "to fit, try " + ", ".join(options)


def step_failure(error: BaseException, step: int, rank: int, cfg: TrainConf) -> StepFailure:
    """`error`, raised by rank `rank` in step `step`, as the StepFailure the controller records."""
    text = one_line(error)
    if isinstance(error, torch.OutOfMemoryError):
        kind, message = CUDA_OOM, f"rank {rank} ran out of GPU memory at step {step} ({text}); {memory_advice(cfg)}"
    elif isinstance(error, MemoryError):
        kind, message = HOST_OOM, f"rank {rank} ran out of host memory at step {step} ({text}); {memory_advice(cfg)}"
    elif isinstance(error, RuntimeError) and any(w in text.lower() for w in TIMEOUT_WORDS):
        kind = COLLECTIVE_TIMEOUT
        message = (f"rank {rank} waited in a collective past its timeout at step {step}: another rank stalled (its "
                   f"`stalled` log line and <run>/{STACKS}/ show where); {text}")
    else:
        kind, message = type(error).__name__, f"rank {rank} failed at step {step}: {text}"
    return StepFailure(message, kind, step, rank)


def inject(fault: str | None, trainer: TrainerConf, rank: int, step: int) -> None:
    """`trainer.fault_injection`, the test hook: this rank stalls or runs out of memory here if it is the one."""
    if fault is None:
        return
    spec = FaultInjection.parse(fault, trainer.num_workers)
    if (spec.rank, spec.step) != (rank, step):
        return
    if spec.kind == "stall":
        time.sleep(3600)
    raise MemoryError(f"fault injection {fault!r} (trainer.fault_injection)")


def set_collective_timeout(seconds: float) -> None:
    """The default process group's timeout from now on (torchtitan lowers it the same way after the first step)."""
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


class StepDeadline:
    """This rank's time limit per step. The process group's collective timeout is `first_s` until the session's first
    step is done and `steady_s` after it. When a step runs past its limit, faulthandler dumps every thread's Python
    stack to `<run>/stacks/rank<k>.txt` (from C: it works while the interpreter is stuck) and a timer thread logs
    where this rank's training thread is: in a collective (waiting for another rank) or elsewhere (stalled)."""

    def __init__(self, run: Location, rank: int, first_s: float, steady_s: float) -> None:
        self.run, self.rank, self.first_s, self.steady_s = run, rank, first_s, steady_s
        folder = Path(tempfile.mkdtemp(prefix="stacks-")) if run.remote else Path(run.root) / STACKS
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}.txt"
        self.file = self.path.open("a")
        self.thread = threading.get_ident()  # Ray Train runs the training function in a thread of its own
        self.started = 0  # steps started in this session
        self.step = 0  # the step armed last: the one a failure happens in
        self.timer: threading.Timer | None = None

    def arm(self, step: int) -> None:
        self.cancel()
        self.started, self.step = self.started + 1, step
        if self.started == 2:
            set_collective_timeout(self.steady_s)
        limit = self.first_s if self.started == 1 else self.steady_s
        faulthandler.dump_traceback_later(limit, repeat=False, file=self.file)
        self.timer = threading.Timer(limit, self._report, (step, limit))
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        self.cancel()
        self.file.close()

    def _report(self, step: int, limit: float) -> None:
        frame = sys._current_frames().get(self.thread)
        where, collective = describe(frame)
        shown = f"{self.run.uri}/{STACKS}/{self.path.name}"
        if collective:
            LOG.warning(f"rank {self.rank} waits in a collective at step {step} past {limit:g} s ({where}): another "
                        f"rank stalled; Python stacks in {shown}")
        else:
            LOG.warning(f"rank {self.rank} stalled at step {step}: over {limit:g} s in {where} (the collective "
                        f"timeout: trainer.collective_timeout_s); Python stacks in {shown}")
        if self.run.remote:
            time.sleep(1.0)  # faulthandler's dump is written by then
            self.run.fs.put_file(str(self.path), f"{self.run.root}/{STACKS}/{self.path.name}")


def describe(frame: FrameType | None) -> tuple[str, bool]:
    """The innermost frame as `function (file:line)`, and whether the stack is inside torch.distributed."""
    if frame is None:
        return "an unknown place", False
    where = f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
    collective = False
    while frame is not None:
        collective = collective or "torch/distributed" in frame.f_code.co_filename
        frame = frame.f_back
    return where, collective


@dataclass
class FailureRecord:
    kind: str
    step: int | None
    rank: int | None
    error: str


def classify(rank: int, error: BaseException, run: Location) -> FailureRecord:
    """What the controller knows of one rank's error: a StepFailure's own fields; for a process that died, the step
    after the last one logged (metrics.jsonl, synced every metrics.sync_every steps on remote storage)."""
    if isinstance(error, StepFailure):
        return FailureRecord(error.kind, error.step, error.rank, str(error))
    text = str(error)
    killed_oom = any(w in text for w in ("OutOfMemoryError", "memory monitor", "out of memory"))
    records = read_records(run, METRICS)
    step = (records[-1]["step"] if records else 0) + 1
    if killed_oom:
        message = (f"rank {rank} was killed for using too much memory (Ray's memory monitor) at about step {step}; "
                   f"lower trainer.batch_size, or set trainer.activation_checkpointing=true, deepspeed.stage=3 or "
                   f"deepspeed.offload=true")
        return FailureRecord(KILLED_OOM, step, rank, message)
    return FailureRecord(DIED, step, rank, f"rank {rank} died at about step {step}: {one_line(error)[:500]}")


# Which rank's error an attempt's record keeps: the cause before what it set off in the others.
PRIORITY = (HOST_OOM, CUDA_OOM, KILLED_OOM)


def primary(failures: list[FailureRecord]) -> FailureRecord:
    def rank(f: FailureRecord) -> int:
        if f.kind in PRIORITY:
            return 0
        return 2 if f.kind in (COLLECTIVE_TIMEOUT, DIED) else 1
    return min(failures, key=rank)


class FailureLog(ray.train.UserCallback):
    """Ray Train controller callback: each failed attempt becomes one `failed` event (kind, step, rank, message) in
    the run's events.jsonl, tagged with the job session that saw it."""

    def __init__(self, run_uri: str, endpoint_url: str | None, session: str) -> None:
        self.run_uri, self.endpoint_url, self.session = run_uri, endpoint_url, session

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        try:
            run = Location.of(self.run_uri, self.endpoint_url).refreshed()
            found = primary([classify(rank, error, run) for rank, error in sorted(worker_exceptions.items())])
            record = {"event": FAILED, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "session": self.session, "kind": found.kind, "step": found.step, "rank": found.rank,
                      "error": found.error}
            run.write_bytes(EVENTS, jsonl([*read_records(run, EVENTS), record]))
        except Exception as error:  # an error here would fail the run (a ControllerError), not just its record
            LOG.warning(f"could not record the failure in {self.run_uri}/{EVENTS}: {one_line(error)}")


def repeated_failure(events: list[dict], session: str) -> str | None:
    """Why the run stops, when this session's last two attempts failed the same way at the same step (not a process
    that merely died: a lost node twice is bad luck, not the run's own fault); None otherwise."""
    failed = [e for e in events if e["event"] == FAILED and e.get("session") == session]
    if len(failed) < 2:
        return None
    a, b = failed[-2:]
    if (a["kind"], a["step"]) != (b["kind"], b["step"]) or a["kind"] == DIED:
        return None
    return (f"the same failure twice in a row at step {b['step']} ({b['kind']}), so the run stops instead of "
            f"retrying: {b['error']}. Change the config and run the same command to resume from the last checkpoint")


def stop_if_repeated(run: Location, session: str) -> bool:
    """Every rank's verdict (rank 0 reads the events): whether this attempt must stop before it starts; rank 0 then
    writes a `stopped` event, which the driver turns into the job's error."""
    verdict = [None]
    if dist.get_rank() == 0:
        events = read_records(run, EVENTS)
        verdict = [repeated_failure(events, session)]
        if verdict[0] is not None:
            record = {"event": STOPPED, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "session": session, "reason": verdict[0]}
            run.refreshed().write_bytes(EVENTS, jsonl([*events, record]))
            LOG.error(f"stopped: {verdict[0]}")
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0] is not None


def stopped_reason(run: Location, session: str) -> str | None:
    """The reason this session's workers stopped the run, if they did (the driver's check after fit)."""
    stops = [e for e in read_records(run, EVENTS) if e["event"] == STOPPED and e.get("session") == session]
    return stops[-1]["reason"] if stops else None
