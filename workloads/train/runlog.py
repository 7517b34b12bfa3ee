"""Rank 0's files in the run folder: `metrics.jsonl` (one record per step), TensorBoard events and sample grids.

They are written to a local folder (the run folder itself for local storage) and uploaded every so often for remote
storage. On resume the records after the restored step are dropped, so the file always tells one trajectory.
A line cut short by a killed run (the last one) or otherwise unreadable is skipped with a warning, never fatal; the
files are rewritten whole on resume (a temporary file renamed over them), so a kill then loses nothing.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from pipelines.storage import DiskFull, Location, disk_full_message, is_disk_full, join, write_bytes
from workloads.runtime import logger

LOG = logger("train")
METRICS, EVENTS, SUMMARY = "metrics.jsonl", "events.jsonl", "summary.json"
SYNCED = (METRICS, EVENTS, SUMMARY, "tensorboard", "samples", "geneval")


def parse_records(text: str, source: str) -> list[dict]:
    """The JSON records of a JSON-lines text; an unreadable line is skipped with a warning naming `source` and its
    line number (the last one is most likely cut short by an interrupted write)."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            last = all(not rest.strip() for rest in lines[number:])
            what = "its last line, cut short by an interrupted write" if last else "an unreadable line"
            LOG.warning(f"{source}: line {number} dropped ({what}): {line[:80]!r}")
    return records


def read_records(run: Location | str, name: str = METRICS) -> list[dict]:
    """The JSON-lines records of `<run>/<name>` (metrics or events); [] before the run wrote any."""
    run = Location.of(run).refreshed()
    if not run.exists(name):
        return []
    return parse_records(run.read_bytes(name).decode(errors="replace"), join(run.uri, name))


def jsonl(records: list[dict]) -> bytes:
    """Records as the bytes of a JSON-lines file."""
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class RunLog:
    def __init__(self, run: Location, resume_step: int, tensorboard: bool = True) -> None:
        self.fs, self.root, self.uri = run.fs, run.root, run.uri
        self.remote = run.remote
        self.local = Path(tempfile.mkdtemp(prefix="run-")) if self.remote else Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)
        # Both files rewritten whole (a temporary file renamed over the old one), also on local storage: a kill
        # mid-rewrite leaves the old file, and a line a killed run cut short is gone before the next append.
        local = LocalFileSystem()
        kept = [r for r in read_records(run, METRICS) if r["step"] <= resume_step]
        self.full: str | None = None  # a write found no room: the message; the run stops at the next step boundary
        write_bytes(local, str(self.local / METRICS), jsonl(kept))  # a full disk here raises DiskFull
        write_bytes(local, str(self.local / EVENTS), jsonl(read_records(run, EVENTS)))
        # unbuffered: each record is one write call of a whole line
        self.metrics = (self.local / METRICS).open("ab", buffering=0)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.local / "tensorboard"), purge_step=resume_step + 1)

    def path(self, relative: str) -> Path:
        """A local path for a file that belongs at `<run>/<relative>` (uploaded by `sync`)."""
        out = self.local / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    @contextmanager
    def room(self, name: str) -> Iterator[None]:
        """A write of `name` that finds the disk full is dropped and remembered in `full` (the run stops cleanly at
        the next step boundary, every rank agreeing) instead of failing this rank alone."""
        try:
            yield
        except OSError as error:
            if not is_disk_full(error):
                raise
            if self.full is None:
                path = join(self.uri, name)
                full = DiskFull.of(error, path, None)
                self.full = disk_full_message(full.path, full.needed, full.free, "free space there, then run the "
                                              "same command: it resumes from the last checkpoint", full.reason)

    def log(self, record: dict) -> None:
        with self.room(METRICS):
            self.metrics.write((json.dumps(record) + "\n").encode())
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def event(self, kind: str, **fields) -> None:
        """One line in `events.jsonl`, the run's history (starts, resumptions, the end); never truncated."""
        record = {"event": kind, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields}
        with self.room(EVENTS), (self.local / EVENTS).open("ab", buffering=0) as events:
            events.write((json.dumps(record) + "\n").encode())  # one write call of a whole line
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
