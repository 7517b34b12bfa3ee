"""Training input streamed from the preprocessed Parquet through Ray Data, one dataset per resolution bucket.

Driver side: the held-out split, row counts from the Parquet footers and one `read_parquet` per bucket (tensor
columns only, file order permuted once by the seed). Ray Train splits each bucket over the workers with
`streaming_split(equal=True)`; with `preserve_order` the split is deterministic, so a run and its resumption see
the same rows.

Worker side: an epoch is a seeded interleaving of the buckets' batches, the same on every rank, so each step's
batch shares one bucket across the whole job. Rows are shuffled per epoch in each worker's local buffer (seed from
seed, epoch and rank). Resuming mid-epoch replays the epoch's stream and drops the batches already trained on.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.storage import filesystem, is_remote
from workloads.train.data import TENSOR_COLUMNS, DataSpec


@dataclass(frozen=True)
class Split:
    train: dict[str, list[str]]  # bucket -> data files
    val: dict[str, list[str]]
    val_source: str  # "val_data", "held-out files" or "training files"


def split_files(spec: DataSpec, val_spec: DataSpec | None, fraction: float) -> Split:
    """Held-out files for validation: all of `val_spec`, else a `fraction` of the files chosen by a hash of their
    names (stable as the dataset grows), else (fraction 0) validation on training files."""
    if val_spec is not None:
        return Split(spec.files_by_bucket, val_spec.files_by_bucket, "val_data")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"loader.val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return Split(spec.files_by_bucket, spec.files_by_bucket, "training files")
    # keyed by bucket folder and file name, so a copied or moved dataset splits the same way
    files = sorted((f for fs in spec.files_by_bucket.values() for f in fs),
                   key=lambda f: zlib.crc32("/".join(f.rsplit("/", 2)[-2:]).encode()))
    if len(files) < 2:
        raise ValueError(f"loader.val_fraction={fraction} needs at least 2 data files, the dataset has "
                         f"{len(files)}: set val_data= or loader.val_fraction=0")
    held = set(files[: min(len(files) - 1, max(1, round(fraction * len(files))))])
    train = {b: [f for f in fs if f not in held] for b, fs in spec.files_by_bucket.items()}
    val = {b: [f for f in fs if f in held] for b, fs in spec.files_by_bucket.items()}
    return Split({b: f for b, f in train.items() if f}, {b: f for b, f in val.items() if f}, "held-out files")


def row_counts(files: list[str], endpoint_url: str | None = None) -> int:
    total = 0
    for file in files:
        fs, path = filesystem(file, endpoint_url)
        with fs.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def batches_per_epoch(rows: dict[str, int], world_size: int, local_batch: int) -> dict[str, int]:
    """Batches each rank takes from each bucket per epoch (equal splits; remainders dropped)."""
    return {b: (n // world_size) // local_batch for b, n in rows.items()}


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pa.fs.FileSystem | None, str]:
    """(pyarrow filesystem or None for local, path) for Ray's readers and storage, through our fsspec settings."""
    if not is_remote(uri):
        return None, uri
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, endpoint_url)
    return PyFileSystem(FSSpecHandler(fs)), path


def total_bytes(files: dict[str, list[str]], endpoint_url: str | None = None) -> int:
    """Size of the data files on storage (one listing per bucket folder)."""
    total = 0
    for paths in files.values():
        fs, folder = filesystem(paths[0].rsplit("/", 1)[0], endpoint_url)
        sizes = {name: info["size"] for name, info in fs.find(folder, detail=True).items()}
        total += sum(sizes.get(filesystem(p, endpoint_url)[1], 0) for p in paths)
    return total


def should_materialize(setting: bool | None, data_bytes: int, fraction: float) -> bool:
    """The configured choice, or (None) whether the data fits easily in the cluster's object store."""
    if setting is not None:
        return setting
    import ray

    return data_bytes < fraction * ray.cluster_resources().get("object_store_memory", 0)


def ray_storage(uri: str, endpoint_url: str | None = None) -> tuple[pa.fs.FileSystem | None, str]:
    """(filesystem, path) for Ray Train/Tune's `storage_filesystem` and `storage_path`: a remote URI through our
    fsspec settings, a local path made absolute (Ray needs one)."""
    pafs, path = arrow_filesystem(uri, endpoint_url)
    return (pafs, path) if pafs is not None else (None, str(Path(path).expanduser().resolve()))


def ordered_ingest():
    """Ray Train's `DataConfig` with a deterministic split (`preserve_order`): a resumed run sees the same rows."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def bucket_datasets(files: dict[str, list[str]], seed: int, endpoint_url: str | None = None,
                    materialize: bool = False) -> dict:
    """One Ray dataset per bucket with the tensor columns only, files in a seeded order; read into the object
    store once with `materialize`, else streamed every epoch."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # per-epoch bars and start-up lines flood a training log
    context.print_on_execution_start = False
    datasets = {}
    for bucket, paths in sorted(files.items()):
        order = sorted(paths)  # names sort the same wherever the dataset lives
        random.Random(f"{seed}/{bucket}").shuffle(order)
        pafs, _ = arrow_filesystem(order[0], endpoint_url)
        stripped = [arrow_filesystem(p, endpoint_url)[1] for p in order] if pafs is not None else order
        dataset = ray.data.read_parquet(stripped, filesystem=pafs, columns=list(TENSOR_COLUMNS))
        dataset.context.execution_options.preserve_order = True  # blocks in file order, also when materialised
        datasets[dataset_name(bucket)] = dataset.materialize() if materialize else dataset
    return datasets


def dataset_name(bucket: str) -> str:
    return f"train_{bucket}"  # no "/": Ray Data names log files after datasets


def epoch_schedule(batches: dict[str, int], seed: int, epoch: int) -> list[str]:
    """The bucket of each step of an epoch: every bucket's batches, interleaved by a seeded shuffle."""
    order = [b for b in sorted(batches) for _ in range(batches[b])]
    random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
    return order


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return zlib.crc32(f"{seed}/{epoch}/{rank}".encode())


@dataclass
class EpochStream:
    """Iterates one rank's bucketed batches epoch by epoch; `shards` are the Ray Train dataset shards."""

    shards: dict[str, object]  # bucket -> ray.data.DataIterator
    batches: dict[str, int]
    local_batch: int
    seed: int
    rank: int
    shuffle_buffer: int = 1024
    prefetch_batches: int = 2

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, str, dict[str, torch.Tensor]]]:
        """(index within the epoch, bucket, batch) from index `start`; earlier batches are read and dropped."""
        schedule = epoch_schedule(self.batches, self.seed, epoch)
        iterators = {}
        for index, bucket in enumerate(schedule):
            if bucket not in iterators:
                iterators[bucket] = iter(self.shards[bucket].iter_torch_batches(
                    batch_size=self.local_batch, drop_last=True, prefetch_batches=self.prefetch_batches,
                    local_shuffle_buffer_size=self.shuffle_buffer or None,
                    local_shuffle_seed=shuffle_seed(self.seed, epoch, self.rank) if self.shuffle_buffer else None))
            batch = next(iterators[bucket], None)
            if batch is None:
                raise RuntimeError(f"bucket {bucket} ran out of rows at batch {index} of epoch {epoch}: the data "
                                   "changed under the run (its row counts are taken at start-up)")
            if index >= start:
                yield index, bucket, batch
        for iterator in iterators.values():  # finish each split's epoch so the next one can start
            for _ in iterator:
                pass
