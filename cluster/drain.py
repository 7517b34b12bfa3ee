"""`python -m cluster.drain --deadline-s 150`: tell Ray this node goes away in that many seconds, then wait until the
training workers on it have left (or the deadline passes).

Run where a node learns it is going away: a KubeRay worker pod's `preStop` hook (cluster/kuberay/raycluster.yaml),
the spot-interruption watcher of `ray up`'s GPU workers (cluster/aws/cluster.yaml). Ray marks the node as draining
(reason: preemption, with the deadline); Ray Train's preemption watcher passes that to the run, whose ranks checkpoint
the next step boundary and restart without this node (`ray.train.get_preemption_info`), counted apart from
`trainer.max_failures`. Ray's own `ray drain-node` does the first half; this adds the wait, so the pod's container
(`ray start --block`) gets its SIGTERM only after the checkpoint is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TRAIN_WORKER = "RayTrainWorker"


def drain_this_node(deadline_s: float, message: str) -> str:
    """Mark the node this process runs on as draining for preemption, with a deadline; returns its id."""
    import ray
    from ray.core.generated import autoscaler_pb2

    ray.init(address="auto", logging_level="WARNING")  # the cluster `ray start` joined on this node
    node = ray.get_runtime_context().get_node_id()
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   message, int((time.time() + deadline_s) * 1000))
    if not accepted:
        raise SystemExit(f"error: Ray refused to drain node {node}: {why}")
    return node


def train_workers_here() -> int:
    """Ray Train worker processes on this machine (Linux: their command lines under /proc)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += TRAIN_WORKER.encode() in (entry / "cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                continue
    return count


def wait_for_workers(deadline_s: float, poll_s: float = 1.0) -> float:
    """Wait until no training worker runs here or `deadline_s` passed; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s and train_workers_here():
        time.sleep(poll_s)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=float, required=True, help="seconds until the node goes away")
    parser.add_argument("--message", default="node going away", help="why, as Ray shows it")
    args = parser.parse_args(argv)
    node = drain_this_node(args.deadline_s, args.message)
    waited = wait_for_workers(args.deadline_s)
    print(f"drained node {node[:12]}: training workers gone after {waited:.0f} s (deadline {args.deadline_s:g} s)")


if __name__ == "__main__":
    main()
