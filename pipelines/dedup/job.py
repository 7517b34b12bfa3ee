"""`python -m pipelines.dedup input=<images> output=<path or s3://>`: near-duplicate images, found the way the SD3
paper did (appendix E), as a Ray job.

1. embed: read shards -> decode (tasks) -> embedding model (autoscaling actor pool, GPUs where the cluster has them)
   -> write per shard; a marker per finished shard (preprocessing's rules: a killed run redoes unmarked shards);
2. k-means: faiss centroids from a seeded sample of the embeddings (one Ray task);
3. assign: each shard's embeddings to their nearest centroid (a Ray task per shard), written by cluster group;
4. range search: per group of clusters (a Ray task each), every item within `threshold` of an earlier kept item is
   its duplicate; rerunning with another threshold redoes only this step.
Writes `duplicates/*.parquet` (`schema.DUPLICATES_SCHEMA`) and `_manifest.json` (kind dedup, counts); the
preprocessing job's `dedup=<output>` skips the duplicates as rejects of stage `dedup`.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray

from conf.checks import validate
from conf.choices import IMAGE_FORMATS
from conf.dedup import DedupConf, register
from pipelines import schema
from pipelines.dedup import clusters
from pipelines.dedup.embedders import default_threshold, input_size
from pipelines.dedup.stages import (
    ASSIGN_DIR,
    CLUSTERS_DIR,
    EMBED_DIR,
    EmbedStage,
    data_files,
    decode_for_embedding,
    load_array,
    read_items,
    save_array,
    write_embeddings,
    write_parquet,
)
from pipelines.interrupt import Terminated, sigterm_stops
from pipelines.output import Progress, completed_shards, read_markers, remove_unfinished
from pipelines.runtime import JobStopped, cli, code_version, ensure_ray, logger
from pipelines.sources import Shard, list_shards
from pipelines.stages import read_rows
from pipelines.storage import Location, find_disk_full

LOG = logger("dedup")
SETTINGS = "_settings.json"  # what the embeddings depend on; another embedder needs another output
CENTROIDS = "centroids.npy"
CENTROIDS_DONE = "centroids.json"  # written after the centroids: their marker and settings


@dataclass
class Plan:
    """Everything checked before any cluster work."""

    shards: list[Shard]
    out: Location
    threshold: float
    settings: dict


def embed_settings(cfg: DedupConf, shards: list[Shard]) -> dict:
    """What the embeddings depend on (not the compute: a resume may use more actors)."""
    embedder = {k: v for k, v in asdict(cfg.embedder).items() if k != "stage"}
    return {"input": cfg.input, "shards": [list(s.paths) for s in shards], "embedder": embedder,
            "max_pixels": cfg.max_pixels}


def plan(cfg: DedupConf) -> Plan:
    """Validate the config, the input and any earlier output; fails with a clear error before Ray starts."""
    validate(cfg)
    out = Location.of(cfg.output, cfg.endpoint_url)
    if out.fs.isfile(out.root):
        raise FileExistsError(f"output={cfg.output!r} is an existing file: give a folder (new, or a previous "
                              "output to resume)")
    shards = list_shards(cfg.input, cfg.input_format, cfg.endpoint_url, cfg.folder_shard_size)
    if shards[0].format not in IMAGE_FORMATS:
        raise ValueError(f"dedup reads image datasets ({', '.join(IMAGE_FORMATS)}), not input_format="
                         f"{shards[0].format}")
    if cfg.embedder.kind == "torchscript":
        path = Location.of(cfg.embedder.path, cfg.endpoint_url)
        if not path.fs.exists(path.root):
            raise FileNotFoundError(f"embedder.path={cfg.embedder.path!r} does not exist")
    settings = json.loads(json.dumps(embed_settings(cfg, shards)))  # enums as their values, as read back
    if out.exists(SETTINGS) and json.loads(out.read_bytes(SETTINGS)) != settings:
        raise ValueError(f"output={cfg.output!r} holds the embeddings of another input or embedder "
                         f"({out.path(SETTINGS)}); give a new output")
    threshold = cfg.threshold if cfg.threshold is not None else default_threshold(cfg.embedder)
    return Plan(shards, out, threshold, settings)


def use_gpu(cfg: DedupConf) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def embed(cfg: DedupConf, p: Plan) -> dict:
    """Stage 1 over the shards without a marker; returns its timing."""
    where = p.out.child(EMBED_DIR)
    done = completed_shards(where.uri, cfg.endpoint_url)
    pending = [s for s in p.shards if s.index not in done]
    if not pending:
        return {"images": 0, "seconds": 0.0}
    remove_unfinished(where.uri, [s.index for s in pending], cfg.endpoint_url)
    p.out.write_bytes(SETTINGS, json.dumps(p.settings, indent=1).encode())
    gpu, stage = use_gpu(cfg), cfg.embedder.stage
    start = time.perf_counter()
    items = [s.item() for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_rows, fn_kwargs={"endpoint_url": cfg.endpoint_url}, num_cpus=cfg.decode_num_cpus)
    ds = ds.map_batches(decode_for_embedding, batch_size=stage.batch_size, num_cpus=cfg.decode_num_cpus,
                        fn_kwargs={"size": input_size(cfg.embedder), "max_pixels": cfg.max_pixels})
    ds = ds.map_batches(EmbedStage, fn_constructor_kwargs={"cfg": cfg.embedder, "device": "cuda" if gpu else "cpu",
                                                           "threads": stage.torch_threads},
                        compute=ray.data.ActorPoolStrategy(min_size=stage.min_actors, max_size=stage.max_actors),
                        batch_size=stage.batch_size, num_cpus=stage.num_cpus, num_gpus=1 if gpu else 0)
    ds = ds.map_batches(write_embeddings, fn_kwargs={"out": where}, batch_size=stage.batch_size,
                        num_cpus=cfg.decode_num_cpus)
    progress = Progress(where.uri, cfg.endpoint_url, {s.index: list(s.paths) for s in pending})
    progress.track(ds.iter_rows(), LOG)
    return {"images": progress.rows, "seconds": time.perf_counter() - start}


def _faiss_threads(num_cpus: float) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(num_cpus)))  # a Ray task uses the CPUs it holds, not the node's


@ray.remote
def _train_centroids(where: Location, files: dict[int, list[str]], n: int, k: int, cfg: DedupConf,
                     gpu: bool) -> np.ndarray:
    """A seeded sample of about `kmeans_sample` embeddings (a fixed fraction of each shard), then k-means."""
    _faiss_threads(cfg.task_num_cpus)
    fraction = min(1.0, cfg.kmeans_sample / max(n, 1))
    parts = []
    for shard in sorted(files):
        _, x = read_items(where, files[shard])
        keep = np.random.default_rng([cfg.seed, shard]).random(len(x)) < fraction
        parts.append(x[keep])
    kept = [q for q in parts if len(q)]
    x = np.concatenate(kept) if kept else read_items(where, files[min(files)])[1][:1]  # a tiny sample drew nothing
    return clusters.train_centroids(x, k, cfg.kmeans_iters, cfg.seed, gpu=gpu)


@ray.remote
def _assign_shard(emb: Location, out: Location, shard: int, files: list[str], centroids: np.ndarray,
                  clusters_per_task: int, num_cpus: float) -> dict:
    """One shard's items with their cluster, written per cluster group; then the shard's marker."""
    _faiss_threads(num_cpus)
    items, x = read_items(emb, files)
    written: dict[int, str] = {}
    if len(x):
        cluster = clusters.assign(x, centroids)
        for group in np.unique(cluster // clusters_per_task).tolist():
            rows = np.flatnonzero(cluster // clusters_per_task == group)
            table = items.take(pa.array(rows)).append_column(schema.CLUSTER, pa.array(cluster[rows]))
            table = table.append_column("embedding", pa.FixedShapeTensorArray.from_numpy_ndarray(x[rows]))
            written[group] = write_parquet(out, f"group={group:05d}/{schema.shard_prefix(shard)}0.parquet", table)
    marker = {"shard": shard, "items": len(x), "files": written}
    out.write_bytes(f"{schema.MARKERS_DIR}/shard-{shard:06d}.json", json.dumps(marker).encode())
    return marker


@ray.remote
def _search_group(assigned: Location, out: Location, group: int, files: list[str], threshold: float,
                  num_cpus: float) -> dict:
    """Range search within each cluster of one group; writes the group's duplicates, then its marker."""
    _faiss_threads(num_cpus)
    items, x = read_items(assigned, files)
    found: dict[str, list] = {c.name: [] for c in schema.DUPLICATES_SCHEMA}
    sizes = []
    cluster_of = items.column(schema.CLUSTER).to_numpy() if len(x) else np.zeros(0, dtype=np.int64)
    ids, sources = items.column(schema.ID).to_pylist(), items.column(schema.SOURCE).to_pylist()
    shard_of, row_of = (items.column(c).to_numpy() if len(x) else [] for c in (schema.SHARD, schema.ROW))
    for cluster in np.unique(cluster_of).tolist():
        members = np.flatnonzero(cluster_of == cluster)  # input order: read_items sorts by (shard, row)
        sizes.append(len(members))
        dup = clusters.find_duplicates(x[members], threshold)
        for j, k, d in zip(members[dup.item], members[dup.of], dup.distance, strict=True):
            found[schema.ID].append(ids[j])
            found[schema.SOURCE].append(sources[j])
            found[schema.SHARD].append(int(shard_of[j]))
            found[schema.ROW].append(int(row_of[j]))
            found[schema.CLUSTER].append(cluster)
            found[schema.DUPLICATE_OF].append(ids[k])
            found["duplicate_of_source"].append(sources[k])
            found[schema.DISTANCE].append(float(d))
    path = write_parquet(out, f"group-{group:05d}.parquet", pa.table(found, schema=schema.DUPLICATES_SCHEMA))
    marker = {"group": group, "threshold": threshold, "items": len(x), "clusters": len(sizes),
              "largest_cluster": max(sizes, default=0), "duplicates": len(found[schema.ID]), "file": path}
    out.write_bytes(f"{schema.MARKERS_DIR}/group-{group:05d}.json", json.dumps(marker).encode())
    return marker


