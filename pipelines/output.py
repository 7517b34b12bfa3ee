"""The output folder: data and rejects files named by input shard, a completion marker per shard, and the
manifest. A shard counts as done only once its marker exists; files of unmarked shards are leftovers of an
interrupted run and are deleted before the shard is processed again."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.conditioning import TextConditioningConfig
from pipelines import schema
from pipelines.storage import Location, filesystem, join, write_bytes

Batch = dict[str, np.ndarray]


def marker_path(output: str, shard: int) -> str:
    return join(output, schema.MARKERS_DIR, f"shard-{shard:06d}.json")


def read_markers(where: Location) -> list[dict]:
    """Every completion marker under `where/_markers/`; one cut off mid-write counts as absent (not done)."""
    folder = where.refreshed().path(schema.MARKERS_DIR)
    if not where.fs.exists(folder):
        return []
    markers = []
    for path in where.fs.find(folder):
        if path.endswith(".json"):
            try:
                markers.append(json.loads(where.fs.cat_file(path)))
            except ValueError:
                continue  # cut off mid-write: the shard is not done
    return markers


def completed_shards(output: str, endpoint_url: str | None) -> dict[int, dict]:
    """Markers of finished shards, by shard index."""
    return {m["shard"]: m for m in read_markers(Location.of(output, endpoint_url))}


def remove_unfinished(output: str, shards: list[int], endpoint_url: str | None) -> int:
    """Delete files that unfinished shards left behind; returns how many."""
    fs, root = filesystem(output, endpoint_url)
    fs.invalidate_cache()
    prefixes = tuple(schema.shard_prefix(s) for s in shards)
    stale = []
    for folder in (schema.DATA_DIR, schema.REJECTS_DIR):
        if fs.exists(join(root, folder)):
            stale += [p for p in fs.find(join(root, folder)) if p.rsplit("/", 1)[-1].startswith(prefixes)]
    for path in stale:
        fs.rm_file(path)
    return len(stale)


def _table(batch: Batch, rows: list[int], text: TextConditioningConfig) -> pa.Table:
    latent_shape = tuple(batch["latent"][rows[0]].shape)
    shapes = schema.embedding_shapes(text)
    columns = {
        schema.ID: pa.array([str(batch["id"][i]) for i in rows]),
        schema.SOURCE: pa.array([str(batch["source"][i]) for i in rows]),
        schema.CAPTION: pa.array([str(batch["caption"][i]) for i in rows]),
        schema.SYNTHETIC_CAPTION: pa.array([str(batch["caption_synthetic"][i]) for i in rows]),
        schema.WIDTH: pa.array([int(batch["width"][i]) for i in rows], pa.int32()),
        schema.HEIGHT: pa.array([int(batch["height"][i]) for i in rows], pa.int32()),
        schema.LATENT: schema.tensor_column([batch["latent"][i] for i in rows], latent_shape),
    }
    for column in schema.EMBEDDING_COLUMNS:
        output = column.split("_", 1)[1]
        columns[column] = schema.tensor_column(batch[column][rows], shapes[output])
    pairs = schema.LOSER_LATENT in batch
    if pairs:
        columns[schema.LOSER_LATENT] = schema.tensor_column([batch[schema.LOSER_LATENT][i] for i in rows], latent_shape)
    scores = tuple(k.removeprefix(schema.SCORE_PREFIX) for k in batch if k.startswith(schema.SCORE_PREFIX))
    for name in scores:
        columns[schema.SCORE_PREFIX + name] = pa.array([float(batch[schema.SCORE_PREFIX + name][i]) for i in rows],
                                                       pa.float32())
    return pa.Table.from_pydict(columns, schema=schema.data_schema(latent_shape, text, pairs=pairs, scores=scores))


def write_batch(batch: Batch, output: str, endpoint_url: str | None, text: TextConditioningConfig) -> Batch:
    """Write a batch's rows, split by shard and bucket, plus its rejects; return one summary row per shard."""
    fs, root = filesystem(output, endpoint_url)
    groups: dict[tuple, list[int]] = defaultdict(list)
    summary: dict[int, dict] = {}
    for i, shard in enumerate(batch["shard"].tolist()):
        entry = summary.setdefault(shard, {"rows": int(batch["shard_rows"][i]), "written": 0, "rejected": 0,
                                           "files": []})
        if batch["row"][i] < 0:
            continue  # placeholder of an empty shard
        if batch["stage"][i]:
            groups[(shard, "rejects")].append(i)
            entry["rejected"] += 1
        else:
            groups[(shard, schema.bucket_dir(int(batch["width"][i]), int(batch["height"][i])))].append(i)
            entry["written"] += 1
    for (shard, where), rows in groups.items():
        name = f"{schema.shard_prefix(shard)}{int(min(batch['row'][i] for i in rows)):08d}.parquet"
        if where == "rejects":
            path = join(root, schema.REJECTS_DIR, name)
            table = pa.Table.from_pydict({
                schema.ID: [str(batch["id"][i]) for i in rows], schema.SOURCE: [str(batch["source"][i]) for i in rows],
                schema.REJECT_STAGE: [str(batch["stage"][i]) for i in rows],
                schema.REJECT_REASON: [str(batch["reason"][i]) for i in rows],
            }, schema=schema.REJECTS_SCHEMA)
        else:
            path = join(root, schema.DATA_DIR, where, name)
            table = _table(batch, rows, text)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        # whole or absent: a kill or a full disk mid-write leaves no part of a file for a shard's count
        write_bytes(fs, path, buffer.getvalue().to_pybytes())
        summary[shard]["files"].append(path)
    shards = sorted(summary)
    return {
        "shard": np.array(shards, dtype=np.int64),
        "rows": np.array([summary[s]["rows"] for s in shards], dtype=np.int64),
        "written": np.array([summary[s]["written"] for s in shards], dtype=np.int64),
        "rejected": np.array([summary[s]["rejected"] for s in shards], dtype=np.int64),
        "files": np.array([json.dumps(summary[s]["files"]) for s in shards], dtype=object),
    }


