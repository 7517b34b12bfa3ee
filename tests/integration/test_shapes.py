"""The shapes dataset: deterministic samples whose captions are true, and the job that writes them in three layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import geneval
from pipelines.make_shapes import PARQUET_SCHEMA, MakeShapesConf, run
from pipelines.storage import filesystem
from pipelines.synthetic.shapes import COLORS, generate, make_sample

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
N, SHARD = 7, 3  # three shards, the last one short

def read_tree(uri: str) -> dict[str, bytes]:
    """Every file under `uri`, by path relative to it."""
    fs, root = filesystem(uri)
    fs.invalidate_cache()  # s3fs caches listings per instance, and instances are shared
    paths = fs.find(root)
    return {p[len(root) + 1:]: data for p, data in fs.cat(paths).items()}


def parquet_rows(tree: dict[str, bytes]) -> list[dict]:
    parts = sorted(p for p in tree if p.endswith(".parquet"))
    # a BufferReader, not io.BytesIO: pyarrow can abort at exit after reading Python file objects (apache/arrow#34314)
    return [row for p in parts for row in pq.read_table(pa.BufferReader(tree[p])).to_pylist()]


def assert_same_dataset(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b)
    for path in a:
        if not path.endswith(".parquet"):  # Parquet is compared by content: its bytes are not part of the contract
            assert a[path] == b[path], path
    assert parquet_rows(a) == parquet_rows(b)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("shapes") / "data"
    return out, run(MakeShapesConf(out=str(out), n=N, seed=5, size=SIZE, shard_size=SHARD))


def test_generation_is_deterministic_per_seed_and_index():
    first, again, other = (list(generate(6, seed, size=SIZE)) for seed in (3, 3, 4))
    assert [s.key for s in first] == [f"0003-{i:06d}" for i in range(6)]
    for a, b in zip(first, again, strict=True):
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.objects == b.objects
        assert a.synthetic_caption == b.synthetic_caption
    assert [s.caption for s in first] != [s.caption for s in other]
    assert all(a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other, strict=True))
    alone = make_sample(3, 5, size=SIZE)  # sample 5 does not depend on the samples before it
    assert alone.image.tobytes() == first[5].image.tobytes() and alone.caption == first[5].caption


def test_every_task_and_object_count_occurs():
    """(That each caption is true of its objects, by GenEval's own rules, is tests/unit/test_geneval.py's.)"""
    samples = list(generate(300, seed=11, size=SIZE))
    assert {s.metadata["tag"] for s in samples} == set(geneval.TAGS)
    assert {len(s.objects) for s in samples} == {1, 2, 3, 4}


@pytest.mark.parametrize("size", [32, 64, 256])
def test_objects_are_inside_the_canvas_apart_and_drawn_where_labelled(size: int):
    for sample in generate(40, seed=2, size=size):
        assert sample.image.size == (size, size) and sample.image.mode == "RGB"
        pixels = np.asarray(sample.image)
        boxes = [o["bbox"] for o in sample.objects]
        for obj, (x0, y0, x1, y1) in zip(sample.objects, boxes, strict=True):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert obj["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            cx, cy = (int(v) for v in obj["center"])
            assert tuple(pixels[cy, cx]) == COLORS[obj["color"]], (sample.key, obj)
        for color in {o["color"] for o in sample.objects}:  # a colour is painted only inside its objects' boxes
            outside = np.ones((size, size), dtype=bool)
            for x0, y0, x1, y1 in (o["bbox"] for o in sample.objects if o["color"] == color):
                outside[y0:y1, x0:x1] = False
            assert not (pixels[outside] == COLORS[color]).all(axis=1).any(), (sample.key, color)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (sample.key, a, b)


def test_job_writes_three_readable_layouts(local_run: tuple[Path, dict[str, int]]):
    out, counts = local_run
    assert counts == {"folder": N, "webdataset": N, "parquet": N}
    expected = [make_sample(5, i, SIZE) for i in range(N)]
    keys = [s.key for s in expected]

    folder = out / "folder"
    extensions = ("png", "txt", "synthetic.txt", "json")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{k}.{e}" for k in keys for e in extensions)
    for s in expected:
        with Image.open(folder / f"{s.key}.png") as image:
            assert image.format == "PNG" and image.convert("RGB").tobytes() == s.image.tobytes()
        assert (folder / f"{s.key}.txt").read_text(encoding="utf-8") == s.caption
        assert (folder / f"{s.key}.synthetic.txt").read_text(encoding="utf-8") == s.synthetic_caption
        assert json.loads((folder / f"{s.key}.json").read_text()) == s.objects

    shards = sorted((out / "webdataset").iterdir())
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    members = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                assert info.isfile() and info.mtime == 0 and info.uid == info.gid == 0
                members.append((info.name.split(".", 1)[0], info.name.split(".", 1)[1], tar.extractfile(info).read()))
    assert [m[0] for m in members] == [k for k in keys for _ in extensions]  # a key's files are adjacent
    assert [m[1] for m in members] == list(extensions) * N
    assert [m[2] for m in members if m[1] == "txt"] == [s.caption.encode() for s in expected]
    assert [m[2] for m in members if m[1] == "synthetic.txt"] == [s.synthetic_caption.encode() for s in expected]

    parts = sorted((out / "parquet").iterdir())
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in parts] == [3, 3, 1]
    table = pq.read_table(out / "parquet")
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert table.schema.remove_metadata() == PARQUET_SCHEMA.remove_metadata()
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == table.column_names  # `datasets` knows every column
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys and [r["caption"] for r in rows] == [s.caption for s in expected]
    assert [r["caption_synthetic"] for r in rows] == [s.synthetic_caption for s in expected]
    for row, s in zip(rows, expected, strict=True):
        assert row["image"]["path"] == f"{s.key}.png"
        assert row["image"]["bytes"] == (folder / f"{s.key}.png").read_bytes()
        assert json.loads(row["objects"]) == s.objects

    manifest = json.loads((out / "shapes.json").read_text())
    assert manifest["n"] == N and manifest["seed"] == 5 and manifest["size"] == SIZE
    assert manifest["counts"] == counts and manifest["shards"] == {"webdataset": 3, "parquet": 3}


def test_rerun_writes_identical_files(local_run: tuple[Path, dict[str, int]], tmp_path: Path):
    out, _ = local_run
    run(MakeShapesConf(out=str(tmp_path / "again"), n=N, seed=5, size=SIZE, shard_size=SHARD))
    assert_same_dataset(read_tree(str(out)), read_tree(str(tmp_path / "again")))


def test_job_to_s3_writes_what_it_writes_locally(local_run: tuple[Path, dict[str, int]], s3):
    out, counts = local_run
    uri = s3.uri("shapes/run")
    assert run(MakeShapesConf(out=uri, n=N, seed=5, size=SIZE, shard_size=SHARD)) == counts
    remote = read_tree(uri)
    assert_same_dataset(remote, read_tree(str(out)))
    fs, root = filesystem(uri)
    # pyarrow reads the bucket directly; no threads, for the same shutdown race (apache/arrow#39162)
    assert pq.read_table(f"{root}/parquet", filesystem=fs, use_threads=False).num_rows == N


@pytest.mark.parametrize("override, field", [
    ({"n": 0}, "n"), ({"size": 16}, "size"), ({"shard_size": 0}, "shard_size"), ({"seed": -1}, "seed"),
    ({"formats": ["folder", "zip"]}, "formats"), ({"formats": []}, "formats"), ({"out": ""}, "out"),
])
def test_invalid_config_fails_before_writing(override: dict, field: str, tmp_path: Path):
    cfg = MakeShapesConf(out=str(tmp_path / "data"), n=2, size=SIZE)
    for name, value in override.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []
    if field == "formats":
        with pytest.raises(ValueError, match=r"folder.*webdataset.*parquet"):  # names the allowed values
            run(cfg)


def test_missing_bucket_fails_before_writing(s3):
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        run(MakeShapesConf(out="s3://no-such-bucket/shapes", n=2, size=SIZE))
    fs, _ = filesystem(s3.uri("x"))
    assert not fs.exists("no-such-bucket")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_hydra_command_line(remote: bool, tmp_path: Path, request: pytest.FixtureRequest):
    # the s3 case reaches the server through the environment alone, as a worker process would
    out = request.getfixturevalue("s3").uri("shapes/cli") if remote else str(tmp_path / "data")
    command = [sys.executable, "-m", "pipelines.make_shapes", f"out={out}", "n=3", "seed=1", f"size={SIZE}",
               "formats=[folder,parquet]"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tree = read_tree(out)
    extensions = ("png", "txt", "synthetic.txt", "json")
    assert sorted(tree) == sorted([*(f"folder/0001-{i:06d}.{e}" for i in range(3) for e in extensions),
                                   "parquet/part-00000.parquet", "shapes.json"])
    assert json.loads(tree["shapes.json"])["formats"] == ["folder", "parquet"]


def test_hydra_command_line_rejects_a_bad_format(tmp_path: Path):
    command = [sys.executable, "-m", "pipelines.make_shapes", f"out={tmp_path / 'data'}", "n=3",
               "formats=[zip]"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "formats must be" in done.stderr
    assert not (tmp_path / "data").exists()
