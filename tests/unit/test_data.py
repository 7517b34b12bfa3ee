"""Training input: the preprocessed dataset's spec, the start-up compatibility check, batch -> model inputs,
and the validation rows held out by id."""

import json
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model import FLAVORS, get_flavor
from model.conditioning import TINY_TEXT, TextEmbeddings, assemble_conditioning
from pipelines import schema
from workloads.train.data import TENSOR_COLUMNS, check_compatible, check_spec, read_spec, to_model_inputs
from workloads.train.holdout import drop_held_out, held_out, holdout_threshold
from workloads.train.streaming import Split, split_files, training_rows
from workloads.train.validation import read_val_set

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


def test_held_out_rows_are_chosen_by_id_alone():
    """crc32 of the id in [0, 1) below the threshold: reproducible, independent of order and neighbours."""
    ids = [f"0000-{i:06d}" for i in range(4000)]
    held = held_out(ids, 0.1)
    assert held.tolist() == [zlib.crc32(i.encode()) / 2**32 < 0.1 for i in ids]
    assert np.array_equal(held_out(ids[::-1], 0.1), held[::-1])
    assert not held_out(ids, 0.0).any() and np.all(held_out(ids, 0.2)[held])
    assert held_out([], 0.1).shape == (0,)


def test_the_hold_out_filter_imports_no_torch():
    """`drop_held_out` runs in Ray Data's read tasks and each run's split coordinators, which import its module in
    fresh processes: it and the data schema import neither torch nor the model (seconds of CPU per process)."""
    import subprocess
    import sys

    code = ("import sys, workloads.train.holdout, pipelines.schema; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'model'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("n", "fraction", "min_rows", "expected"), [
    (4000, 0.1, 1, 400), (16, 0.1, 1, 2), (16, 0.1, 2, 2), (3, 0.1, 1, 1), (5, 0.1, 2, 2), (4, 0.9, 1, 3)])
def test_the_threshold_holds_out_the_fraction_of_any_dataset_of_a_few_rows(n, fraction, min_rows, expected):
    ids = [f"img-{i}" for i in range(n)]
    threshold = holdout_threshold(ids, fraction, min_rows)
    held = held_out(ids, threshold)
    assert held.sum() == expected  # round(fraction * n), at least min_rows, at most n - 1
    assert holdout_threshold(list(reversed(ids)), fraction, min_rows) == threshold  # any file or row order
    hashes = np.array([zlib.crc32(i.encode()) / 2**32 for i in ids])
    assert hashes[held].max() < hashes[~held].min()  # the rows with the smallest id hashes


def test_a_grown_dataset_keeps_most_of_its_held_out_rows():
    ids = [f"0000-{i:06d}" for i in range(2000)]
    before = set(np.array(ids)[held_out(ids, holdout_threshold(ids, 0.1))])
    grown = ids + [f"0001-{i:06d}" for i in range(200)]
    after = set(np.array(grown)[held_out(grown, holdout_threshold(grown, 0.1))])
    assert len(before & after) > 0.9 * len(before)


def test_too_few_rows_to_hold_out_name_val_fraction():
    with pytest.raises(ValueError, match=r"loader.val_fraction=0.1 needs more than 1 rows .* has 1"):
        holdout_threshold(["only"], 0.1)
    with pytest.raises(ValueError, match=r"needs more than 2 rows to hold out 2"):
        holdout_threshold(["a", "b"], 0.1, min_rows=2)


def _split_dataset(tmp_path, ids: list[str]):
    """A one-bucket dataset whose rows have these ids, and its spec."""
    table = _table(len(ids), np.random.default_rng(1)).set_column(0, schema.ID, pa.array(ids))
    path = tmp_path / schema.DATA_DIR / "bucket=48x32" / "shard-000000-00000000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, row_group_size=7)
    manifest = {"output": str(tmp_path), "files": [str(path)], "models": {"text": {**TINY_TEXT.__dict__}},
                "counts": {"read": len(ids), "written": len(ids), "rejected": 0}}
    (tmp_path / schema.MANIFEST).write_text(json.dumps(manifest))
    return table, read_spec(str(tmp_path))


def test_val_fraction_splits_one_data_file_into_training_and_validation_rows(tmp_path):
    ids = [f"img-{i}" for i in range(60)]
    table, spec = _split_dataset(tmp_path, ids)
    split = split_files(spec, None, 0.25)
    assert split.val_source == "held-out rows" and split.train == split.val
    held = held_out(ids, split.holdout)
    assert held.sum() == 15  # a quarter of the 60 rows
    assert training_rows(split) == {"bucket=48x32": int((~held).sum())}
    latents = table.column(schema.LATENT).combine_chunks().to_numpy_ndarray()
    (group,) = read_val_set(split.val_data, split.val, samples=100, world_size=1, holdout=split.holdout)
    assert np.array_equal(group.columns[schema.LATENT], latents[held])  # the held-out rows, in file order
    (two,) = read_val_set(split.val_data, split.val, samples=100, world_size=2, holdout=split.holdout)
    assert np.array_equal(two.columns[schema.LATENT], latents[held][: held.sum() // 2 * 2])
    kept = drop_held_out(table, split.holdout)  # what each training read task keeps
    assert schema.ID not in kept.column_names and set(TENSOR_COLUMNS) <= set(kept.column_names)
    assert np.array_equal(kept.column(schema.LATENT).combine_chunks().to_numpy_ndarray(), latents[~held])


def test_val_data_and_val_fraction_zero_hold_out_nothing(tmp_path):
    _, spec = _split_dataset(tmp_path / "data", [f"img-{i}" for i in range(10)])
    _, val_spec = _split_dataset(tmp_path / "val", [f"val-{i}" for i in range(4)])
    split = split_files(spec, val_spec, 0.1)
    assert (split.train, split.val, split.val_source, split.holdout) == (
        spec.files_by_bucket, val_spec.files_by_bucket, "val_data", 0.0)
    assert training_rows(split) == {"bucket=48x32": 10}
    assert len(read_val_set(split.val_data, split.val, samples=100, world_size=1)[0]) == 4
    same = split_files(spec, None, 0.0)
    assert (same.val, same.val_source, same.holdout) == (spec.files_by_bucket, "training rows", 0.0)
    with pytest.raises(ValueError, match=r"loader.val_fraction must be in \[0, 1\)"):
        split_files(spec, None, 1.0)


def test_a_hold_out_that_empties_either_side_names_val_fraction(tmp_path):
    ids = [f"img-{i}" for i in range(5)]
    _, spec = _split_dataset(tmp_path / "data", ids)
    everything = Split(spec.location, spec.files_by_bucket, spec.location, spec.files_by_bucket, "held-out rows",
                       holdout=1.0)
    with pytest.raises(ValueError, match=r"loader.val_fraction\) holds out all 5 rows .* no training rows"):
        training_rows(everything)
    nothing = Split(spec.location, spec.files_by_bucket, spec.location, spec.files_by_bucket, "held-out rows",
                    holdout=1e-12)
    with pytest.raises(ValueError, match=r"holds out none of the dataset's 5 rows"):
        training_rows(nothing)
    one = holdout_threshold(ids, 0.1)
    with pytest.raises(ValueError, match=r"no validation rows: the rows held out by loader.val_fraction are fewer"):
        read_val_set(spec.location, spec.files_by_bucket, samples=8, world_size=2, holdout=one)
    two = split_files(spec, None, 0.1, min_rows=2)  # what the driver asks for 2 workers
    (group,) = read_val_set(two.val_data, two.val, samples=8, world_size=2, holdout=two.holdout)
    assert len(group) == 2
