"""The deduplication job's per-item work: the Ray Data embedding stages, and the files each stage writes and reads.

Embeddings are written like preprocessing's data (`embeddings/data/shard-*.parquet`, `embeddings/rejects/`, one
marker per input shard), so `pipelines.output`'s progress and resume rules apply to them unchanged. Assignments are
written per input shard and cluster group (`assign/group=G/shard-S.parquet`), so each range-search task reads only
its own group.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import schema
from pipelines.decode import Rejected, open_image
from pipelines.dedup.embedders import build_embedder, prepare
from pipelines.stages import EMPTY_PIXELS, object_column
from pipelines.storage import Location

if TYPE_CHECKING:
    from conf.dedup import EmbedderConf

Batch = dict[str, np.ndarray]
EMBEDDING = "embedding"
EMBED_DIR, ASSIGN_DIR, CLUSTERS_DIR = "embeddings", "assign", "clusters"
ITEM_COLUMNS = (schema.ID, schema.SOURCE, schema.SHARD, schema.ROW)


def decode_for_embedding(batch: Batch, size: int, max_pixels: int) -> Batch:
    """Decode each image and squash it to (size, size, 3) uint8; a failure becomes a reject of stage 'decode'."""
    pixels, stages, reasons = [], list(batch["stage"]), list(batch["reason"])
    for i in range(len(batch["id"])):
        array = EMPTY_PIXELS
        if not stages[i] and batch["row"][i] >= 0:
            try:
                array = prepare(open_image(bytes(batch["image"][i]) if batch["has_image"][i] else None, max_pixels),
                                size)
            except Rejected as err:
                stages[i], reasons[i] = "decode", str(err)
            except Exception as err:  # one bad image never stops the job
                stages[i], reasons[i] = "decode", f"unexpected {type(err).__name__}: {err}"
        pixels.append(array)
    keep = (schema.ID, schema.SOURCE, schema.SHARD, schema.ROW, "shard_rows")
    return {**{k: batch[k] for k in keep}, "pixels": object_column(pixels),
            "stage": np.array(stages, dtype=object), "reason": np.array(reasons, dtype=object)}


class EmbedStage:
    """The embedding model, loaded once per actor."""

    def __init__(self, cfg: EmbedderConf, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = build_embedder(cfg, device)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        out = np.zeros((n, self.model.dim), dtype=np.float32)
        stages, reasons = batch["stage"].astype(object), batch["reason"].astype(object)
        live = [i for i in range(n) if not stages[i] and batch["row"][i] >= 0]
        if live:
            try:
                out[live] = self.model.embed(np.stack([batch["pixels"][i] for i in live]))
            except Exception as err:  # a model failure rejects this batch's rows, not the job
                for i in live:
                    stages[i], reasons[i] = "embed", f"{type(err).__name__}: {err}"
        for i in live:  # a zero vector (a uniform image, to the descriptor) would duplicate every other one
            if not stages[i] and np.linalg.norm(out[i]) < 0.5:
                stages[i], reasons[i] = "embed", "no embedding to compare (a uniform image): not deduplicated"
        del batch["pixels"]
        return {**batch, EMBEDDING: out, "stage": stages, "reason": reasons}


def item_table(batch: Batch, rows: list[int]) -> dict[str, pa.Array]:
    return {schema.ID: pa.array([str(batch[schema.ID][i]) for i in rows]),
            schema.SOURCE: pa.array([str(batch[schema.SOURCE][i]) for i in rows]),
            schema.SHARD: pa.array([int(batch[schema.SHARD][i]) for i in rows], pa.int64()),
            schema.ROW: pa.array([int(batch[schema.ROW][i]) for i in rows], pa.int64())}


def embedding_column(x: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x, dtype=np.float32))


def write_parquet(where: Location, relative: str, table: pa.Table) -> str:
    path = where.path(relative)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    where.write_bytes(relative, buffer.getvalue())
    return path


def write_embeddings(batch: Batch, out: Location) -> Batch:
    """Write a batch's embeddings and rejects per input shard; one summary row per shard (`output.Progress`'s)."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    summary: dict[int, dict] = {}
    for i, shard in enumerate(batch[schema.SHARD].tolist()):
        entry = summary.setdefault(shard, {"rows": int(batch["shard_rows"][i]), "written": 0, "rejected": 0,
                                           "files": []})
        if batch[schema.ROW][i] < 0:
            continue  # placeholder of an empty shard
        kind = schema.REJECTS_DIR if batch["stage"][i] else schema.DATA_DIR
        groups[(shard, kind)].append(i)
        entry["rejected" if batch["stage"][i] else "written"] += 1
    for (shard, kind), rows in groups.items():
        name = f"{kind}/{schema.shard_prefix(shard)}{int(min(batch[schema.ROW][i] for i in rows)):08d}.parquet"
        columns = item_table(batch, rows)
        if kind == schema.REJECTS_DIR:
            table = pa.table({schema.ID: columns[schema.ID], schema.SOURCE: columns[schema.SOURCE],
                              schema.REJECT_STAGE: [str(batch["stage"][i]) for i in rows],
                              schema.REJECT_REASON: [str(batch["reason"][i]) for i in rows]},
                             schema=schema.REJECTS_SCHEMA)
        else:
            table = pa.table({**columns, EMBEDDING: embedding_column(batch[EMBEDDING][rows])})
        summary[shard]["files"].append(write_parquet(out, name, table))
    shards = sorted(summary)
    return {"shard": np.array(shards, dtype=np.int64),
            **{k: np.array([summary[s][k] for s in shards], dtype=np.int64) for k in ("rows", "written", "rejected")},
            "files": np.array([json.dumps(summary[s]["files"]) for s in shards], dtype=object)}


def read_items(where: Location, files: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Items (id, source, shard, row, and any other plain columns) and their (N, dim) embeddings from data files,
    in input order (shard, row)."""
    tables = [pq.read_table(pa.BufferReader(where.fs.cat_file(f))) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string() if c in (schema.ID, schema.SOURCE) else pa.int64())
                         for c in ITEM_COLUMNS}), np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(tables).sort_by([(schema.SHARD, "ascending"), (schema.ROW, "ascending")])
    x = table.column(EMBEDDING).combine_chunks().to_numpy_ndarray().astype(np.float32)
    return table.drop_columns([EMBEDDING]), x


def data_files(marker: dict) -> list[str]:
    """A shard marker's data files (not its rejects), by their own folder: the output's path may hold 'data' too."""
    return [f for f in marker["files"] if f.rsplit("/", 2)[-2] == schema.DATA_DIR]


def save_array(where: Location, relative: str, x: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, x)
    where.write_bytes(relative, buffer.getvalue())


def load_array(where: Location, relative: str) -> np.ndarray:
    return np.load(io.BytesIO(where.read_bytes(relative)))
