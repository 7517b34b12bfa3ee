"""Training input from the preprocessed dataset (layout in `pipelines/schema.py`): the manifest's files by
bucket, a start-up check that the data fits the model, the per-sample caption choice (original or synthetic, made on
the host so only the chosen caption's embeddings reach the device), and a batch -> MM-DiT inputs with per-encoder
text dropout."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model import MMDiTConfig
from model.conditioning import (
    PAPER_DROP_PROB,
    TextConditioningConfig,
    TextEmbeddings,
    assemble_conditioning,
    sample_encoder_keep,
)
from pipelines import schema
from pipelines.storage import Location, filesystem, join

TENSOR_COLUMNS = (schema.LATENT, *schema.EMBEDDING_COLUMNS)


@dataclass(frozen=True)
class DataSpec:
    """What training needs to know of a preprocessed dataset."""

    location: Location  # the dataset's folder: every data file lives on its filesystem
    files_by_bucket: dict[str, list[str]]  # 'bucket=WxH' -> data files
    text: TextConditioningConfig
    vae: str | None = None  # the VAE's repo (hub id or folder, `vae` subfolder) that encoded the latents
    resolution: int | None = None  # the square target size, when preprocessed without buckets
    buckets: tuple[str, ...] = ()  # 'WxH' pixel sizes when preprocessed with buckets
    pairs: bool = False  # a preference dataset: winner `latent`, loser `latent_loser` (`schema.PAIRS_KIND`)

    @property
    def tensor_columns(self) -> tuple[str, ...]:
        """The columns training reads."""
        return (*TENSOR_COLUMNS, schema.LOSER_LATENT) if self.pairs else TENSOR_COLUMNS

    @property
    def rows_hint(self) -> int:
        return sum(len(f) for f in self.files_by_bucket.values())


def read_spec(data: Location | str, endpoint_url: str | None = None) -> DataSpec:
    """The manifest's data files by bucket and the encoder widths; fails clearly if there is no finished dataset."""
    data = Location.of(data, endpoint_url)
    if not data.exists(schema.MANIFEST):
        raise FileNotFoundError(f"{data.uri!r} has no {schema.MANIFEST}: run pipelines.preprocess on it first")
    manifest = json.loads(data.read_bytes(schema.MANIFEST))
    # Paths are read relative to where the dataset is now, so a copied or moved dataset still reads.
    _, written_root = filesystem(manifest["output"], endpoint_url)  # the recorded root, normalised as files were
    base = data.uri
    by_bucket: dict[str, list[str]] = defaultdict(list)
    for file in manifest["files"]:
        if (bucket := schema.bucket_of(file)) is not None:
            relative = file[len(written_root.rstrip("/")) + 1:] if file.startswith(written_root) else file
            by_bucket[bucket].append(join(base, relative))
    if not by_bucket:
        raise ValueError(f"{data.uri!r}: the manifest lists no data files ({manifest['counts']})")
    models = manifest["models"]
    # Only the widths the config has: manifests written before may hold more (a since-removed `drop_prob`).
    known = {f.name for f in fields(TextConditioningConfig)}
    text = TextConditioningConfig(**{k: v for k, v in models["text"].items() if k in known})
    return DataSpec(data, dict(by_bucket), text, vae=models.get("sd3_repo"),
                    resolution=manifest.get("resolution"), buckets=tuple(manifest.get("buckets") or ()),
                    pairs=manifest.get("kind") == schema.PAIRS_KIND)


