"""Connecting a job's driver to Ray: the cluster in RAY_ADDRESS, or a local one started with enough logical CPUs."""

from __future__ import annotations

import os


def ensure_ray(min_cpus: float = 0) -> None:
    """Start a new local Ray unless one is running in this process or RAY_ADDRESS names a cluster
    (`RAY_ADDRESS=auto` joins a cluster started on this machine with `ray start`).

    A local cluster gets at least `min_cpus` logical CPUs: a training job's workers hold their CPUs for the whole
    run, and Ray Data's read tasks need CPUs of their own beside them, or the job waits forever on a laptop with
    fewer cores than workers plus readers. Logical CPUs above the physical count only let the OS share the cores.
    """
    import ray

    # Ray Train 2.60 sends workers' print() to its logger and, when stdout is wrapped, to stdout as well: every
    # progress line showed twice. Ray Train hands this variable from the driver to its controller and workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(-(-min_cpus // 1))))
