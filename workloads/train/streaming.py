"""Training input streamed from the preprocessed Parquet through Ray Data, one dataset per resolution bucket.

Driver side: the validation split (a separate dataset, or rows held out by a hash of their id), training row
counts and one `read_parquet` per bucket (tensor columns only, held-out rows filtered out, file order permuted once
by the seed). Ray Train splits each bucket over the workers with
`streaming_split(equal=True)`; with `preserve_order` the split is deterministic, so a run and its resumption see
the same rows.

Worker side: an epoch is a seeded interleaving of the buckets' batches, the same on every rank, so each step's
batch shares one bucket across the whole job. Rows are shuffled per epoch in each worker's local buffer (seed from
seed, epoch and rank). Each row's caption (original or synthetic) is chosen on the host, in Ray's prefetch threads
(`CaptionCollate`), so one caption's embeddings a sample are pinned and copied to the device. Resuming mid-epoch
replays the epoch's stream and drops the batches already trained on.
"""

from __future__ import annotations

import random
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines import schema
from pipelines.storage import Location
from workloads.train.data import TENSOR_COLUMNS, DataSpec, choose_captions, synthetic_rows
from workloads.train.holdout import drop_held_out, held_out, holdout_threshold


@dataclass(frozen=True)
class Split:
    """Where training and validation rows come from. With `holdout` both sides read the same files and each row's
    id decides its side (`held_out`)."""

    data: Location  # where the training files are
    train: dict[str, list[str]]  # bucket -> data files
    val_data: Location  # where the validation files are (the same with a row hold-out)
    val: dict[str, list[str]]
    val_source: str  # "val_data", "held-out rows" or "training rows"
    holdout: float = 0.0  # > 0: rows `held_out` picks validate and are left out of training


def split_files(spec: DataSpec, val_spec: DataSpec | None, fraction: float, min_rows: int = 1) -> Split:
    """Validation rows: all of `val_spec`; else a `fraction` of the rows of `spec` (at least `min_rows`, e.g. one
    per worker) chosen by id hash, which training skips (reads the id column of every file); else (fraction 0) the
    training rows themselves."""
    data, files = spec.location, spec.files_by_bucket
    if val_spec is not None:
        return Split(data, files, val_spec.location, val_spec.files_by_bucket, "val_data")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"loader.val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return Split(data, files, data, files, "training rows")
    ids = [i for paths in files.values() for f in paths for i in read_ids(data, f)]
    return Split(data, files, data, files, "held-out rows", holdout=holdout_threshold(ids, fraction, min_rows))


def read_ids(data: Location, file: str) -> list[str]:
    with data.fs.open(file, "rb") as handle:
        return _ids(pq.ParquetFile(handle))


def _ids(parquet: pq.ParquetFile) -> list[str]:
    return parquet.read(columns=[schema.ID]).column(schema.ID).to_pylist()


def split_row_counts(data: Location, files: list[str], holdout: float = 0.0) -> tuple[int, int]:
    """(rows, held-out rows) of the files: the Parquet footers, and with a `holdout` the id column of each file."""
    total = held = 0
    for file in files:
        with data.fs.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            total += parquet.metadata.num_rows
            if holdout:
                held += int(held_out(_ids(parquet), holdout).sum())
    return total, held


def row_counts(data: Location, files: list[str]) -> int:
    return split_row_counts(data, files)[0]


def training_rows(split: Split) -> dict[str, int]:
    """Training rows by bucket, held-out rows excluded; fails when the hold-out leaves either side empty."""
    counts = {b: split_row_counts(split.data, files, split.holdout) for b, files in split.train.items()}
    rows = {b: total - held for b, (total, held) in counts.items()}
    if split.holdout:
        total, held = sum(t for t, _ in counts.values()), sum(h for _, h in counts.values())
        if held == 0:
            raise ValueError(f"the row hold-out (loader.val_fraction) holds out none of the dataset's {total} rows: "
                             "raise it, set val_data= or set loader.val_fraction=0 (validate on training rows)")
        if held == total:
            raise ValueError(f"the row hold-out (loader.val_fraction) holds out all {total} rows of the dataset, "
                             "leaving no training rows: lower it or set val_data=")
    return rows


