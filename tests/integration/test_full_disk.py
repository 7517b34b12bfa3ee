"""A full disk on a real filesystem: the run folder or the preprocessing output on a small tmpfs, mounted and removed
by the test. The job stops once, on one `error:` line naming the path, the bytes needed and the bytes free, spends no
retry and keeps what was complete; after the filesystem grows, the same command finishes the job."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_preemption import STEPS, losses, markers, preprocess_overrides, uninterrupted_run
from test_train_faults import tiny_overrides

from pipelines import schema
from pipelines.preprocess import run as preprocess
from pipelines.runtime import JobStopped, cli, is_user_error, one_line
from workloads.train import checkpointing
from workloads.train.driver import run
from workloads.train.faults import STOPPED
from workloads.train.runlog import EVENTS, read_records

pytestmark = pytest.mark.faults  # `make test-faults`

NEEDS_AND_FREE = re.compile(r" needs [\d,]+ bytes \([\d.]+ MiB\), [\d,]+ bytes \([\d.]+ MiB\) free; ")


class SmallDisk:
    """A tmpfs of a given size at `path`; `grow` remounts it larger, as freeing space would."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> None:
        self.path.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "small")
    try:
        yield disk
    finally:
        disk.unmount()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[str]:
    """Temporary or staging files a write left behind."""
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".new", ".old"))]


def test_a_full_run_folder_stops_at_the_checkpoint_once_and_the_same_command_resumes(
        train_dataset, small_disk, tmp_path_factory, capsys):
    """Bound: the run stops within the first checkpoint that does not fit (step 4 of a 32 MiB disk holding one 22 MiB
    checkpoint), with no retry although trainer.max_failures=3, one `error:` line, checkpoint 2 intact and no part
    of checkpoint 4; after the disk grows the same command resumes at step 2 and reaches the uninterrupted losses."""
    expected = uninterrupted_run(train_dataset, tmp_path_factory)
    small_disk.mount("32m")
    command = [*tiny_overrides(train_dataset, str(small_disk.path), "full", workers=2, steps=STEPS),
               "checkpoint.every=2", "trainer.max_failures=3"]
    folder = small_disk.path / "full"
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        cli("train", run, argv=command)
    seconds = time.monotonic() - started
    assert stopped.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: disk full (No space left on device): writing {folder / checkpointing.dir_name(4)} "
                           "needs "), line
    assert NEEDS_AND_FREE.search(line) and f"resumes from {folder / checkpointing.dir_name(2)}" in line
    latest = checkpointing.find_latest(str(folder))
    assert latest is not None and latest.uri.endswith(checkpointing.dir_name(2))
    assert not (folder / checkpointing.dir_name(4)).exists() and leftovers(folder) == []
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events] == ["started", STOPPED]  # no 'failed': no retry was spent
    print(f"{line}\n(stopped {seconds:.0f} s after the start, at the checkpoint of step 4)")

    small_disk.grow("160m")
    cli("train", run, argv=command)
    events = read_records(str(folder), EVENTS)
    assert [e["event"] for e in events][2:] == ["resumed", "finished"] and events[2]["step"] == 2
    assert losses(folder) == losses(expected)


def test_a_full_preprocessing_output_keeps_the_finished_shards_and_the_rerun_completes(train_dataset, small_disk,
                                                                                      capsys):
    """Bound: one `error:` line naming a data file, its bytes and the bytes free; every shard marked done before
    stays, no file is left half-written, and the same command after the disk grows redoes none of them. Ray Data
    writes the shards' files in no fixed order, so the disk may fill before any shard is whole (then none is kept)."""
    small_disk.mount("400k")
    output = small_disk.path / "data"
    command = preprocess_overrides(train_dataset, output)
    with pytest.raises(SystemExit) as stopped:
        cli("preprocess", preprocess, argv=command)
    assert stopped.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: disk full (No space left on device): writing {output}/"), line
    assert NEEDS_AND_FREE.search(line), line
    kept = markers(output)
    assert len(kept) < 8 and leftovers(output) == []
    print(f"{line} ({len(kept)} of 8 shards finished before it)")

    small_disk.grow("16m")
    cli("preprocess", preprocess, argv=command)
    assert f"8 folder shards: {len(kept)} done, {8 - len(kept)} to do" in capsys.readouterr().out
    assert {name: t for name, t in markers(output).items() if name in kept} == kept  # nothing finished was redone
    manifest = json.loads((output / schema.MANIFEST).read_text())
    assert manifest["counts"] == {"read": 64, "written": 64, "rejected": 0}


@pytest.mark.usefixtures("ray_local")
def test_a_full_dedup_output_keeps_the_finished_shards_and_the_rerun_completes(planted, small_disk):
    """Bound: one `error:` line naming a file under the output, its bytes and the bytes free; every embedding shard
    marked done before stays untouched, nothing is left half-written, and the same command after the disk grows
    embeds only the images of the other shards and writes the manifest."""
    from test_dedup_job import dedup_conf

    from pipelines.dedup.job import run as dedup

    folder, _ = planted
    small_disk.mount("120k")
    output = small_disk.path / "dedup"
    cfg = dedup_conf(folder, str(output))
    with pytest.raises(JobStopped) as stopped:
        dedup(cfg)
    assert is_user_error(stopped.value)  # `python -m pipelines.dedup` prints it as this one line and exits 2
    line = f"error: {one_line(stopped.value)}"
    assert line.startswith(f"error: disk full (No space left on device): writing {output}/"), line
    assert NEEDS_AND_FREE.search(line) and line.endswith("(the finished shards and groups are kept)"), line
    done = output / "embeddings"
    kept = markers(done)
    assert leftovers(output) == [] and not (output / schema.MANIFEST).exists()
    read = sum(json.loads((done / schema.MARKERS_DIR / name).read_text())["rows_read"] for name in kept)
    print(f"{line} ({len(kept)} embedding shards, {read} images, finished before it)")

    small_disk.grow("16m")
    again = dedup(cfg)
    assert again["counts"]["images"] == read + again["last_run"]["embed_images"]  # none embedded twice
    assert {name: t for name, t in markers(done).items() if name in kept} == kept
    assert (output / schema.MANIFEST).exists()