def _wait(refs: list, what: str) -> list[dict]:
    results, pending = [], list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(ready[0]))
        if len(results) == len(refs) or len(results) % max(1, len(refs) // 10) == 0:
            LOG.info(f"{what}: {len(results)}/{len(refs)}")
    return results


def centroids(cfg: DedupConf, p: Plan, embedded: dict[int, dict]) -> tuple[np.ndarray, dict]:
    """Stage 2: the k-means centroids, trained unless the recorded ones match these settings. New centroids
    invalidate the assignments and duplicates made from the old ones."""
    n = sum(m["rows_written"] for m in embedded.values())
    if n == 0:
        raise ValueError(f"no image of input={cfg.input!r} could be embedded (see {p.out.path(EMBED_DIR)}/rejects)")
    k = clusters.cluster_count(n, cfg.clusters, cfg.points_per_cluster)
    settings = {"items": n, "clusters": k, "kmeans_sample": cfg.kmeans_sample, "kmeans_iters": cfg.kmeans_iters,
                "seed": cfg.seed, "clusters_per_task": cfg.clusters_per_task}
    where = p.out.child(CLUSTERS_DIR)
    if where.exists(CENTROIDS_DONE) and json.loads(where.read_bytes(CENTROIDS_DONE))["settings"] == settings:
        centres = load_array(where, CENTROIDS)
        return centres, {"seconds": 0.0, **settings, "clusters": len(centres)}
    if where.exists(CENTROIDS_DONE):  # first, so a run that dies below never pairs old settings with new centroids
        where.fs.rm_file(where.path(CENTROIDS_DONE))
    for stale in (ASSIGN_DIR, schema.DUPLICATES_DIR):
        if p.out.exists(stale):
            p.out.fs.rm(p.out.path(stale), recursive=True)
    start = time.perf_counter()
    files = {shard: data_files(m) for shard, m in embedded.items()}
    gpu = use_gpu(cfg) and clusters.has_gpu_faiss()
    task = _train_centroids.options(num_cpus=cfg.task_num_cpus, num_gpus=1 if gpu else 0)
    result = ray.get(task.remote(p.out.child(EMBED_DIR), files, n, k, cfg, gpu))
    save_array(where, CENTROIDS, result)
    where.write_bytes(CENTROIDS_DONE, json.dumps({"settings": settings, "dim": int(result.shape[1])}).encode())
    seconds = time.perf_counter() - start
    LOG.info(f"k-means: {len(result)} clusters of {n} embeddings in {seconds:.1f} s")
    return result, {"seconds": seconds, **settings, "clusters": len(result)}


def assign(cfg: DedupConf, p: Plan, embedded: dict[int, dict], centres: np.ndarray) -> tuple[list[dict], float]:
    """Stage 3 for the shards without an assignment marker; returns every shard's marker."""
    where = p.out.child(ASSIGN_DIR)
    done = {m["shard"]: m for m in read_markers(where)}
    pending = [s for s in sorted(embedded) if s not in done]
    start = time.perf_counter()
    if pending:
        centres_ref = ray.put(centres)
        task = _assign_shard.options(num_cpus=cfg.task_num_cpus)
        refs = [task.remote(p.out.child(EMBED_DIR), where, s, data_files(embedded[s]), centres_ref,
                            cfg.clusters_per_task, cfg.task_num_cpus) for s in pending]
        done.update((m["shard"], m) for m in _wait(refs, "assigned shards"))
    return [done[s] for s in sorted(embedded)], time.perf_counter() - start


def search(cfg: DedupConf, p: Plan, assigned: list[dict]) -> tuple[list[dict], float]:
    """Stage 4 for the groups without a marker at this threshold."""
    by_group: dict[int, list[str]] = {}
    for marker in assigned:
        for group, path in marker["files"].items():  # JSON keys: the group as a string
            by_group.setdefault(int(group), []).append(path)
    where = p.out.child(schema.DUPLICATES_DIR)
    done = {m["group"]: m for m in read_markers(where) if m["threshold"] == p.threshold}
    pending = sorted(set(by_group) - set(done))
    start = time.perf_counter()
    if pending:
        task = _search_group.options(num_cpus=cfg.task_num_cpus)
        refs = [task.remote(p.out.child(ASSIGN_DIR), where, g, sorted(by_group[g]), p.threshold, cfg.task_num_cpus)
                for g in pending]
        for marker in _wait(refs, "searched cluster groups"):
            done[marker["group"]] = marker
    return [done[g] for g in sorted(by_group)], time.perf_counter() - start


def write_manifest(cfg: DedupConf, p: Plan, embedded: dict[int, dict], kmeans: dict, groups: list[dict],
                   last_run: dict) -> dict:
    counts = {"images": sum(m["rows_read"] for m in embedded.values()),
              "embedded": sum(m["rows_written"] for m in embedded.values()),
              "failed": sum(m["rows_rejected"] for m in embedded.values()),
              "duplicates": sum(g["duplicates"] for g in groups)}
    counts["kept"] = counts["embedded"] - counts["duplicates"]
    manifest = {
        "kind": schema.DEDUP_KIND, "input": cfg.input, "output": cfg.output, "input_format": p.shards[0].format,
        "folder_shard_size": cfg.folder_shard_size, "shards": [list(s.paths) for s in p.shards],
        "embedder": p.settings["embedder"], "threshold": p.threshold, "seed": cfg.seed,
        "clusters": kmeans["clusters"], "largest_cluster": max((g["largest_cluster"] for g in groups), default=0),
        "counts": counts, "files": [g["file"] for g in groups], "code_version": code_version(), "last_run": last_run,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    p.out.write_bytes(schema.MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def run(cfg: DedupConf) -> dict:
    """Run the unfinished stages, then write the manifest; returns it."""
    start = time.perf_counter()
    p = plan(cfg)
    stage = cfg.embedder.stage  # a local Ray fits the actor pool and a read, a decode and a write task at once
    ensure_ray(min_cpus=stage.num_cpus * stage.min_actors + 3 * cfg.decode_num_cpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.raise_original_map_exception = True  # a stage's DiskFull reaches the handler below as itself
    try:
        with sigterm_stops():
            embedding = embed(cfg, p)
            embedded = completed_shards(p.out.child(EMBED_DIR).uri, cfg.endpoint_url)
            centres, kmeans = centroids(cfg, p, embedded)
            assigned, assign_seconds = assign(cfg, p, embedded, centres)
            groups, search_seconds = search(cfg, p, assigned)
    except Terminated:
        LOG.warning(f"stopped by SIGTERM: the finished shards and groups are kept in {cfg.output}; run the same "
                    "command to finish the rest")
        return {"stopped": True}
    except Exception as error:
        if (full := find_disk_full(error)) is None:
            raise
        raise JobStopped(f"{full} (the finished shards and groups are kept)") from None
    last_run = {"embed_images": embedding["images"], "embed_seconds": embedding["seconds"],
                "kmeans_seconds": kmeans["seconds"], "assign_seconds": assign_seconds,
                "search_seconds": search_seconds, "seconds": time.perf_counter() - start}
    manifest = write_manifest(cfg, p, embedded, kmeans, groups, last_run)
    c = manifest["counts"]
    LOG.info(f"{c['images']} images: {c['duplicates']} duplicates, {c['kept']} kept, {c['failed']} not embedded "
             f"({manifest['clusters']} clusters, threshold {p.threshold:g}) in {last_run['seconds']:.0f} s; "
             f"manifest {p.out.path(schema.MANIFEST)}")
    return manifest


def read_duplicates(where: str, endpoint_url: str | None = None) -> tuple[dict, pa.Table]:
    """A finished dedup output's manifest and its duplicates table; fails naming what is missing."""
    loc = Location.of(where, endpoint_url)
    if not loc.exists(schema.MANIFEST):
        raise FileNotFoundError(f"dedup={where!r} has no {schema.MANIFEST}: not a finished `pipelines.dedup` output")
    manifest = json.loads(loc.read_bytes(schema.MANIFEST))
    if manifest.get("kind") != schema.DEDUP_KIND:
        raise ValueError(f"dedup={where!r} is not a deduplication output (manifest kind {manifest.get('kind')!r})")
    import pyarrow.parquet as pq

    tables = [pq.read_table(pa.BufferReader(loc.fs.cat_file(f)), schema=schema.DUPLICATES_SCHEMA)
              for f in manifest["files"]]
    table = pa.concat_tables(tables) if tables else schema.DUPLICATES_SCHEMA.empty_table()
    return manifest, table


register()


def main() -> None:
    cli("dedup", run, doc=__doc__)
