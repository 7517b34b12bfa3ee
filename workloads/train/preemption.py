"""Stopping a run between two steps so that it loses none: a drain notice from Ray Train (a node about to be taken
away), a SIGTERM to a worker process (its pod or machine shutting down), a stop request from the driver (the job
being stopped) or a full disk on any rank.

After every step each rank puts its flags into one all-reduce (`Notice.check`), so all ranks agree on the same step
boundary, as Lightning does with its signal flag. The worker then checkpoints that step and either restarts through
Ray Train's preemption path (counted in `FailureConfig.max_preemption_failures`, apart from
`trainer.max_failures`) or, for a driver stop, returns so the job can exit 0. A signal handler can only be installed
from a process's main thread, and Ray Train runs the training function in a thread of its own: the handler is
installed through the worker actor's own main thread and only sets an event the training thread reads."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from workloads.runtime import logger

LOG = logger("train")
PREEMPTED, INTERRUPTED, DISK_FULL = "preempted", "interrupted", "disk_full"
# Set by the SIGTERM handler of this process (the signal is process-wide, so is the event); read between steps.
SIGTERM_SEEN = threading.Event()
_previous: list = []  # the handler ours replaced: a second SIGTERM goes to it (the process exits as before)
RESTART_WAIT_S = 600.0  # after its checkpoint a preempted group waits this long for Ray Train to restart it


@dataclass(frozen=True)
class Stop:
    """What the ranks agreed to do at a step boundary: `kind` is PREEMPTED (checkpoint, then restart), INTERRUPTED
    (checkpoint, then end the job) or DISK_FULL (end the job, writing nothing more); `reason` says why."""

    kind: str
    reason: str


def decide(flags: list[float], drain_ranks: list[int] | None = None) -> Stop | None:
    """The agreed flags after the all-reduce: [driver stop, disk full, SIGTERM seen by rank 0, rank 1, ...]; and the
    ranks on nodes Ray Train reports as draining (None: no drain). A full disk wins (nothing more can be written),
    then the driver's stop (the job ends), then a preemption (the run restarts)."""
    driver, full, signalled = flags[0] > 0, flags[1] > 0, [r for r, f in enumerate(flags[2:]) if f > 0]
    if full:
        return Stop(DISK_FULL, "a full disk")
    if driver:
        return Stop(INTERRUPTED, "SIGTERM to the driver")
    if signalled:
        return Stop(PREEMPTED, f"SIGTERM to rank {', '.join(map(str, signalled))}")
    if drain_ranks is not None:
        return Stop(PREEMPTED, f"Ray drains the node of rank {', '.join(map(str, drain_ranks))}")
    return None


def _on_sigterm(signum: int, frame) -> None:
    if SIGTERM_SEEN.is_set() and _previous and callable(_previous[0]):
        _previous[0](signum, frame)  # the second one: exit now, as without us
        return
    SIGTERM_SEEN.set()


def install_handler() -> bool:
    """Install the SIGTERM handler; must run on the main thread. Returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _previous:
        _previous.append(signal.getsignal(signal.SIGTERM))
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def uninstall_handler() -> None:
    if _previous and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _previous.pop())
    SIGTERM_SEEN.clear()


def on_main_thread(fn: Callable[[], object]) -> object:
    """Run `fn` on this process's main thread: here when already on it, else through the Ray Train worker actor,
    whose main thread serves its method calls while the training function runs in another thread."""
    if threading.current_thread() is threading.main_thread():
        return fn()
    # Ray seam: `execute` is how Ray Train runs its own setup functions on a worker (on the actor's main thread).
    return ray.get(ray.get_runtime_context().current_actor.execute.remote(fn))


@ray.remote(num_cpus=0)
class StopRequest:
    """The driver's stop request, held in an actor the workers can see: `wait` resolves once `request` was called."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def request(self) -> None:
        self.event.set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True


@contextmanager
def driver_sigterm(stop) -> Iterator[threading.Event]:
    """While training: the first SIGTERM to the driver asks the workers to checkpoint and stop at the next step
    boundary (the event it yields is set); a second one exits at once, as before. Only on the main thread (a Tune
    trial's driver runs elsewhere and keeps Ray's handling)."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame) -> None:
        if seen.is_set() and callable(previous):
            previous(signum, frame)
            return
        seen.set()
        # from a thread: the handler interrupts the main thread inside Ray's own wait in `fit`
        threading.Thread(target=lambda: ray.get(stop.request.remote()), daemon=True).start()
        LOG.warning("SIGTERM: the workers checkpoint at the next step boundary, then the job ends (a second SIGTERM "
                    "ends it now)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


class Notice:
    """One rank's view of the reasons to stop, agreed with the others at every step boundary (`check`)."""

    def __init__(self, stop, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.driver = stop.wait.remote() if stop is not None else None
        # Ray Train's watcher of draining nodes runs on clusters (local runs turn it off: no node is ever drained)
        self.watch_drain = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") not in ("0", "false")
        self.disk_full: str | None = None  # this rank's message, when a write of its own found no room
        self.installed = bool(on_main_thread(install_handler))

    def driver_requested(self) -> bool:
        if self.driver is None:
            return False
        ready, _ = ray.wait([self.driver], timeout=0)
        return bool(ready)

    def check(self) -> Stop | None:
        """Every rank calls it after every step (a collective): the agreed Stop, or None to go on."""
        flags = torch.zeros(self.world + 2, dtype=torch.float32, device=self.device)
        flags[0] = float(self.driver_requested())
        flags[1] = float(self.disk_full is not None)
        flags[2 + self.rank] = float(SIGTERM_SEEN.is_set())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        drain = None
        if self.watch_drain:
            info = ray.train.get_preemption_info()  # a barrier across the ranks, the same answer on each
            drain = info.preempted_ranks if info is not None else None
        return decide(flags.tolist(), drain)

    def disk_full_message(self) -> str:
        """The first rank's disk-full message (a collective, on the DISK_FULL path only)."""
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, self.disk_full)
        return next(m for m in messages if m is not None)

    def close(self) -> None:
        if self.installed:
            on_main_thread(uninstall_handler)


def restart_now(rank: int) -> None:
    """After the preempted step's checkpoint: ask Ray Train to restart the group at once, through its preemption
    path (the retry counts in `max_preemption_failures`, not `max_failures`), and wait to be replaced."""
    from ray.train import PreemptionInfo

    info = PreemptionInfo(deadline_ms=int(time.time() * 1000),
                          preempted_node_to_ranks={ray.get_runtime_context().get_node_id(): [rank]})
    # Ray seam: what Ray Train's PreemptionWatcher does when a node drains; a deadline of now ends the controller's
    # wait for the drain, and it restarts the workers from the latest checkpoint (the one just written).
    ray.get(ray.get_runtime_context().current_actor.mark_preempt.remote(info))
    time.sleep(RESTART_WAIT_S)
    raise RuntimeError(f"Ray Train did not restart the workers within {RESTART_WAIT_S:g} s of the preemption")
