"""`python -m pipelines.make_shapes out=<path or s3://uri> n=<count> seed=<seed>`: write the shapes dataset.

Three layouts of the same samples under `out`, any subset by `formats`:
- `folder/<key>.png|.txt|.synthetic.txt|.json`: image, caption and synthetic caption (UTF-8), ground-truth objects;
- `webdataset/shard-00000.tar`, ...: the same four members per key, `shard_size` keys per shard;
- `parquet/part-00000.parquet`, ...: `shard_size` rows each, columns `PARQUET_SCHEMA` (the synthetic caption as
  `caption_synthetic`), the image as the Hugging Face datasets Image struct {bytes, path}.
Preprocessing reads the synthetic captions with `models.synthetic_captions=input` (`pipelines.sources`).
`shapes.json`, written last, records what was written. Reruns with the same config write identical bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# the image-and-caption layouts preprocessing reads, and where it finds a synthetic caption in them
from conf.choices import IMAGE_FORMATS
from conf.shapes import Style
from pipelines.runtime import cli, logger
from pipelines.sources import PARQUET_SYNTHETIC_COLUMN, SYNTHETIC_SUFFIX
from pipelines.storage import filesystem, is_remote, join, require_bucket
from pipelines.synthetic.shapes import MIN_SIZE, Sample, make_sample

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("caption", pa.string()),
        (PARQUET_SYNTHETIC_COLUMN, pa.string()),
        ("objects", pa.string()),  # JSON list of {shape, color, bbox, center}
    ],
    # lets `datasets` decode the struct column as an Image feature
    metadata={"huggingface": json.dumps({"info": {"features": {
        "key": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "caption": {"dtype": "string", "_type": "Value"},
        PARQUET_SYNTHETIC_COLUMN: {"dtype": "string", "_type": "Value"},
        "objects": {"dtype": "string", "_type": "Value"},
    }}})},
)


@dataclass
class MakeShapesConf:
    """Where to write how many samples of which seed, and in which layouts."""

    out: str = MISSING
    n: int = 1000
    seed: int = 0
    size: int = 256
    shard_size: int = 100
    formats: list[str] = field(default_factory=lambda: list(IMAGE_FORMATS))
    endpoint_url: str | None = None  # an S3-compatible store; else AWS_ENDPOINT_URL(_S3) or AWS itself
    # how the shapes are drawn (`shapes.Style`: the defaults are the dataset's own); the captions stay GenEval prompts
    min_side: float = Style.min_side
    max_side: float = Style.max_side
    max_objects: int = Style.max_objects
    background_low: int = Style.background_low

    def style(self) -> Style:
        return Style(self.min_side, self.max_side, self.max_objects, self.background_low)


@dataclass
class Encoded:
    """A sample's four files as bytes, shared by every layout."""

    key: str
    png: bytes
    caption: bytes  # UTF-8
    synthetic: bytes  # UTF-8
    objects: bytes  # JSON

    def files(self) -> tuple[tuple[str, bytes], ...]:
        """(extension, content) of the sample's files, in the WebDataset member order."""
        return (("png", self.png), ("txt", self.caption), (SYNTHETIC_SUFFIX.removeprefix("."), self.synthetic),
                ("json", self.objects))


def check(cfg: MakeShapesConf) -> None:
    """Fail on an invalid config before any work or output."""
    if not cfg.out or cfg.out == MISSING:
        raise ValueError("out must be a local path or a URI such as s3://bucket/prefix")
    for name, low in (("n", 1), ("size", MIN_SIZE), ("shard_size", 1), ("seed", 0)):
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(cfg, name)}")
    cfg.style()  # names a bad field
    unknown = [f for f in cfg.formats if f not in IMAGE_FORMATS]
    if unknown or not cfg.formats or len(set(cfg.formats)) != len(cfg.formats):
        raise ValueError(f"formats must be a non-empty list of distinct names from {list(IMAGE_FORMATS)}, "
                         f"got {list(cfg.formats)}")


def encode(sample: Sample) -> Encoded:
    """PNG, captions and objects of a sample, encoded once for all layouts."""
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG", compress_level=6)  # Pillow writes no time chunk: same pixels, same bytes
    objects = json.dumps(sample.objects, sort_keys=True).encode()
    return Encoded(sample.key, buffer.getvalue(), sample.caption.encode("utf-8"),
                   sample.synthetic_caption.encode("utf-8"), objects)


def tar_bytes(samples: list[Encoded]) -> bytes:
    """A WebDataset shard: `<key>.png`, `<key>.txt`, `<key>.synthetic.txt`, `<key>.json` for each key, in order, with
    fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s.files():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_table(samples: list[Encoded]) -> pa.Table:
    """One Parquet part: a row per sample, the image as the Hugging Face {bytes, path} struct."""
    return pa.table({
        "key": [s.key for s in samples],
        "image": [{"bytes": s.png, "path": f"{s.key}.png"} for s in samples],
        "caption": [s.caption.decode("utf-8") for s in samples],
        PARQUET_SYNTHETIC_COLUMN: [s.synthetic.decode("utf-8") for s in samples],
        "objects": [s.objects.decode("utf-8") for s in samples],
    }, schema=PARQUET_SCHEMA)


def run(cfg: MakeShapesConf) -> dict[str, int]:
    """Write the dataset; returns the samples written per format."""
    check(cfg)
    fs, root = filesystem(cfg.out, cfg.endpoint_url)
    require_bucket(cfg.out, "out", cfg.endpoint_url)  # before generating anything
    if not is_remote(cfg.out):
        for name in cfg.formats:
            fs.makedirs(join(root, name), exist_ok=True)
    counts = dict.fromkeys(cfg.formats, 0)
    shards = 0
    for shard, start in enumerate(range(0, cfg.n, cfg.shard_size)):
        batch = [encode(make_sample(cfg.seed, i, cfg.size, cfg.style()))
                 for i in range(start, min(start + cfg.shard_size, cfg.n))]
        if "folder" in cfg.formats:
            fs.pipe({join(root, "folder", f"{s.key}.{ext}"): data for s in batch for ext, data in s.files()})
        if "webdataset" in cfg.formats:
            fs.pipe_file(join(root, "webdataset", f"shard-{shard:05d}.tar"), tar_bytes(batch))
        if "parquet" in cfg.formats:
            with fs.open(join(root, "parquet", f"part-{shard:05d}.parquet"), "wb") as f:
                pq.write_table(parquet_table(batch), f)
        for name in counts:
            counts[name] += len(batch)
        shards += 1
    manifest = {key: value for key, value in asdict(cfg).items() if key not in ("out", "endpoint_url")}
    manifest |= {"counts": counts, "shards": {name: shards for name in cfg.formats if name != "folder"}}
    fs.pipe_file(join(root, "shapes.json"), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return counts


ConfigStore.instance().store(name="make_shapes", node=MakeShapesConf)


def run_and_report(cfg: MakeShapesConf) -> None:
    counts = run(cfg)
    logger("make_shapes").info(f"wrote {counts} to {cfg.out}")


def main() -> None:
    cli("make_shapes", run_and_report, doc=__doc__)


if __name__ == "__main__":
    main()
