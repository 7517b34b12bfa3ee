"""Training input: the preprocessed dataset's spec, the start-up compatibility check, batch -> model inputs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model import FLAVORS, get_flavor
from model.conditioning import TINY_TEXT, TextEmbeddings, assemble_conditioning
from pipelines import schema
from workloads.train.data import check_compatible, check_spec, read_spec, to_model_inputs

LATENT_SHAPE = (16, 4, 6)


def _table(n: int, rng: np.random.Generator) -> pa.Table:
    shapes = schema.embedding_shapes(TINY_TEXT)
    columns = {
        schema.ID: [f"s{i}" for i in range(n)], schema.SOURCE: ["x"] * n, schema.CAPTION: ["a"] * n,
        schema.SYNTHETIC_CAPTION: ["b"] * n, schema.WIDTH: [48] * n, schema.HEIGHT: [32] * n,
        schema.LATENT: schema.tensor_column(rng.standard_normal((n, *LATENT_SHAPE)), LATENT_SHAPE),
    }
    for column in schema.EMBEDDING_COLUMNS:
        shape = shapes[column.split("_", 1)[1]]
        columns[column] = schema.tensor_column(rng.standard_normal((n, *shape)), shape)
    return pa.Table.from_pydict(columns, schema=schema.data_schema(LATENT_SHAPE, TINY_TEXT))


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / schema.DATA_DIR / "bucket=48x32" / "shard-000000-00000000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(_table(6, np.random.default_rng(0)), path)
    manifest = {"output": str(tmp_path), "files": [str(path)], "counts": {"read": 6, "written": 6, "rejected": 0},
                "models": {"text": {**TINY_TEXT.__dict__}}}
    (tmp_path / schema.MANIFEST).write_text(json.dumps(manifest))
    return tmp_path, path


def test_spec_lists_files_by_bucket_and_text_widths(dataset):
    root, path = dataset
    spec = read_spec(str(root))
    assert spec.files_by_bucket == {"bucket=48x32": [str(path)]}
    assert spec.text == TINY_TEXT
    check_spec(spec, FLAVORS["debug"])


def test_moved_dataset_reads_from_its_new_place(dataset, tmp_path_factory):
    import shutil

    root, path = dataset
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(root, moved)
    spec = read_spec(str(moved))
    assert spec.files_by_bucket == {"bucket=48x32": [str(moved / path.relative_to(root))]}


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run pipelines\.preprocess"):
        read_spec(str(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "column"),
    [({"in_channels": 4}, "'latent' has 16 channels"), ({"pooled_dim": 2048}, "'original_clip_l_pooled'"),
     ({"context_dim": 48}, "'original_t5'"), ({"pos_embed_max_size": 2}, "'latent' is 4x6")],
)
def test_mismatch_names_the_column(dataset, overrides, column):
    _, path = dataset
    with pytest.raises(ValueError, match=column):
        check_compatible(pq.read_schema(path), get_flavor("debug", **overrides))


def test_missing_column_is_named(dataset):
    _, path = dataset
    table = pq.read_table(path).drop_columns(["synthetic_t5"])
    with pytest.raises(ValueError, match="synthetic_t5"):
        check_compatible(table.schema, FLAVORS["debug"])


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    table = _table(n, np.random.default_rng(1))
    return {c: torch.from_numpy(table.column(c).combine_chunks().to_numpy_ndarray()) for c in
            (schema.LATENT, *schema.EMBEDDING_COLUMNS)}


def _assembled(batch, kind):
    emb = TextEmbeddings(**{o: batch[schema.embedding_column(kind, o)].float() for o in schema.ENCODER_OUTPUTS})
    return assemble_conditioning(emb, TINY_TEXT)


@pytest.mark.parametrize("kind", ["original", "synthetic"])
def test_caption_choice_and_layout(kind):
    batch = _batch()
    x0, context, pooled = to_model_inputs(batch, TINY_TEXT, synthetic_prob=float(kind == "synthetic"), drop_prob=0.0)
    assert x0.shape == (8, *LATENT_SHAPE) and x0.dtype == torch.float32
    want_context, want_pooled = _assembled(batch, kind)
    assert torch.equal(context, want_context) and torch.equal(pooled, want_pooled)
    assert context.shape == (8, 154, 64) and pooled.shape == (8, 64)


def test_half_mix_and_dropout_are_per_sample():
    batch = _batch(400)
    gen = torch.Generator().manual_seed(0)
    _, context, pooled = to_model_inputs(batch, TINY_TEXT, synthetic_prob=0.5, drop_prob=0.0, generator=gen)
    synthetic_context, _ = _assembled(batch, "synthetic")
    chose_synthetic = (context == synthetic_context).flatten(1).all(dim=1).float().mean().item()
    assert 0.4 < chose_synthetic < 0.6
    _, context, pooled = to_model_inputs(batch, TINY_TEXT, drop_prob=1.0, generator=gen)
    assert torch.count_nonzero(context) == 0 and torch.count_nonzero(pooled) == 0
    _, context, _ = to_model_inputs(batch, TINY_TEXT, drop_prob=0.463, generator=gen)
    t5_dropped = (context[:, 77:] == 0).flatten(1).all(dim=1).float().mean().item()
    assert 0.38 < t5_dropped < 0.55
