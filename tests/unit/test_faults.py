"""The fault helpers of training without Ray: the test hook's spec, failure kinds and advice, the repeated-failure
rule, and where a stalled thread is."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from conf.train import FaultInjection, TrainConf, TrainerConf
from workloads.train import faults


def test_fault_injection_spec_is_checked_at_compose_time():
    assert FaultInjection.parse("stall@3:1", 2) == FaultInjection("stall", 3, 1)
    for bad in ("stall@3:2", "boom@3:0", "oom@0:0", "oom3:0"):
        with pytest.raises(ValueError, match=r"trainer\.fault_injection must be <kind>@<step>:<rank>"):
            TrainerConf(num_workers=2, fault_injection=bad)


def test_memory_errors_name_rank_step_and_only_the_remedies_not_in_use():
    cfg = TrainConf()
    cfg.trainer.activation_checkpointing = True
    failure = faults.step_failure(MemoryError("no room"), 7, 1, cfg)
    assert (failure.kind, failure.step, failure.rank) == (faults.HOST_OOM, 7, 1)
    assert str(failure).startswith("rank 1 ran out of host memory at step 7 (no room)")
    assert "activation_checkpointing" not in str(failure) and "deepspeed.stage=3" in str(failure)
    cfg.trainer.activation_checkpointing, cfg.deepspeed.stage = False, 3
    advice = str(faults.step_failure(MemoryError("no room"), 7, 1, cfg))
    assert "trainer.activation_checkpointing=true" in advice and "deepspeed.stage=3" not in advice
    assert faults.step_failure(torch.OutOfMemoryError("CUDA"), 7, 1, cfg).kind == faults.CUDA_OOM
    timeout = faults.step_failure(RuntimeError("Timed out waiting 3000ms for recv operation"), 3, 0, cfg)
    assert timeout.kind == faults.COLLECTIVE_TIMEOUT
    assert faults.step_failure(KeyError("x"), 3, 0, cfg).kind == "KeyError"


def test_step_failure_survives_pickling():
    import pickle

    failure = pickle.loads(pickle.dumps(faults.StepFailure("m", faults.HOST_OOM, 2, 1)))
    assert (str(failure), failure.kind, failure.step, failure.rank) == ("m", faults.HOST_OOM, 2, 1)


def failed(kind: str, step: int, session: str = "s") -> dict:
    return {"event": faults.FAILED, "kind": kind, "step": step, "rank": 0, "error": "e", "session": session}


def test_only_the_same_failure_at_the_same_step_twice_in_this_session_stops():
    started = {"event": "started"}
    assert faults.repeated_failure([started, failed("host_oom", 2)], "s") is None
    assert "twice in a row at step 2" in faults.repeated_failure([failed("host_oom", 2), started,
                                                                 failed("host_oom", 2)], "s")
    assert faults.repeated_failure([failed("host_oom", 2), failed("host_oom", 3)], "s") is None
    assert faults.repeated_failure([failed("host_oom", 2), failed("cuda_oom", 2)], "s") is None
    assert faults.repeated_failure([failed("died", 2), failed("died", 2)], "s") is None  # a lost node, twice
    assert faults.repeated_failure([failed("host_oom", 2, "old"), failed("host_oom", 2)], "s") is None


def test_primary_failure_is_the_cause_not_the_collateral():
    timeout = faults.FailureRecord(faults.COLLECTIVE_TIMEOUT, 3, 0, "a")
    oom = faults.FailureRecord(faults.HOST_OOM, 3, 1, "b")
    died = faults.FailureRecord(faults.DIED, 3, 2, "c")
    other = faults.FailureRecord("KeyError", 3, 3, "d")
    assert faults.primary([timeout, oom]) is oom and faults.primary([oom, timeout]) is oom
    assert faults.primary([died, other, timeout]) is other and faults.primary([other, oom]) is oom


def test_describe_names_the_innermost_frame_of_a_sleeping_thread():
    def stalled_here():
        time.sleep(2)

    thread = threading.Thread(target=stalled_here, daemon=True)
    thread.start()
    time.sleep(0.2)
    where, collective = faults.describe(sys._current_frames()[thread.ident])
    assert where.startswith("stalled_here (test_faults.py:") and not collective
