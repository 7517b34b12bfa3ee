"""Deduplication without Ray: the faiss math (k-means, assignment, the range-search rule), the embeddings'
invariances, the TorchScript embedder's interface, the config checks, and preprocessing's reading of a dedup output."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from conf.checks import validate
from conf.dedup import DedupConf, EmbedderConf
from conf.preprocess import FiltersConf, ScoreFilterConf
from pipelines import schema
from pipelines.dedup import clusters
from pipelines.dedup.embedders import Descriptor, TorchScriptEmbedder, input_size, prepare
from pipelines.dedup.job import read_duplicates
from pipelines.dedup.stages import EmbedStage, data_files
from pipelines.stages import object_column, out_of_bounds
from pipelines.synthetic.shapes import make_sample
from pipelines.synthetic.tiny_models import build_tiny_copy_detector


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_range_search_keeps_the_first_and_claims_only_from_kept_items():
    # a ~ b (0.02), b ~ c (0.02), a and c apart (0.08); d far from all; e is an exact copy of a
    x = np.array([[1.0, 0.0], [np.cos(0.1), np.sin(0.1)], [np.cos(0.2), np.sin(0.2)], [0.0, 1.0], [1.0, 0.0]])
    found = clusters.find_duplicates(unit(x), threshold=0.03)
    assert dict(zip(found.item.tolist(), found.of.tolist(), strict=True)) == {1: 0, 4: 0}  # c is kept: b was claimed
    assert found.distance[found.item.tolist().index(4)] == pytest.approx(0.0, abs=1e-6)
    assert found.distance[0] == pytest.approx(2 - 2 * np.cos(0.1), rel=1e-4)
    # strict: a pair at exactly the threshold's distance is not a duplicate; nothing at all below a tiny one
    assert clusters.find_duplicates(unit(x[:2]), threshold=float(2 - 2 * np.cos(0.1)) * 0.999).item.size == 0


def test_kmeans_is_deterministic_for_a_seed_and_assigns_each_item_its_nearest_centre():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(4, 8)))
    x = unit(np.repeat(centres, 50, axis=0) + 0.05 * rng.normal(size=(200, 8)))
    a = clusters.train_centroids(x, 4, iters=10, seed=3)
    assert np.array_equal(a, clusters.train_centroids(x, 4, iters=10, seed=3))
    labels = clusters.assign(x, a)
    assert len(set(labels.tolist())) == 4 and all(len(set(labels[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(4))
    assert clusters.cluster_count(10, 16_000, 64) == 1 and clusters.cluster_count(100_000, 16_000, 64) == 1563
    assert clusters.cluster_count(10 ** 9, 16_000, 64) == 16_000


def jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_descriptor_embeds_copies_close_and_different_images_apart():
    cfg = EmbedderConf()
    model = Descriptor(cfg)
    images = [make_sample(11, i, 96).image for i in range(6)]

    def embed(image: Image.Image) -> np.ndarray:
        return model.embed(prepare(image, input_size(cfg))[None])[0]

    copies = []
    for image in images:
        original = embed(image)
        assert np.linalg.norm(original) == pytest.approx(1.0, abs=1e-5)
        w = image.width
        for variant in (jpeg(image), ImageOps.mirror(image), image.resize((72, 72)), image.crop((2, 2, w - 2, w - 2))):
            copies.append(float(np.sum((embed(variant) - original) ** 2)))
    x = np.stack([embed(im) for im in images])
    distinct = (2 - 2 * x @ x.T)[np.triu_indices(6, 1)]
    assert max(copies) < 0.1 < distinct.min()  # six distinct samples of the shapes data, and their copies


def test_torchscript_embedder_takes_sscds_interface(tmp_path):
    path = build_tiny_copy_detector(str(tmp_path / "sscd.pt"))
    cfg = EmbedderConf(kind="torchscript", path=path, image_size=64)
    model = TorchScriptEmbedder(cfg)
    assert model.dim == 32
    y = model.embed(np.stack([prepare(make_sample(1, i, 80).image, 64) for i in range(3)]))
    assert y.shape == (3, 32) and np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"embedder\.path=.*no such file"):
        TorchScriptEmbedder(EmbedderConf(kind="torchscript", path=str(tmp_path / "missing.pt")))


@pytest.mark.parametrize(("change", "message"), [
    ({"threshold": 5.0}, r"dedup\.threshold .* in \(0, 4\]"),
    ({"clusters": 0}, r"dedup\.clusters must be >= 1"),
    ({"task_num_cpus": 0}, r"dedup\.task_num_cpus must be > 0"),
    ({"embedder.kind": "torchscript"}, r"embedder\.kind=torchscript needs embedder\.path="),
    ({"embedder.kind": "clip"}, r"embedder\.kind must be one of \['descriptor', 'torchscript'\]"),
])
def test_dedup_config_errors_name_the_field(change, message):
    cfg = DedupConf(input="in", output="out")
    for key, value in change.items():
        owner, _, name = key.rpartition(".")
        setattr(getattr(cfg, owner) if owner else cfg, name, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_filters_need_a_model_and_a_bound_and_reject_outside_them():
    with pytest.raises(ValueError, match=r"filters\.nsfw\.model is set but neither min_score nor max_score"):
        FiltersConf(nsfw=ScoreFilterConf(model="nsfw.pt"))
    with pytest.raises(ValueError, match=r"filters\.aesthetic has a threshold but no model"):
        FiltersConf(aesthetic=ScoreFilterConf(min_score=5.0))
    on = FiltersConf(aesthetic=ScoreFilterConf(model="a.pt", min_score=5.0), nsfw=ScoreFilterConf(model="n.pt",
                                                                                                   max_score=0.5))
    assert list(on.active()) == ["aesthetic", "nsfw"] and FiltersConf().active() == {}
    assert out_of_bounds("aesthetic", 4.2, on.aesthetic) == "aesthetic 4.200 < min_score 5"
    assert out_of_bounds("nsfw", 0.9, on.nsfw) == "nsfw 0.900 > max_score 0.5"
    assert out_of_bounds("nsfw", float("nan"), on.nsfw).startswith("nsfw nan")
    assert out_of_bounds("aesthetic", 6.0, on.aesthetic) == ""


def test_read_duplicates_checks_the_output(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dedup=.* has no _manifest\.json"):
        read_duplicates(str(tmp_path))
    (tmp_path / schema.MANIFEST).write_text(json.dumps({"kind": "pairs"}))
    with pytest.raises(ValueError, match="is not a deduplication output"):
        read_duplicates(str(tmp_path))
    table = pa.table({"id": ["b"], "source": ["s"], "shard": [0], "row": [1], "cluster": [3], "duplicate_of": ["a"],
                      "duplicate_of_source": ["s0"], "distance": [0.01]}, schema=schema.DUPLICATES_SCHEMA)
    pq.write_table(table, tmp_path / "group-00000.parquet")
    files = [str(tmp_path / "group-00000.parquet")]
    (tmp_path / schema.MANIFEST).write_text(json.dumps({"kind": "dedup", "files": files}))
    _, read = read_duplicates(str(tmp_path))
    assert read.to_pylist() == table.to_pylist()


def test_uniform_images_are_not_deduplicated_and_data_files_ignore_the_outputs_own_path():
    cfg = EmbedderConf()
    size = input_size(cfg)
    red, blue = (np.full((size, size, 3), c, dtype=np.uint8) for c in ((255, 0, 0), (0, 0, 255)))
    shapes = prepare(make_sample(2, 0, 64).image, size)
    batch = {"id": np.array(["red", "blue", "shapes"], dtype=object), "row": np.array([0, 1, 2]),
             "stage": np.array(["", "", ""], dtype=object), "reason": np.array(["", "", ""], dtype=object),
             "pixels": object_column([red, blue, shapes])}
    out = EmbedStage(cfg, "cpu", 1)(batch)
    assert list(out["stage"]) == ["embed", "embed", ""] and "uniform image" in out["reason"][0]
    marker = {"files": ["/data/out/embeddings/data/shard-000000-00000000.parquet",
                        "/data/out/embeddings/rejects/shard-000000-00000003.parquet"]}
    assert data_files(marker) == marker["files"][:1]


def test_preprocessing_rejects_the_duplicate_row_even_when_ids_repeat(tmp_path):
    from conf.preprocess import PreprocessConf
    from pipelines.preprocess import known_duplicates
    from pipelines.sources import list_shards
    from pipelines.stages import read_rows

    folder = tmp_path / "images"
    folder.mkdir()
    image = make_sample(3, 0, 64).image
    image.save(folder / "a.png")
    jpeg(image).save(folder / "a.jpg")  # same id `a` as the PNG
    shards = list_shards(str(folder))
    table = pa.table({"id": ["a"], "source": [str(folder / "a.png")], "shard": [0], "row": [1], "cluster": [0],
                      "duplicate_of": ["a"], "duplicate_of_source": [str(folder / "a.jpg")], "distance": [0.001]},
                     schema=schema.DUPLICATES_SCHEMA)
    out = tmp_path / "dedup"
    out.mkdir()
    pq.write_table(table, out / "group-00000.parquet")
    (out / schema.MANIFEST).write_text(json.dumps({"kind": "dedup", "input": str(folder), "threshold": 0.1,
                                                   "shards": [list(s.paths) for s in shards],
                                                   "files": [str(out / "group-00000.parquet")]}))
    cfg = PreprocessConf(input=str(folder), output=str(tmp_path / "pre"), dedup=str(out))
    duplicates = known_duplicates(cfg, shards)
    rows = read_rows(shards[0].item(duplicates=duplicates[0]), None)
    assert [(r["id"], r["stage"]) for r in rows] == [("a", ""), ("a", "dedup")]
    assert rows[1]["reason"].startswith("duplicate of a (squared L2 0.001, threshold 0.1, cluster 0)")
    (out / schema.MANIFEST).write_text(json.dumps({"kind": "dedup", "input": "other", "shards": [], "files": []}))
    with pytest.raises(ValueError, match="was made from other input shards"):
        known_duplicates(cfg, shards)
