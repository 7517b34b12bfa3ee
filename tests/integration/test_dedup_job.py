"""The deduplication job on the session's Ray: planted copies found, preprocessing skipping them (and the score
filters) as recorded rejects, and resumption on S3 after what a killed run leaves behind."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from support import PLANTED_ORIGINALS

from conf.dedup import DedupConf, EmbedderConf
from conf.preprocess import ComputeConf, FiltersConf, ModelsConf, PreprocessConf, ScoreFilterConf, StageConf
from pipelines import schema
from pipelines.dedup.job import read_duplicates
from pipelines.dedup.job import run as dedup
from pipelines.dedup.stages import data_files
from pipelines.preprocess import run as preprocess
from pipelines.storage import Location
from pipelines.synthetic.planted import score
from pipelines.synthetic.tiny_models import build_tiny_scorer


def dedup_conf(input: str, output: str, **changes) -> DedupConf:
    stage = StageConf(batch_size=16, num_cpus=0.5)
    return replace(DedupConf(input=input, output=output, folder_shard_size=16, points_per_cluster=16,
                             clusters_per_task=2, embedder=EmbedderConf(stage=stage), decode_num_cpus=0.25,
                             task_num_cpus=0.5), **changes)


def duplicates_of(output: str) -> list[dict]:
    return sorted(read_duplicates(output)[1].to_pylist(), key=lambda d: d["id"])


@pytest.mark.usefixtures("ray_local")
def test_dedup_finds_planted_copies_and_preprocessing_skips_them(planted, tmp_path):
    folder, truth = planted
    manifest = dedup(dedup_conf(folder, str(tmp_path / "dedup")))
    c = manifest["counts"]
    assert (c["images"], c["embedded"], c["failed"]) == (71, 70, 1)
    assert manifest["clusters"] == 5 and c["kept"] == 70 - c["duplicates"]
    found = duplicates_of(str(tmp_path / "dedup"))
    quality = score(truth, found, PLANTED_ORIGINALS)
    assert all(quality["recall_by_kind"][k] == 1.0 for k in ("exact", "jpeg", "resize", "flip")), quality
    assert quality["recall_by_kind"]["crop"] >= 0.5 and quality["precision"] >= 0.8, quality

    # preprocessing skips the duplicates and filters by a (random) aesthetic score, every row accounted for
    scorer = build_tiny_scorer(str(tmp_path / "aesthetic.pt"))
    stage = StageConf(batch_size=16, num_cpus=0.5)
    cfg = PreprocessConf(
        input=folder, output=str(tmp_path / "pre"), resolution=64, folder_shard_size=16, dedup=str(tmp_path / "dedup"),
        filters=FiltersConf(aesthetic=ScoreFilterConf(model=scorer, min_score=-0.12, size=32)),
        models=ModelsConf(kind="tiny", tiny_dir=str(tmp_path / "tiny"), caption_max_new_tokens=4),
        compute=ComputeConf(decode_num_cpus=0.25, decode_batch_size=16, write_batch_size=16, vae=stage, caption=stage,
                            text=stage, filters=stage))
    pre = preprocess(cfg)
    counts, rejected = pre["counts"], pre["rejected_by_stage"]
    assert counts["read"] == 71 and counts["read"] == counts["written"] + counts["rejected"]
    assert rejected["dedup"] == c["duplicates"] and rejected["decode"] == 1 and rejected.get("filter", 0) >= 1
    rejects = [r for p in pre["files"] if f"/{schema.REJECTS_DIR}/" in p for r in pq.read_table(p).to_pylist()]
    assert all(r["reason"].startswith("duplicate of ") for r in rejects if r["stage"] == "dedup")
    scores = [s for p in pre["files"] if f"/{schema.DATA_DIR}/" in p
              for s in pq.read_table(p, columns=["score_aesthetic"]).column(0).to_pylist()]
    assert len(scores) == counts["written"] and min(scores) >= -0.12

    with pytest.raises(ValueError, match="was made from other input shards"):
        preprocess(PreprocessConf(input=folder, output=str(tmp_path / "pre2"), dedup=str(tmp_path / "dedup")))


@pytest.mark.usefixtures("ray_local")
def test_dedup_on_s3_resumes_what_a_killed_run_left_and_reruns_only_the_search_for_a_new_threshold(planted, s3,
                                                                                                   tmp_path):
    folder, _ = planted
    local = Location.of(folder)
    remote_in = Location.of(s3.uri("dedup-input"))
    remote_in.fs.put(local.root + "/", remote_in.root, recursive=True)
    out = s3.uri("dedup-out")
    first = dedup(dedup_conf(remote_in.uri, out))
    expected = duplicates_of(out)
    assert first["counts"]["duplicates"] == len(expected) > 0

    # what a kill leaves: a shard's embeddings without their marker (and a half-written file), a cut-off group marker
    where = Location.of(out)
    markers = sorted(where.fs.find(where.path("embeddings", schema.MARKERS_DIR)))
    marker = json.loads(where.fs.cat_file(markers[1]))
    where.fs.rm_file(markers[1])
    stray = where.path("embeddings", schema.DATA_DIR, f"{schema.shard_prefix(marker['shard'])}99999999.parquet")
    where.fs.pipe_file(stray, b"PAR1 cut")
    group_markers = sorted(where.fs.find(where.path(schema.DUPLICATES_DIR, schema.MARKERS_DIR)))
    assert len(group_markers) >= 2  # one cut, the others kept as they are
    finished = {path: where.fs.cat_file(path) for path in group_markers}
    group_marker = group_markers[0]
    where.fs.pipe_file(group_marker, b'{"group": 0, "thre')
    again = dedup(dedup_conf(remote_in.uri, out))
    assert again["last_run"]["embed_images"] == marker["rows_read"] and again["last_run"]["kmeans_seconds"] == 0
    assert duplicates_of(out) == expected  # same embeddings, same seed: same centroids and duplicates
    where.refreshed()
    # the half-written file went with the rest of its unmarked shard's output, which was written again
    assert not where.fs.exists(stray)
    redone = json.loads(where.fs.cat_file(markers[1]))
    counts = ("rows_read", "rows_written", "rows_rejected")
    assert [redone[k] for k in counts] == [marker[k] for k in counts]
    name = lambda path: path.rsplit("/", 1)[-1]  # noqa: E731
    on_disk = {name(p) for p in where.fs.find(where.path("embeddings", schema.DATA_DIR))
               if name(p).startswith(schema.shard_prefix(marker["shard"]))}
    assert on_disk and on_disk == {name(f) for f in data_files(redone)}
    # the cut group marker's group was searched again (a whole marker, the same result); the others were not
    assert again["last_run"]["search_seconds"] > 0
    assert json.loads(where.fs.cat_file(group_marker)) == json.loads(finished[group_marker])
    assert {p: where.fs.cat_file(p) for p in group_markers if p != group_marker} == \
        {p: data for p, data in finished.items() if p != group_marker}

    tighter = dedup(dedup_conf(remote_in.uri, out, threshold=0.01))
    assert tighter["last_run"]["embed_images"] == 0 and tighter["last_run"]["kmeans_seconds"] == 0
    assert tighter["threshold"] == 0.01 and tighter["counts"]["duplicates"] < len(expected)
    assert {d["id"] for d in duplicates_of(out)} <= {d["id"] for d in expected}
    with pytest.raises(ValueError, match="holds the embeddings of another input or embedder"):
        dedup(dedup_conf(remote_in.uri, out, embedder=EmbedderConf(thumbnail=8)))
