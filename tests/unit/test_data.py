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
from workloads.train.data import (
    TENSOR_COLUMNS,
    check_compatible,
    check_spec,
    choose_captions,
    read_spec,
    synthetic_rows,
    to_model_inputs,
    training_columns,
)
from workloads.train.holdout import drop_held_out, held_out, holdout_threshold
from workloads.train.streaming import CaptionCollate, Split, split_files, training_rows
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


def _columns(n: int = 8) -> dict[str, np.ndarray]:
    """A batch as Ray's numpy format hands it to the collate function: the id and every tensor column."""
    table = _table(n, np.random.default_rng(1))
    return {schema.ID: np.array(table.column(schema.ID).to_pylist(), dtype=object)} | {
        c: table.column(c).combine_chunks().to_numpy_ndarray() for c in TENSOR_COLUMNS}


def _assembled(columns, kind):
    emb = TextEmbeddings(**{o: torch.from_numpy(columns[schema.embedding_column(kind, o)]).float()
                            for o in schema.ENCODER_OUTPUTS})
    return assemble_conditioning(emb, TINY_TEXT)


@pytest.mark.parametrize("kind", ["original", "synthetic"])
def test_caption_choice_and_layout(kind):
    columns = _columns()
    batch = CaptionCollate(seed=0, epoch=0, synthetic_prob=float(kind == "synthetic"))(columns)
    assert set(batch) == {schema.LATENT, *schema.ENCODER_OUTPUTS}  # one caption's embeddings, no id
    x0, context, pooled = to_model_inputs(batch, TINY_TEXT, drop_prob=0.0)
    assert x0.shape == (8, *LATENT_SHAPE) and x0.dtype == torch.float32
    want_context, want_pooled = _assembled(columns, kind)
    assert torch.equal(context, want_context) and torch.equal(pooled, want_pooled)
    assert context.shape == (8, TINY_TEXT.text_tokens, 64) and pooled.shape == (8, 64)


def test_half_mix_is_per_row_and_only_the_chosen_caption_leaves_the_host():
    columns = _columns(400)
    batch = CaptionCollate(seed=0, epoch=0, synthetic_prob=0.5)(columns)
    _, context, _ = to_model_inputs(batch, TINY_TEXT, drop_prob=0.0)
    (synthetic_context, _), (original_context, _) = _assembled(columns, "synthetic"), _assembled(columns, "original")
    took_synthetic = (context == synthetic_context).flatten(1).all(dim=1)
    took_original = (context == original_context).flatten(1).all(dim=1)
    assert bool((took_synthetic ^ took_original).all())  # every row is one caption, whole
    assert 0.4 < took_synthetic.float().mean().item() < 0.6
    text_bytes = sum(v.nbytes for k, v in columns.items() if k in schema.EMBEDDING_COLUMNS)
    assert sum(batch[o].nbytes for o in schema.ENCODER_OUTPUTS) == text_bytes // 2


def test_caption_draws_depend_on_id_seed_and_epoch_alone():
    """A resumed run, another worker count or another shuffle order draws the same captions; each epoch redraws."""
    ids = [f"s{i}" for i in range(1000)]
    draws = synthetic_rows(ids, seed=0, epoch=3, synthetic_prob=0.5)
    shuffled = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(synthetic_rows([ids[i] for i in shuffled], 0, 3, 0.5), draws[shuffled])
    assert np.array_equal(synthetic_rows(ids[:10], 0, 3, 0.5), draws[:10])  # a row's draw ignores its batch
    assert 0.45 < (draws != synthetic_rows(ids, 0, 4, 0.5)).mean() < 0.55  # another epoch: about half change
    assert 0.45 < (draws != synthetic_rows(ids, 1, 3, 0.5)).mean() < 0.55  # another seed
    assert not synthetic_rows(ids, 0, 3, 0.0).any() and synthetic_rows(ids, 0, 3, 1.0).all()


def test_training_reads_only_the_caption_kinds_it_can_draw():
    both = training_columns(0.5)
    assert both == TENSOR_COLUMNS
    assert training_columns(0.0) == (schema.LATENT, *(f"original_{o}" for o in schema.ENCODER_OUTPUTS))
    assert training_columns(1.0, pairs=True) == (schema.LATENT, schema.LOSER_LATENT,
                                                 *(f"synthetic_{o}" for o in schema.ENCODER_OUTPUTS))
    originals_only = {k: v for k, v in _columns().items() if not k.startswith("synthetic_")}
    batch = CaptionCollate(0, 0, synthetic_prob=0.0)(originals_only)  # a stream that read no synthetic column
    assert torch.equal(batch["t5"], torch.from_numpy(originals_only["original_t5"]))
    with pytest.raises(ValueError, match="synthetic_clip_l"):
        choose_captions(originals_only, np.ones(8, dtype=bool))


def test_encoder_dropout_is_per_sample():
    batch = CaptionCollate(0, 0, 0.0)(_columns(400))
    gen = torch.Generator().manual_seed(0)
    _, context, pooled = to_model_inputs(batch, TINY_TEXT, drop_prob=1.0, generator=gen)
    assert torch.count_nonzero(context) == 0 and torch.count_nonzero(pooled) == 0
    _, context, _ = to_model_inputs(batch, TINY_TEXT, drop_prob=0.463, generator=gen)
    t5_dropped = (context[:, TINY_TEXT.clip_tokens:] == 0).flatten(1).all(dim=1).float().mean().item()
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
    kept = drop_held_out(table, split.holdout)  # what each training read task keeps (the id: the caption draw)
    assert kept.column(schema.ID).to_pylist() == [i for i, h in zip(ids, held, strict=True) if not h]
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
