"""Stopping between steps, without Ray: which stop the ranks' flags decide, and that two real ranks (gloo) agree on
it after a SIGTERM to one of them or a full disk on the other."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from workloads.train import preemption
from workloads.train.preemption import DISK_FULL, INTERRUPTED, PREEMPTED, Stop, decide


def test_no_flag_no_stop():
    assert decide([0, 0, 0, 0]) is None


def test_a_sigterm_on_any_rank_preempts_all_and_names_the_rank():
    assert decide([0, 0, 0, 1]) == Stop(PREEMPTED, "SIGTERM to rank 1")
    assert decide([0, 0, 1, 1]) == Stop(PREEMPTED, "SIGTERM to rank 0, 1")


def test_a_drain_notice_preempts():
    assert decide([0, 0, 0, 0], drain_ranks=[2, 3]) == Stop(PREEMPTED, "Ray drains the node of rank 2, 3")


def test_a_full_disk_wins_over_a_driver_stop_which_wins_over_a_preemption():
    assert decide([1, 1, 1, 0]).kind == DISK_FULL
    assert decide([1, 0, 1, 0], drain_ranks=[0]) == Stop(INTERRUPTED, "SIGTERM to the driver")


def _rank(rank: int, world: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    import torch

    notice = preemption.Notice(None, rank, world, torch.device("cpu"))
    try:
        first = notice.check()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: the process lives on
        dist.barrier()
        second = notice.check()
        preemption.SIGTERM_SEEN.clear()
        if rank == 0:
            notice.disk_full = "disk full (No space left on device): writing /x"
        third = notice.check()
        message = notice.disk_full_message()
        Path(results, str(rank)).write_text(repr((first, second, third, message)))
    finally:
        notice.close()
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_same_step_boundary():
    """Bound checked: the stop is seen by every rank at the first check after the signal (zero extra steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the ranks reuse this process's imports (spawned ones import torch and Ray again, many seconds)
        mp.start_processes(_rank, args=(2, f"{tmp}/store", tmp), nprocs=2, join=True, start_method="fork")
        outcomes = [Path(tmp, str(r)).read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1]
    first, second, third, message = eval(outcomes[0], {"Stop": Stop})  # our own repr
    assert first is None
    assert second == Stop(PREEMPTED, "SIGTERM to rank 1")
    assert third.kind == DISK_FULL and message.startswith("disk full (No space left on device): writing /x")


def test_the_handler_is_only_installed_from_the_main_thread():
    import threading

    installed = []
    thread = threading.Thread(target=lambda: installed.append(preemption.install_handler()))
    thread.start()
    thread.join()
    assert installed == [False]
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert preemption.install_handler() is True
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.SIGTERM_SEEN.wait(5)
    finally:
        preemption.uninstall_handler()
    assert signal.getsignal(signal.SIGTERM) == before and not preemption.SIGTERM_SEEN.is_set()


@pytest.fixture(autouse=True)
def _clear_flag():
    yield
    preemption.SIGTERM_SEEN.clear()


def test_a_sigterm_inside_a_data_job_raises_terminated_and_the_handler_is_restored_after():
    from pipelines.interrupt import Terminated, sigterm_stops

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_stops():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in the main thread as soon as the signal arrives
    assert signal.getsignal(signal.SIGTERM) == before
