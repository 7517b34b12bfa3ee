"""The preprocessed dataset's layout: column names, Arrow schemas and folder names.

The one place these facts live: preprocessing writes them and training reads them. Each data file holds one
resolution bucket, so the latent column is a fixed-shape tensor (native `arrow.fixed_shape_tensor`, readable
by plain pyarrow). Text embeddings are stored per encoder, for the original and the synthetic caption, so
training can drop encoders independently and pick either caption per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch-free at run time: Ray Data's read tasks and coordinators import this module
    from model.conditioning import TextConditioningConfig

ID, SOURCE, CAPTION, SYNTHETIC_CAPTION = "id", "source", "caption", "caption_synthetic"
WIDTH, HEIGHT, LATENT = "width", "height", "latent"
# A preference dataset (manifest `kind: pairs`) is a dataset whose `latent` is each pair's winner, with its loser
# beside it and the pair's prompt as both captions: every reader of ordinary data reads it (validation, winners-only
# fine-tuning), and DPO reads the loser too.
LOSER_LATENT, PAIRS_KIND = "latent_loser", "pairs"
CAPTION_KINDS = ("original", "synthetic")  # which caption an embedding encodes
ENCODER_OUTPUTS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")
REJECT_STAGE, REJECT_REASON = "stage", "reason"

DATA_DIR, REJECTS_DIR, MARKERS_DIR, MANIFEST = "data", "rejects", "_markers", "_manifest.json"

# The deduplication job's output (manifest `kind: dedup`), read by preprocessing's `dedup=`: one row per duplicate,
# naming the earlier kept item it duplicates. `shard` is the input shard (the same cut as preprocessing's).
DEDUP_KIND, DUPLICATES_DIR, DEDUP_STAGE = "dedup", "duplicates", "dedup"
SHARD, ROW, CLUSTER, DUPLICATE_OF, DISTANCE = "shard", "row", "cluster", "duplicate_of", "distance"
DUPLICATES_SCHEMA = pa.schema([
    pa.field(ID, pa.string()), pa.field(SOURCE, pa.string()), pa.field(SHARD, pa.int64()), pa.field(ROW, pa.int64()),
    pa.field(CLUSTER, pa.int64()), pa.field(DUPLICATE_OF, pa.string()), pa.field("duplicate_of_source", pa.string()),
    pa.field(DISTANCE, pa.float32()),  # faiss' squared L2 between the L2-normalised embeddings (2 - 2 cos)
])
# Per-image scores of preprocessing's filters, kept beside the data (`score_aesthetic`, `score_nsfw`).
SCORE_PREFIX = "score_"


def embedding_column(kind: str, output: str) -> str:
    """e.g. ('original', 't5') -> 'original_t5'."""
    if kind not in CAPTION_KINDS or output not in ENCODER_OUTPUTS:
        raise ValueError(f"no embedding column for ({kind!r}, {output!r}); kinds {CAPTION_KINDS}, "
                         f"outputs {ENCODER_OUTPUTS}")
    return f"{kind}_{output}"


EMBEDDING_COLUMNS = tuple(embedding_column(k, o) for k in CAPTION_KINDS for o in ENCODER_OUTPUTS)


def embedding_shapes(text: TextConditioningConfig) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each encoder output."""
    return {
        "clip_l": (text.clip_tokens, text.clip_l_dim), "clip_l_pooled": (text.clip_l_dim,),
        "clip_g": (text.clip_tokens, text.clip_g_dim), "clip_g_pooled": (text.clip_g_dim,),
        "t5": (text.t5_tokens, text.t5_dim),
    }


def tensor_type(shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), list(shape))


def data_schema(latent_shape: tuple[int, int, int], text: TextConditioningConfig, pairs: bool = False,
                scores: tuple[str, ...] = ()) -> pa.Schema:
    """Schema of a data file whose latents are (C, h, w); with `pairs`, a preference dataset's (a loser latent
    beside the winner's `latent`); `scores` names the filters' score columns (`score_<name>`, float32)."""
    shapes = embedding_shapes(text)
    fields = [
        pa.field(ID, pa.string(), nullable=False), pa.field(SOURCE, pa.string()),
        pa.field(CAPTION, pa.string()), pa.field(SYNTHETIC_CAPTION, pa.string()),
        pa.field(WIDTH, pa.int32()), pa.field(HEIGHT, pa.int32()),
        pa.field(LATENT, tensor_type(latent_shape)),
    ]
    fields += [pa.field(embedding_column(k, o), tensor_type(shapes[o])) for k in CAPTION_KINDS for o in ENCODER_OUTPUTS]
    if pairs:
        fields.append(pa.field(LOSER_LATENT, tensor_type(latent_shape)))
    fields += [pa.field(SCORE_PREFIX + name, pa.float32()) for name in scores]
    return pa.schema(fields)


REJECTS_SCHEMA = pa.schema([
    pa.field(ID, pa.string()), pa.field(SOURCE, pa.string()),
    pa.field(REJECT_STAGE, pa.string()), pa.field(REJECT_REASON, pa.string()),
])


def tensor_column(values: list[np.ndarray] | np.ndarray, shape: tuple[int, ...]) -> pa.Array:
    """Stack per-row arrays into a native fixed-shape fp16 tensor column."""
    stacked = np.ascontiguousarray(np.stack(list(values)).astype(np.float16)).reshape(-1, *shape)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(stacked)


def bucket_dir(width: int, height: int) -> str:
    """Data folder of one resolution bucket, e.g. 'bucket=256x256' (width x height)."""
    return f"bucket={width}x{height}"


def bucket_of(path: str) -> str | None:
    """The bucket folder ('bucket=WxH') of a data file's path, or None for files outside `data/`."""
    marker = f"/{DATA_DIR}/"
    return path.rsplit(marker, 1)[1].split("/", 1)[0] if marker in path else None


def shard_prefix(shard: int) -> str:
    """File-name prefix of everything one input shard produced; a rerun deletes unfinished shards by it."""
    return f"shard-{shard:06d}-"