class Progress:
    """Driver-side completion tracking: a shard's marker is written once written + rejected == rows read."""

    def __init__(self, output: str, endpoint_url: str | None, shards: dict[int, list[str]]) -> None:
        self.output, self.endpoint_url, self.sources = output, endpoint_url, shards
        self.state: dict[int, dict] = {}
        self.completed: list[int] = []

    def update(self, row: dict) -> bool:
        """Account one summary row; True when it completed its shard."""
        shard = int(row["shard"])
        entry = self.state.setdefault(shard, {"rows": int(row["rows"]), "written": 0, "rejected": 0, "files": []})
        entry["written"] += int(row["written"])
        entry["rejected"] += int(row["rejected"])
        entry["files"] += json.loads(row["files"])
        if entry["written"] + entry["rejected"] < entry["rows"]:
            return False
        marker = {"shard": shard, "inputs": self.sources[shard], "rows_read": entry["rows"],
                  "rows_written": entry["written"], "rows_rejected": entry["rejected"],
                  "files": sorted(entry["files"])}
        fs, path = filesystem(marker_path(self.output, shard), self.endpoint_url)
        write_bytes(fs, path, json.dumps(marker, indent=1).encode())  # whole or absent, never a partial marker
        self.completed.append(shard)
        return True

    def track(self, rows: Iterable[dict], log: logging.Logger) -> float | None:
        """Account every summary row, logging each shard as it completes; raises naming the shards left unfinished.
        Returns the seconds until the first shard completed."""
        start, first = time.perf_counter(), None
        for row in rows:
            if self.update(row):
                entry = self.state[int(row["shard"])]
                first = first or time.perf_counter() - start
                log.info(f"shard {int(row['shard'])} done ({len(self.completed)}/{len(self.sources)}): "
                         f"{entry['written']} written, {entry['rejected']} rejected")
        unfinished = sorted(set(self.sources) - set(self.completed))
        if unfinished:
            raise RuntimeError(f"shards {unfinished} did not complete; run the same command again to finish them")
        return first

    @property
    def rows(self) -> int:
        """Rows read by the shards completed so far."""
        return sum(self.state[s]["rows"] for s in self.completed)
