"""Input datasets: an image folder with same-named .txt captions, WebDataset tar shards, Parquet files with
image bytes and a caption column, or preference pairs (`pairs`: Parquet in Pick-a-Pic v2's layout, `caption`,
`jpg_0`, `jpg_1`, `label_0`). Inputs are cut into shards, the unit of parallelism and of resumption.

A sample may bring its own synthetic caption (read for `models.synthetic_captions=input`): `<key>.synthetic.txt`
beside `<key>.txt` in a folder, the member `<key>.synthetic.txt` in a tar, the column `caption_synthetic` in Parquet.
So in a folder `<key>.synthetic.txt` belongs to `<key>`'s image, never to an image named `<key>.synthetic`."""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from conf.choices import FORMATS
from pipelines.storage import filesystem, is_remote

PAIRS_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")  # Pick-a-Pic v2: label_0 is 1, 0 or 0.5 (a tie)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "img", "image_bytes", "webp")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt", "txt")
PARQUET_ID_COLUMNS = ("key", "id", "__key__")
SYNTHETIC_SUFFIX, PARQUET_SYNTHETIC_COLUMN = ".synthetic.txt", "caption_synthetic"


class InputError(ValueError):
    """The input cannot be used: missing, empty, unreachable or of an unknown layout."""


@dataclass(frozen=True)
class Shard:
    index: int
    format: str
    paths: tuple[str, ...]  # one tar or Parquet file, or a run of image files
    root: str  # the input root, to name folder samples by their relative path

    def item(self, **extra: str) -> dict:
        """The shard as a Ray Data row (plain fields; `stages.read_rows` reads it back)."""
        return {"index": self.index, "format": self.format, "paths": list(self.paths), "root": self.root, **extra}


@dataclass
class Record:
    """One input sample before decoding. `image`, `caption` or `synthetic` is None when the input lacks it."""

    id: str
    source: str
    image: bytes | None  # a pair's winner
    caption: bytes | None
    loser: bytes | None = None  # a pair's loser
    tie: bool = False  # a pair without a preference (rejected at decode)
    synthetic: bytes | None = None  # the input's own synthetic caption (a folder's only when asked for)


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _list_files(fs, root: str) -> list[str]:
    try:
        if not fs.exists(root):
            raise InputError(f"input {root!r} does not exist")
        return sorted(fs.find(root))
    except InputError:
        raise
    except Exception as err:  # network, credentials, bucket missing: say so before any cluster work
        raise InputError(f"cannot list input {root!r}: {type(err).__name__}: {err}") from err


def detect_format(files: list[str]) -> str:
    """The format that the files' extensions indicate."""
    names = [f.lower() for f in files]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(n.endswith(IMAGE_EXTENSIONS) for n in names):
        return "folder"
    raise InputError(f"cannot detect the input format from {len(files)} files; set input_format= to one of {FORMATS}")


def list_shards(uri: str, input_format: str = "auto", endpoint_url: str | None = None,
                folder_shard_size: int = 256) -> list[Shard]:
    """Deterministic shards of the input (sorted names); raises InputError if missing, empty or unreadable."""
    if input_format != "auto" and input_format not in FORMATS:
        raise InputError(f"input_format must be auto or one of {FORMATS}, got {input_format!r}")
    fs, root = filesystem(uri, endpoint_url)
    files = _list_files(fs, root)
    if not files:
        raise InputError(f"input {uri!r} is empty")
    fmt = detect_format(files) if input_format == "auto" else input_format
    protocol = "s3://" if is_remote(uri) else ""
    if fmt == "folder":
        images = [protocol + f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        chunks = [tuple(images[i:i + folder_shard_size]) for i in range(0, len(images), folder_shard_size)]
    else:
        suffix = ".tar" if fmt == "webdataset" else ".parquet"  # parquet and pairs
        chunks = [(protocol + f,) for f in files if f.lower().endswith(suffix)]
    if not chunks:
        raise InputError(f"input {uri!r} holds no {fmt} files")
    return [Shard(i, fmt, paths, protocol + root) for i, paths in enumerate(chunks)]


def read_shard(shard: Shard, endpoint_url: str | None = None, synthetic: bool = False) -> list[Record]:
    """All records of a shard, in a deterministic order. With `synthetic`, a folder's records carry their synthetic
    captions too (a read per sample, so only when asked; a tar or Parquet file holds them anyway)."""
    if shard.format == "folder":
        return _read_folder(shard, endpoint_url, synthetic)
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "pairs": _read_pairs}[shard.format]
    return reader(shard, endpoint_url)