def check_compatible(file_schema: pa.Schema, model: MMDiTConfig, where: str = "data") -> None:
    """Raise ValueError naming the column when the data cannot feed `model`."""
    missing = [c for c in TENSOR_COLUMNS if c not in file_schema.names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    shape = lambda column: tuple(file_schema.field(column).type.shape)  # noqa: E731
    channels, height, width = shape(schema.LATENT)
    if channels != model.in_channels:
        raise ValueError(f"{where}: column '{schema.LATENT}' has {channels} channels; model.in_channels is "
                         f"{model.in_channels}")
    max_side = model.pos_embed_max_size * model.patch_size
    if height % model.patch_size or width % model.patch_size or max(height, width) > max_side:
        raise ValueError(f"{where}: column '{schema.LATENT}' is {height}x{width}; the model needs sides divisible by "
                         f"{model.patch_size} and at most {max_side}")
    clip = shape("original_clip_l")[-1] + shape("original_clip_g")[-1]
    if clip > model.context_dim or shape("original_t5")[-1] > model.context_dim:
        raise ValueError(f"{where}: columns 'original_clip_l' + 'original_clip_g' ({clip}) and 'original_t5' "
                         f"({shape('original_t5')[-1]}) must fit model.context_dim={model.context_dim}")
    pooled = shape("original_clip_l_pooled")[-1] + shape("original_clip_g_pooled")[-1]
    if pooled != model.pooled_dim:
        raise ValueError(f"{where}: columns 'original_clip_l_pooled' + 'original_clip_g_pooled' give {pooled}; "
                         f"model.pooled_dim is {model.pooled_dim}")


def file_schema(data: Location, file: str) -> pa.Schema:
    """The Arrow schema of one of `data`'s files (its footer only)."""
    with data.fs.open(file, "rb") as handle:
        return pq.read_schema(handle)


def latent_shape(data: Location, file: str) -> tuple[int, int, int]:
    """(C, h, w) of the latents in a data file."""
    return tuple(file_schema(data, file).field(schema.LATENT).type.shape)


def check_spec(spec: DataSpec, model: MMDiTConfig) -> None:
    """Check one file of every bucket against the model (schemas are per bucket)."""
    for bucket, files in spec.files_by_bucket.items():
        check_compatible(file_schema(spec.location, files[0]), model, f"{bucket} ({files[0]})")


def training_columns(synthetic_prob: float, pairs: bool = False) -> tuple[str, ...]:
    """The columns a training step reads: the latents (and a pair's loser) and the embeddings of each caption kind
    it can draw (both for a mix; one when `synthetic_prob` is 0 or 1, so the other is never read)."""
    kinds = [kind for kind, p in zip(schema.CAPTION_KINDS, (1.0 - synthetic_prob, synthetic_prob), strict=True) if p]
    latents = (schema.LATENT, schema.LOSER_LATENT) if pairs else (schema.LATENT,)
    return (*latents, *(schema.embedding_column(k, o) for k in kinds for o in schema.ENCODER_OUTPUTS))


def synthetic_rows(ids: Sequence[str], seed: int, epoch: int, synthetic_prob: float) -> np.ndarray:
    """(B,) bool: the rows that take their synthetic caption in this epoch (the paper's 50/50 mix at 0.5). A function
    of the sample id, seed and epoch alone, so a resumed run, a restarted worker group and any worker count or batch
    order draw the same captions, and a sample draws afresh each epoch."""
    salt = f"captions/{seed}/{epoch}/".encode()
    # blake2b, not the hold-out's crc32: crc32 is affine in its input, so two epochs' salts would flip the same bits
    # of every id's hash and the draws of one epoch would predict the next
    draws = [int.from_bytes(hashlib.blake2b(salt + i.encode(), digest_size=8).digest(), "big") for i in ids]
    return np.array(draws, dtype=np.float64).reshape(len(ids)) / 2.0**64 < synthetic_prob


def choose_captions(columns: Mapping[str, Any], synthetic: np.ndarray | bool) -> dict[str, Any]:
    """One caption's embeddings per row, keyed by encoder output (`schema.ENCODER_OUTPUTS`), with the latent columns
    passed through. `synthetic`: a (B,) bool array (numpy columns; the rows are copied once) or one kind for all rows
    (numpy or torch columns; nothing is copied). Either kind's columns may be absent when no row takes it."""
    out = {c: columns[c] for c in (schema.LATENT, schema.LOSER_LATENT) if c in columns}
    if isinstance(synthetic, bool | np.bool_):
        uniform, kinds = True, [bool(synthetic)]
    else:
        uniform = bool(synthetic.all() or not synthetic.any())
        kinds = [bool(synthetic.any())] if uniform else [False, True]
    for output in schema.ENCODER_OUTPUTS:
        names = [schema.embedding_column(schema.CAPTION_KINDS[k], output) for k in kinds]
        if missing := [n for n in names if n not in columns]:
            raise ValueError(f"the batch has no column {missing[0]!r} for the captions drawn (columns: "
                             f"{sorted(columns)})")
        if uniform:
            out[output] = columns[names[0]]
        else:
            original, chosen = (columns[n] for n in names)
            out[output] = np.where(synthetic.reshape(-1, *[1] * (original.ndim - 1)), chosen, original)
    return out


def to_model_inputs(batch: Mapping[str, torch.Tensor], text: TextConditioningConfig,
                    drop_prob: float = PAPER_DROP_PROB, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 (B, C, h, w), context (B, 154, D_ctx), pooled (B, D_pool)) from a batch of one caption's embeddings per
    row (`choose_captions`), each encoder dropped independently with `drop_prob` (on the device: a multiply)."""
    x0 = batch[schema.LATENT].to(dtype)
    embeddings = TextEmbeddings(**{output: batch[output].to(dtype) for output in schema.ENCODER_OUTPUTS})
    keep = sample_encoder_keep(x0.shape[0], drop_prob, generator, x0.device)
    context, pooled = assemble_conditioning(embeddings, text, keep)
    return x0, context, pooled
