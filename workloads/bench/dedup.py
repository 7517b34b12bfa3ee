"""How well and how fast the deduplication job works on the embedded default: planted copies in shapes images.

1. Quality: `originals` distinct shapes images, `planted` of them with one copy of each kind (exact, JPEG q70, a 4%
   crop from each edge, a 3/4 resize, a mirror image). The job runs once, then again at each threshold of the sweep
   (only its range search reruns); for each: precision and recall of the planted copies, recall per kind, and the
   false-duplicate rate among the distinct images. At the job's threshold, also the recall an exact search over all
   embeddings (no clusters) gets, i.e. what the clusters' boundaries cost.
2. Speed: the job on `sizes` images each (fresh outputs): embedding images/s and k-means, assignment and range-search
   seconds, on this machine's local Ray.
Run: `python -m workloads.bench.dedup [originals=600 planted=120 sizes=[500,1000,2000,4000]]`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace

from hydra.core.config_store import ConfigStore

from conf.dedup import DedupConf
from pipelines.dedup import clusters
from pipelines.dedup.job import read_duplicates
from pipelines.dedup.job import run as dedup
from pipelines.dedup.stages import EMBED_DIR, data_files, read_items
from pipelines.output import completed_shards
from pipelines.storage import Location
from pipelines.synthetic.planted import score, write_planted
from workloads.runtime import cli, logger

LOG = logger("bench.dedup")


@dataclass
class BenchDedupConf:
    dedup: DedupConf = field(default_factory=lambda: DedupConf(input="", output=""))  # the job's settings
    originals: int = 600
    planted: int = 120
    size: int = 128  # image side
    thresholds: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4])
    sizes: list[int] = field(default_factory=lambda: [500, 1000, 2000, 4000])
    seed: int = 0
    out: str | None = None  # where to keep the images and outputs; None: a temporary folder
    result: str | None = None  # also write the figures as JSON here


def exact_recall(cfg: DedupConf, truth: dict, originals: int, threshold: float) -> dict:
    """The same rule over all embeddings as one cluster: what the job would find without cluster boundaries."""
    emb = Location.of(cfg.output).child(EMBED_DIR)
    files = [f for m in completed_shards(emb.uri, None).values() for f in data_files(m)]
    items, x = read_items(emb, files)
    found = clusters.find_duplicates(x, threshold)
    ids = items.column("id").to_pylist()
    rows = [{"id": ids[i], "duplicate_of": ids[j]} for i, j in zip(found.item, found.of, strict=True)]
    return score(truth, rows, originals)


def quality(cfg: BenchDedupConf, root: str) -> dict:
    images = f"{root}/planted"
    truth = write_planted(images, cfg.originals, cfg.planted, cfg.seed, cfg.size)
    job = replace(cfg.dedup, input=images, output=f"{root}/planted-dedup")
    sweep = []
    for threshold in cfg.thresholds:
        dedup(replace(job, threshold=threshold))
        sweep.append({"threshold": threshold, **score(truth, read_duplicates(job.output)[1].to_pylist(),
                                                      cfg.originals)})
    chosen = dedup(job)  # the job's own threshold (the embedder's default unless set)
    result = score(truth, read_duplicates(job.output)[1].to_pylist(), cfg.originals)
    return {"images": chosen["counts"]["images"], "clusters": chosen["clusters"], "threshold": chosen["threshold"],
            "at_threshold": result, "exact_search": exact_recall(job, truth, cfg.originals, chosen["threshold"]),
            "sweep": sweep}


def speed(cfg: BenchDedupConf, root: str) -> list[dict]:
    from pipelines.make_shapes import MakeShapesConf
    from pipelines.make_shapes import run as make_shapes

    rows = []
    for n in cfg.sizes:
        images = f"{root}/shapes-{n}"
        make_shapes(MakeShapesConf(out=images, n=n, seed=cfg.seed + 1, size=cfg.size, formats=["parquet"],
                                   shard_size=250))
        manifest = dedup(replace(cfg.dedup, input=f"{images}/parquet", output=f"{root}/speed-{n}"))
        last = manifest["last_run"]
        rows.append({"images": n, "clusters": manifest["clusters"],
                     "embed_images_per_s": n / last["embed_seconds"] if last["embed_seconds"] else float("nan"),
                     "embed_seconds": last["embed_seconds"],
                     "kmeans_seconds": last["kmeans_seconds"], "assign_seconds": last["assign_seconds"],
                     "search_seconds": last["search_seconds"], "duplicates": manifest["counts"]["duplicates"]})
    return rows


def report(q: dict, s: list[dict]) -> str:
    lines = [f"planted copies in {q['images']} shapes images ({q['clusters']} clusters):", "",
             "| threshold | precision | recall | exact | jpeg | crop | resize | flip | false-duplicate rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in q["sweep"]:
        k = r["recall_by_kind"]
        lines.append(f"| {r['threshold']:g} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     + " | ".join(f"{k[name]:.2f}" for name in ("exact", "jpeg", "crop", "resize", "flip"))
                     + f" | {r['false_duplicate_rate']:.3f} |")
    a, e = q["at_threshold"], q["exact_search"]
    lines += ["", f"at the job's threshold {q['threshold']:g}: precision {a['precision']:.3f}, recall {a['recall']:.3f}"
              f" (exact search over all embeddings: {e['recall']:.3f}), false-duplicate rate "
              f"{a['false_duplicate_rate']:.3f}", "",
              "| images | clusters | embed images/s | k-means s | assign s | range search s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['clusters']} | {r['embed_images_per_s']:.0f} | {r['kmeans_seconds']:.2f} | "
              f"{r['assign_seconds']:.2f} | {r['search_seconds']:.2f} |" for r in s]
    return "\n".join(lines)


def run(cfg: BenchDedupConf) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = cfg.out or tmp
        result = {"quality": quality(cfg, root), "speed": speed(cfg, root)}
    print(report(result["quality"], result["speed"]))
    if cfg.result:
        Location.of(cfg.result).fs.pipe_file(Location.of(cfg.result).root, json.dumps(result, indent=1).encode())
    return result


ConfigStore.instance().store(name="bench_dedup", node=BenchDedupConf)


def main() -> None:
    cli("bench_dedup", run, doc=__doc__)


if __name__ == "__main__":
    main()
