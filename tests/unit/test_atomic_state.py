"""State files a later start reads survive a cut: whole-file writes (`storage.write_bytes`), a folder replaced whole
(`storage.write_folder`, the export) and the run log's JSON lines read back after a killed run."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.storage import Location
from workloads.train.runlog import EVENTS, METRICS, RunLog, read_records

OLD, NEW = b'{"old": true}\n', b'{"new": "' + b"x" * 1000 + b'"}\n'


def cut_writes_of(monkeypatch, size: int) -> None:
    """A full disk mid-write: the write of `size` bytes puts half of them down, then fails."""
    real = os.write

    def cut(fd: int, data) -> int:
        if len(data) == size:
            real(fd, bytes(data[: size // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", cut)


def test_write_bytes_replaces_the_file_and_leaves_no_temporary(tmp_path):
    where = Location.of(str(tmp_path))
    where.write_bytes("sub/state.json", OLD)
    where.write_bytes("sub/state.json", NEW)
    assert (tmp_path / "sub" / "state.json").read_bytes() == NEW
    assert os.listdir(tmp_path / "sub") == ["state.json"]
    assert (tmp_path / "sub" / "state.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_write_bytes_cut_midway_keeps_the_old_content(tmp_path, monkeypatch):
    where = Location.of(str(tmp_path))
    where.write_bytes("state.json", OLD)
    cut_writes_of(monkeypatch, len(NEW))
    with pytest.raises(OSError, match="No space"):
        where.write_bytes("state.json", NEW)
    assert (tmp_path / "state.json").read_bytes() == OLD
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_folder_swaps_a_whole_folder_and_recovers_from_a_kill_between_the_renames(tmp_path):
    def folder(name: str, files: dict[str, str]) -> str:
        for relative, text in files.items():
            (tmp_path / name / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / relative).write_text(text)
        return str(tmp_path / name)

    def contents(path: Path) -> dict[str, str]:
        return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}

    run = Location.of(str(tmp_path / "run"))
    run.write_folder("export", folder("first", {"config.json": "1", "lora/a.bin": "a"}))
    run.write_folder("export", folder("second", {"config.json": "2"}))
    assert contents(tmp_path / "run" / "export") == {"config.json": "2"}  # nothing of the first one left
    assert sorted(os.listdir(tmp_path / "run")) == ["export"]
    # killed after the old export went aside, before the new one took its place: the old one is whole aside
    os.rename(tmp_path / "run" / "export", tmp_path / "run" / "export.old")
    folder("run/export.new", {"config.json": "half"})
    run.write_folder("export", folder("third", {"config.json": "3"}))
    assert contents(tmp_path / "run" / "export") == {"config.json": "3"}
    assert sorted(os.listdir(tmp_path / "run")) == ["export"]


def test_write_folder_cut_midway_keeps_the_old_folder(tmp_path, monkeypatch):
    run = Location.of(str(tmp_path / "run"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("old")
    run.write_folder("export", str(tmp_path / "old"))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text("new")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copytree", full_disk)
    with pytest.raises(OSError, match="No space"):
        run.write_folder("export", str(tmp_path / "new"))
    assert (tmp_path / "run" / "export" / "config.json").read_text() == "old"


def write_log(folder: Path, name: str, records: list[dict], tail: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


STEPS = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]


def test_resume_drops_a_cut_last_line_with_a_warning_and_keeps_the_rest(tmp_path, capsys):
    write_log(tmp_path, METRICS, STEPS, tail='{"step": 7, "lo')
    write_log(tmp_path, EVENTS, [{"event": "started", "step": 0}], tail='{"event": "fin')
    log = RunLog(Location.of(str(tmp_path)), resume_step=4, tensorboard=False)
    out = capsys.readouterr().out
    assert f"{tmp_path / METRICS}: line 7 dropped (its last line, cut short" in out
    assert f"{tmp_path / EVENTS}: line 2 dropped (its last line, cut short" in out
    log.log({"step": 5, "loss": 0.5})
    log.event("resumed", step=4)
    log.close()
    assert read_records(str(tmp_path)) == [*STEPS[:4], {"step": 5, "loss": 0.5}]
    assert [e["event"] for e in read_records(str(tmp_path), EVENTS)] == ["started", "resumed"]
    assert "dropped" not in capsys.readouterr().out  # the cut lines are gone from the files
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVENTS, METRICS]


def test_an_unreadable_middle_line_is_skipped_naming_file_and_line(tmp_path, capsys):
    (tmp_path / METRICS).write_text(json.dumps(STEPS[0]) + "\n\x00\x00garbage\n" + json.dumps(STEPS[1]) + "\n")
    assert read_records(str(tmp_path)) == STEPS[:2]
    assert f"{tmp_path / METRICS}: line 2 dropped (an unreadable line)" in capsys.readouterr().out


def test_the_resume_rewrite_cut_midway_leaves_the_history_whole(tmp_path, monkeypatch):
    write_log(tmp_path, METRICS, STEPS)
    before = (tmp_path / METRICS).read_bytes()
    kept = "".join(json.dumps(r) + "\n" for r in STEPS[:3]).encode()
    cut_writes_of(monkeypatch, len(kept))
    with pytest.raises(OSError, match="No space"):
        RunLog(Location.of(str(tmp_path)), resume_step=3, tensorboard=False)
    assert (tmp_path / METRICS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