def _read_bytes(fs, path: str) -> bytes | None:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_folder(shard: Shard, endpoint_url: str | None, synthetic: bool) -> list[Record]:
    records = []
    for uri in shard.paths:
        fs, path = filesystem(uri, endpoint_url)
        stem = posixpath.splitext(path)[0]
        sample_id = posixpath.splitext(posixpath.relpath(uri, shard.root))[0]
        records.append(Record(sample_id, uri, _read_bytes(fs, path), _read_bytes(fs, stem + ".txt"),
                              synthetic=_read_bytes(fs, stem + SYNTHETIC_SUFFIX) if synthetic else None))
    return records


def _caption_from_json(data: bytes) -> bytes | None:
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    for key in ("caption", "text", "prompt"):
        if isinstance(meta, dict) and isinstance(meta.get(key), str):
            return meta[key].encode()
    return None


def _read_tar(shard: Shard, endpoint_url: str | None) -> list[Record]:
    """WebDataset convention: members `<key>.<ext>` (the key ends at the name's first dot); the image is any image
    extension, the caption `.txt` (or `caption`/`text` in `.json`), the synthetic caption `.synthetic.txt`. A
    truncated tar yields the members before the damage."""
    uri = shard.paths[0]
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        data = f.read()
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                key, _, ext = base.partition(".")
                key = posixpath.join(posixpath.dirname(member.name), key)
                if key not in samples:
                    samples[key], order = {}, [*order, key]
                samples[key]["." + ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        pass  # keep what was read; missing members surface as rejects of their samples
    records = []
    for key in order:
        parts = samples[key]
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        caption = parts.get(".txt")
        if caption is None and ".json" in parts:
            caption = _caption_from_json(parts[".json"])
        records.append(Record(key, f"{uri}#{key}", image, caption, synthetic=parts.get(SYNTHETIC_SUFFIX)))
    return records


def _pick(names: list[str], candidates: tuple[str, ...], what: str, uri: str) -> str | None:
    found = next((c for c in candidates if c in names), None)
    if found is None and what == "image":
        raise InputError(f"{uri}: no image column; expected one of {candidates}, found {names}")
    return found


def _read_parquet(shard: Shard, endpoint_url: str | None) -> list[Record]:
    uri = shard.paths[0]
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        # From bytes: pyarrow reading a Python file object can abort the process at exit (apache/arrow#34314).
        table = pq.read_table(pa.BufferReader(f.read()))
    names = table.column_names
    image_col = _pick(names, PARQUET_IMAGE_COLUMNS, "image", uri)
    caption_col = _pick(names, PARQUET_CAPTION_COLUMNS, "caption", uri)
    id_col = next((c for c in PARQUET_ID_COLUMNS if c in names), None)
    images = table.column(image_col).to_pylist()

    def column(name: str | None) -> list:
        return table.column(name).to_pylist() if name in names else [None] * len(images)

    records = []
    for row, (image, caption, synthetic, key) in enumerate(zip(
            images, column(caption_col), column(PARQUET_SYNTHETIC_COLUMN), column(id_col), strict=True)):
        records.append(Record(str(key) if key is not None else f"{_stem(path)}-{row}", f"{uri}#{row}",
                              _bytes_of(image), _text(caption), synthetic=_text(synthetic)))
    return records


def _text(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _bytes_of(image) -> bytes | None:
    return image.get("bytes") if isinstance(image, dict) else image  # Hugging Face's Image layout: {bytes, path}


def _read_pairs(shard: Shard, endpoint_url: str | None) -> list[Record]:
    """Pick-a-Pic v2 rows as (winner, loser) records: label_0 = 1 prefers jpg_0, 0 prefers jpg_1, 0.5 is a tie."""
    uri = shard.paths[0]
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    missing = [c for c in PAIRS_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{uri}: input_format=pairs needs the columns {PAIRS_COLUMNS} (Pick-a-Pic v2); missing "
                         f"{missing}, found {table.column_names}")
    id_col = next((c for c in PARQUET_ID_COLUMNS if c in table.column_names), None)
    rows = table.to_pylist()
    records = []
    for row, r in enumerate(rows):
        first, second = _bytes_of(r["jpg_0"]), _bytes_of(r["jpg_1"])
        label = r["label_0"]
        winner, loser = (first, second) if label is not None and label > 0.5 else (second, first)
        key = str(r[id_col]) if id_col and r[id_col] is not None else f"{_stem(path)}-{row}"
        records.append(Record(key, f"{uri}#{row}", winner, _text(r["caption"]), loser,
                              tie=label is None or label == 0.5))
    return records
