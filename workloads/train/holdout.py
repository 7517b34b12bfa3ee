"""The row-level validation split: a row validates when the hash of its sample id falls below a threshold, so its
side depends on its id alone, the same in every run, restart and worker count.

Kept free of torch and the model: `drop_held_out` runs inside Ray Data's read tasks and split coordinators, which
import this module (and only this one of the training job's) in processes that never touch a tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipelines import schema


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """(n,) float64 in [0, 1): crc32 of each sample id, the key of the row-level validation split."""
    return np.fromiter((zlib.crc32(i.encode()) for i in ids), dtype=np.float64, count=len(ids)) / 2.0**32


def held_out(ids: Sequence[str], threshold: float) -> np.ndarray:
    """(n,) bool, the validation rows: those whose id hash is below `threshold` (`Split.holdout`). A row's side
    depends on its id and the threshold alone: the same in every run, restart and worker count."""
    return id_hashes(ids) < threshold


def holdout_threshold(ids: Sequence[str], fraction: float, min_rows: int = 1) -> float:
    """The hash threshold that holds out round(fraction * n) of the n rows, at least `min_rows` and at most n - 1:
    the rows with the smallest id hashes, so even a tiny dataset validates, and added rows move few others."""
    if len(ids) <= min_rows:
        raise ValueError(f"loader.val_fraction={fraction} needs more than {min_rows} rows to hold out {min_rows}, "
                         f"the dataset has {len(ids)}: set val_data= or loader.val_fraction=0 (validate on training "
                         "rows)")
    hashes = np.sort(id_hashes(ids))
    k = min(len(ids) - 1, max(min_rows, round(fraction * len(ids))))
    return float((hashes[k - 1] + hashes[k]) / 2)


def drop_held_out(batch: pa.Table, holdout: float) -> pa.Table:
    """The batch's training rows (those `held_out` does not pick); the id stays, for the caption choice."""
    keep = ~held_out(batch.column(schema.ID).to_pylist(), holdout)
    return batch.filter(pa.array(keep))
