"""A full disk, without Ray: the one-line message, what counts as one, and that the atomic writes leave nothing
behind when the disk fills under them."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipelines import storage
from pipelines.storage import DiskFull, disk_full_message, is_disk_full


def test_the_message_names_path_bytes_needed_and_free_on_one_line():
    message = disk_full_message("/runs/a/checkpoint_step=00000004", 5 * 2**20, 1024, "free space, then rerun")
    assert message == ("disk full (No space left on device): writing /runs/a/checkpoint_step=00000004 needs "
                       "5,242,880 bytes (5.0 MiB), 1,024 bytes (0.0 MiB) free; free space, then rerun")
    assert "\n" not in message
    assert "an unknown number of bytes" in disk_full_message("s3://b/x", None, None)


def test_disk_full_is_recognised_through_wrappers_and_quota():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full(OSError("[Errno 28] No space left on device"))  # pyarrow's, without an errno
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(None)


def test_disk_full_survives_pickling_with_its_fields():
    error = pickle.loads(pickle.dumps(DiskFull("/x", 10, 2, "then", "Disk quota exceeded")))
    assert (error.path, error.needed, error.free, error.errno) == ("/x", 10, 2, errno.ENOSPC)
    assert str(error) == disk_full_message("/x", 10, 2, "then", "Disk quota exceeded")
    assert str(DiskFull.of(OSError(errno.EDQUOT, "Disk quota exceeded"), "/x", 1)).startswith(
        "disk full (Disk quota exceeded): writing /x")


def fill_after(monkeypatch, allowed: int) -> None:
    """os.write refuses once `allowed` bytes went through (a disk that fills)."""
    real, written = os.write, [0]

    def write(fd, data):
        if written[0] + len(data) > allowed:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_write_bytes_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "events.jsonl"
    target.write_bytes(b"old\n")
    fill_after(monkeypatch, 3)
    with pytest.raises(DiskFull) as full:
        storage.write_bytes(LocalFileSystem(), str(target), b"new content\n")
    assert full.value.needed == 12 and full.value.path == str(target) and full.value.free is not None
    assert target.read_bytes() == b"old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]


def test_write_folder_on_a_full_disk_keeps_the_old_folder_and_no_staging(tmp_path, monkeypatch):
    import shutil

    new = tmp_path / "local"
    new.mkdir()
    (new / "weights.bin").write_bytes(b"x" * 100)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.bin").write_bytes(b"old")

    def full_copy(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_copy)  # what copytree's copy2 calls
    with pytest.raises(DiskFull) as full:
        storage.write_folder(LocalFileSystem(), str(new), str(tmp_path / "export"))
    assert full.value.needed == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "local"]
    assert (tmp_path / "export" / "old.bin").read_bytes() == b"old"


def test_the_disk_full_behind_a_ray_task_error_is_found():
    class TaskError(RuntimeError):  # Ray's RayTaskError keeps the task's own exception as `cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__("long traceback text")
            self.cause = cause

    full = DiskFull("/out/data/x.parquet", 100, 0)
    assert storage.find_disk_full(TaskError(full)) is full
    assert storage.find_disk_full(full) is full
    assert storage.find_disk_full(TaskError(ValueError("x"))) is None
