"""Rank 0's files in the run folder: `metrics.jsonl` (one record per step), TensorBoard events and sample grids.

They are written to a local folder (the run folder itself for local storage) and uploaded every so often for remote
storage. On resume the records after the restored step are dropped, so the file always tells one trajectory.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
from pathlib import Path

from pipelines.storage import Location, join

METRICS, EVENTS, SUMMARY = "metrics.jsonl", "events.jsonl", "summary.json"
SYNCED = (METRICS, EVENTS, SUMMARY, "tensorboard", "samples", "geneval")


def read_records(run: Location | str, name: str = METRICS) -> list[dict]:
    """The JSON-lines records of `<run>/<name>` (metrics or events); [] before the run wrote any."""
    run = Location.of(run).refreshed()
    if not run.exists(name):
        return []
    return [json.loads(line) for line in run.read_bytes(name).decode().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run: Location, resume_step: int, tensorboard: bool = True) -> None:
        self.fs, self.root = run.fs, run.root
        self.remote = run.remote
        self.local = Path(tempfile.mkdtemp(prefix="run-")) if self.remote else Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(run, METRICS) if r["step"] <= resume_step]
        (self.local / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.metrics = (self.local / METRICS).open("a")
        if self.remote:
            events = read_records(run, EVENTS)
            (self.local / EVENTS).write_text("".join(json.dumps(r) + "\n" for r in events))
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.local / "tensorboard"), purge_step=resume_step + 1)

    def path(self, relative: str) -> Path:
        """A local path for a file that belongs at `<run>/<relative>` (uploaded by `sync`)."""
        out = self.local / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def event(self, kind: str, **fields) -> None:
        """One line in `events.jsonl`, the run's history (starts, resumptions, the end); never truncated."""
        record = {"event": kind, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields}
        with (self.local / EVENTS).open("a") as events:
            events.write(json.dumps(record) + "\n")
        self.sync((EVENTS,))

    def sync(self, include: tuple[str, ...] = SYNCED) -> None:
        """Upload the given files/folders to the run folder (nothing to do for local storage)."""
        if self.writer is not None:
            self.writer.flush()
        if not self.remote:
            return
        for name in include:
            source = self.local / name
            if source.is_dir():
                self.fs.put(str(source) + "/", join(self.root, name) + "/", recursive=True)
            elif source.exists():
                self.fs.put_file(str(source), join(self.root, name))

    def close(self) -> None:
        self.sync()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
