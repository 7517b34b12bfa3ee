"""A dataset in the preprocessing output's layout (`pipelines.schema`) filled with random latents and embeddings,
of any size and any model's widths: benchmark input that needs neither images nor encoders."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.pretrained import SD3_VAE_DOWNSAMPLE
from model.conditioning import TextConditioningConfig
from pipelines import schema
from pipelines.storage import filesystem, join


def write_random_dataset(out: str, rows: int, latent_shape: tuple[int, int, int], text: TextConditioningConfig,
                         rows_per_file: int = 256, seed: int = 0) -> str:
    """`rows` random rows in one bucket, in files of `rows_per_file`, plus the manifest; returns `out`."""
    fs, root = filesystem(out)
    rng = np.random.default_rng(seed)
    shapes = schema.embedding_shapes(text)
    _, h, w = latent_shape
    bucket = schema.bucket_dir(w * SD3_VAE_DOWNSAMPLE, h * SD3_VAE_DOWNSAMPLE)
    files = []
    for index, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        columns = {
            schema.ID: [f"r{start + i}" for i in range(n)], schema.SOURCE: ["random"] * n,
            schema.CAPTION: [f"random row {start + i}" for i in range(n)], schema.SYNTHETIC_CAPTION: [""] * n,
            schema.WIDTH: [w * SD3_VAE_DOWNSAMPLE] * n, schema.HEIGHT: [h * SD3_VAE_DOWNSAMPLE] * n,
            schema.LATENT: schema.tensor_column(rng.standard_normal((n, *latent_shape), np.float32), latent_shape),
        }
        for column in schema.EMBEDDING_COLUMNS:
            shape = shapes[column.split("_", 1)[1]]
            columns[column] = schema.tensor_column(rng.standard_normal((n, *shape), np.float32), shape)
        path = join(root, schema.DATA_DIR, bucket, f"{schema.shard_prefix(index)}00000000.parquet")
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as handle:
            pq.write_table(pa.Table.from_pydict(columns, schema=schema.data_schema(latent_shape, text)), handle)
        files.append(path)
    manifest = {"output": out, "files": files, "counts": {"read": rows, "written": rows, "rejected": 0},
                "models": {"kind": "random", "sd3_repo": None, "text": text.__dict__},
                "resolution": None, "buckets": [bucket.split("=", 1)[1]]}
    fs.pipe_file(join(root, schema.MANIFEST), json.dumps(manifest, indent=1).encode())
    return out