def batches_per_epoch(rows: dict[str, int], world_size: int, local_batch: int) -> dict[str, int]:
    """Batches each rank takes from each bucket per epoch (equal splits; remainders dropped)."""
    return {b: (n // world_size) // local_batch for b, n in rows.items()}


def arrow_filesystem(where: Location) -> pa.fs.FileSystem | None:
    """The pyarrow filesystem for Ray's readers and storage over our fsspec one (None for local paths)."""
    if not where.remote:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(where.fs))


def fs_path(where: Location, file: str) -> str:
    """A file's path within `where`'s filesystem (no protocol), as pyarrow and listings name it."""
    return where.fs._strip_protocol(file) if where.remote else file


def total_bytes(data: Location, files: dict[str, list[str]]) -> int:
    """Size of the data files on storage (one listing per bucket folder)."""
    total = 0
    for paths in files.values():
        folder = fs_path(data, paths[0].rsplit("/", 1)[0])
        sizes = {name: info["size"] for name, info in data.fs.find(folder, detail=True).items()}
        total += sum(sizes.get(fs_path(data, p), 0) for p in paths)
    return total


def should_materialize(setting: bool | None, data_bytes: int, fraction: float) -> bool:
    """The configured choice, or (None) whether the data fits easily in the cluster's object store."""
    if setting is not None:
        return setting
    import ray

    return data_bytes < fraction * ray.cluster_resources().get("object_store_memory", 0)


def ray_storage(where: Location) -> tuple[pa.fs.FileSystem | None, str]:
    """(filesystem, path) for Ray Train/Tune's `storage_filesystem` and `storage_path`: a remote location through
    our fsspec filesystem, a local path made absolute (Ray needs one)."""
    pafs = arrow_filesystem(where)
    return (pafs, where.root) if pafs is not None else (None, str(Path(where.root).expanduser().resolve()))


def ordered_ingest():
    """Ray Train's `DataConfig` with a deterministic split (`preserve_order`): a resumed run sees the same rows.

    The options are Ray Train's defaults (`DataConfig.default_ingest_options`: the current DataContext's limits and
    progress setting) built without its deprecated `exclude_resources` argument, whose setter warns on every run."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                               verbose_progress=current.verbose_progress)
    return ray.train.DataConfig(execution_options=options)


def bucket_datasets(data: Location, files: dict[str, list[str]], seed: int, materialize: bool = False,
                    holdout: float = 0.0, tensor_columns: Sequence[str] = TENSOR_COLUMNS) -> dict:
    """One Ray dataset per bucket with the sample id and the `tensor_columns` only, files in a seeded order, rows
    `held_out` picks with `holdout` filtered out; read into the object store once with `materialize`, else streamed
    every epoch."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # per-epoch bars and start-up lines flood a training log
    context.print_on_execution_start = False
    datasets = {}
    for bucket, paths in sorted(files.items()):
        order = sorted(paths)  # names sort the same wherever the dataset lives
        random.Random(f"{seed}/{bucket}").shuffle(order)
        columns = [schema.ID, *tensor_columns]  # the id: the hold-out and each epoch's caption choice
        with parquet_v1(context):
            dataset = ray.data.read_parquet([fs_path(data, p) for p in order], filesystem=arrow_filesystem(data),
                                            columns=columns)
        if holdout:  # row-wise and order-keeping: fused into the read tasks
            dataset = dataset.map_batches(drop_held_out, fn_kwargs={"holdout": holdout}, batch_format="pyarrow",
                                          batch_size=None)
        dataset.context.execution_options.preserve_order = True  # blocks in file order, also when materialised
        datasets[dataset_name(bucket)] = dataset.materialize() if materialize else dataset
    return datasets


@contextmanager
def parquet_v1(context) -> Iterator[None]:
    """Ray Data's first Parquet reader for the datasets made inside: it reads the footers once, when the dataset is
    made, where the newer one (`use_datasource_v2`) lists the files again at every execution on a pool of footer
    actors (32 by default), and a training dataset is executed once per epoch and bucket: on 2 cores that was about
    3 s per epoch and bucket against 0.3 s, and a 12-step test run 75 s against 40 s (Ray 2.60). The file list is
    ours already, so nothing is lost."""
    before = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = before


def dataset_name(bucket: str) -> str:
    return f"train_{bucket}"  # no "/": Ray Data names log files after datasets


def epoch_schedule(batches: dict[str, int], seed: int, epoch: int) -> list[str]:
    """The bucket of each step of an epoch: every bucket's batches, interleaved by a seeded shuffle."""
    order = [b for b in sorted(batches) for _ in range(batches[b])]
    random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
    return order


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return zlib.crc32(f"{seed}/{epoch}/{rank}".encode())


def host_tensors(columns: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors over the arrays without a copy. Arrays read from Arrow are read-only; nothing writes to a batch (it is
    pinned or copied to the device, or only read on a CPU run), so torch's warning about them is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in columns.items()}


class CaptionCollate(NumpyBatchCollateFn):
    """A batch's tensors with one caption's embeddings per row (`choose_captions`, drawn by `synthetic_rows`), keyed
    by encoder output. Ray seam: it runs as the iterator's collate function, on its prefetch threads, before Ray
    pins the batch and copies it to the device, so the caption not drawn never leaves the host."""

    def __init__(self, seed: int, epoch: int, synthetic_prob: float) -> None:
        self.seed, self.epoch, self.synthetic_prob = seed, epoch, synthetic_prob

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        synthetic = synthetic_rows(batch[schema.ID], self.seed, self.epoch, self.synthetic_prob)
        return host_tensors(choose_captions(batch, synthetic))


class AllColumns(NumpyBatchCollateFn):
    """Every tensor column of a batch (the id left out): what reached the device before the host-side caption
    choice, kept for `workloads.bench.train`'s before-and-after."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return host_tensors({k: v for k, v in batch.items() if k != schema.ID})


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
    synthetic_prob: float = 0.5  # per row and epoch: the synthetic caption instead of the original
    pin_memory: bool = False  # page-locked host batches (GPU training: asynchronous copies)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, str, dict[str, torch.Tensor]]]:
        """(index within the epoch, bucket, batch) from index `start`; earlier batches are read and dropped."""
        schedule = epoch_schedule(self.batches, self.seed, epoch)
        iterators = {}
        for index, bucket in enumerate(schedule):
            if bucket not in iterators:
                iterators[bucket] = iter(self.shards[bucket].iter_torch_batches(
                    batch_size=self.local_batch, drop_last=True, prefetch_batches=self.prefetch_batches,
                    local_shuffle_buffer_size=self.shuffle_buffer or None,
                    local_shuffle_seed=shuffle_seed(self.seed, epoch, self.rank) if self.shuffle_buffer else None,
                    collate_fn=CaptionCollate(self.seed, epoch, self.synthetic_prob), pin_memory=self.pin_memory))
            batch = next(iterators[bucket], None)
            if batch is None:
                raise RuntimeError(f"bucket {bucket} ran out of rows at batch {index} of epoch {epoch}: the data "
                                   "changed under the run (its row counts are taken at start-up)")
            if index >= start:
                yield index, bucket, batch
        for iterator in iterators.values():  # finish each split's epoch so the next one can start
            for _ in iterator:
                pass
