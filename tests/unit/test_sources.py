"""Input datasets read as preprocessing's rows: each layout's captions and its own synthetic captions
(`models.synthetic_captions=input`), and the reject of a row that has none."""

from pathlib import Path

import pytest
from PIL import Image

from conf.choices import IMAGE_FORMATS
from pipelines.decode import DecodeLimits
from pipelines.make_shapes import MakeShapesConf
from pipelines.make_shapes import run as make_shapes
from pipelines.sources import list_shards, read_shard
from pipelines.stages import decode_batch, object_column, read_rows
from pipelines.synthetic.shapes import make_sample

N, SEED, SIZE = 3, 2, 32
LIMITS = DecodeLimits(buckets=((32, 32),))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(MakeShapesConf(out=str(out), n=N, seed=SEED, size=SIZE, shard_size=N))
    return out


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_layout_carries_each_samples_synthetic_caption(shapes: Path, fmt: str):
    (shard,) = list_shards(str(shapes / fmt))  # a folder's `.synthetic.txt` files are neither images nor a format
    assert shard.format == fmt and len(shard.paths) == (N if fmt == "folder" else 1)
    expected = [make_sample(SEED, i, SIZE) for i in range(N)]
    records = read_shard(shard, synthetic=True)
    assert [r.id for r in records] == [s.key for s in expected]
    assert [r.caption for r in records] == [s.caption.encode() for s in expected]
    assert [r.synthetic for r in records] == [s.synthetic_caption.encode() for s in expected]
    if fmt == "folder":  # a read per sample, only when asked for
        assert [r.synthetic for r in read_shard(shard)] == [None] * N


def decoded(folder: Path, synthetic: bool) -> dict:
    (shard,) = list_shards(str(folder))
    rows = read_rows(shard.item(), None, synthetic=synthetic)
    return decode_batch({k: object_column([r[k] for r in rows]) for k in rows[0]}, LIMITS, synthetic=synthetic)


def test_a_row_without_a_synthetic_caption_in_the_input_is_a_named_reject(tmp_path: Path):
    for key in ("has", "lacks", "blank"):
        Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(tmp_path / f"{key}.png")
        (tmp_path / f"{key}.txt").write_text("a photo of a square")
    (tmp_path / "has.synthetic.txt").write_text("  a photo of\n a red   square ")
    (tmp_path / "blank.synthetic.txt").write_text(" \n")
    batch = decoded(tmp_path, synthetic=True)
    assert list(batch["id"]) == ["blank", "has", "lacks"]
    assert list(batch["stage"]) == ["decode", "", "decode"]
    assert "models.synthetic_captions=input" in batch["reason"][0] and batch["reason"][0] == batch["reason"][2]
    assert batch["caption_synthetic"][1] == "a photo of a red square"  # normalised as the caption is
    assert batch["caption"][1] == "a photo of a square"
    plain = decoded(tmp_path, synthetic=False)  # the captioner's job: nothing read, nothing rejected
    assert list(plain["stage"]) == ["", "", ""] and "caption_synthetic" not in plain
