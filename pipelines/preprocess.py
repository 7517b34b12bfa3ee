"""`python -m pipelines.preprocess input=... output=...`: images and captions -> VAE latents, synthetic
captions and CLIP-L / CLIP-G / T5 embeddings as Parquet, on Ray Data.

read shards (tasks) -> decode + resize (tasks) -> caption, VAE, text encoders (autoscaling actor pools)
-> write per shard and bucket (tasks) -> the driver writes a completion marker per finished shard.
With `models.synthetic_captions=input` the synthetic captions are the input's own and no captioner runs.
Runs unchanged on a laptop (a local Ray) and on a cluster (`RAY_ADDRESS`).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from transformers import AutoConfig, CLIPTokenizerFast

from conf.checks import validate
from conf.preprocess import PreprocessConf, StageConf, register
from model.conditioning import TextConditioningConfig
from pipelines import schema
from pipelines.decode import DecodeLimits, parse_buckets
from pipelines.encoders import caption_tokens
from pipelines.interrupt import Terminated, sigterm_stops
from pipelines.output import Progress, completed_shards, remove_unfinished, write_batch
from pipelines.runtime import JobStopped, cli, code_version, ensure_ray, logger
from pipelines.sources import Shard, list_shards
from pipelines.stages import CaptionStage, ScoreStage, TextStage, VAEStage, copy_caption, decode_batch, read_rows
from pipelines.storage import Location, filesystem, find_disk_full, join, write_bytes
from pipelines.synthetic.tiny_models import build_tiny_models

LOG = logger("preprocess")


@dataclass
class Plan:
    """Everything checked before any cluster work."""

    shards: list[Shard]
    limits: DecodeLimits
    repo: str  # diffusers SD3 layout: vae, text_encoder(_2, _3), tokenizer(_2, _3)
    captioner: str | None  # None when no captioner runs (preference pairs, `models.synthetic_captions=input`)
    text: TextConditioningConfig
    duplicates: dict[int, str] = field(default_factory=dict)  # shard -> JSON {row: reason} of a dedup output


def text_dims(repo: str) -> TextConditioningConfig:
    """Encoder widths and token count from the configs in the SD3 layout (no weights loaded)."""
    clip_l = AutoConfig.from_pretrained(repo, subfolder="text_encoder")
    clip_g = AutoConfig.from_pretrained(repo, subfolder="text_encoder_2")
    t5 = AutoConfig.from_pretrained(repo, subfolder="text_encoder_3")
    tokenizer = CLIPTokenizerFast.from_pretrained(repo, subfolder="tokenizer")
    return TextConditioningConfig.of_encoders(clip_l.hidden_size, clip_g.hidden_size, t5.d_model,
                                              caption_tokens(tokenizer, clip_l.max_position_embeddings))


def plan(cfg: PreprocessConf) -> Plan:
    """Validate the config and the input; fails with a clear error before Ray starts."""
    validate(cfg)  # the schema's own checks, again for configs made or changed in code
    out_fs, out_path = filesystem(cfg.output, cfg.endpoint_url)
    if out_fs.isfile(out_path):  # else the job's first write fails, well after Ray and the models started
        raise FileExistsError(f"output={cfg.output!r} is an existing file: give a folder (new, or a previous "
                              "output to resume)")
    limits = DecodeLimits(parse_buckets(cfg.resolution, cfg.buckets), cfg.max_pixels, cfg.min_side,
                          cfg.max_aspect, cfg.max_caption_chars)
    shards = list_shards(cfg.input, cfg.input_format, cfg.endpoint_url, cfg.folder_shard_size)
    duplicates = known_duplicates(cfg, shards) if cfg.dedup else {}
    if cfg.models.kind == "tiny":
        tiny = build_tiny_models(os.path.expanduser(cfg.models.tiny_dir), latent_channels=cfg.models.latent_channels)
        repo, captioner = tiny.repo, tiny.captioner
    else:
        repo, captioner = cfg.models.sd3_repo, cfg.models.captioner
    if shards[0].format == "pairs" or cfg.models.synthetic_captions == "input":
        captioner = None  # a pair's synthetic caption is its prompt; `input` reads them from the input
    try:
        text = text_dims(repo)
    except OSError as err:
        raise OSError(f"cannot load the encoders of models.sd3_repo={repo!r}: {err}") from err
    for name, f in cfg.filters.active().items():
        model = Location.of(f.model, cfg.endpoint_url)
        if not model.fs.isfile(model.root):
            raise FileNotFoundError(f"filters.{name}.model={f.model!r}: no such file")
    return Plan(shards, limits, repo, captioner, text, duplicates)


def known_duplicates(cfg: PreprocessConf, shards: list[Shard]) -> dict[int, str]:
    """The duplicates a `pipelines.dedup` output found in this input, as each shard's JSON {row: reject reason};
    fails unless it was made from the same input shards."""
    # imported here: the deduplication job pulls in faiss, which a run without `dedup=` never needs
    from pipelines.dedup.job import read_duplicates

    manifest, table = read_duplicates(cfg.dedup, cfg.endpoint_url)
    if manifest["shards"] != [list(s.paths) for s in shards]:
        raise ValueError(f"dedup={cfg.dedup!r} was made from other input shards (its input {manifest['input']!r}, "
                         f"{len(manifest['shards'])} shards; here {cfg.input!r}, {len(shards)} shards): run "
                         f"pipelines.dedup on this input with folder_shard_size={cfg.folder_shard_size}")
    by_shard: dict[int, dict[str, str]] = {}
    for row in table.to_pylist():  # by row: ids need not be unique within a shard (a.png and a.jpg are both `a`)
        by_shard.setdefault(row[schema.SHARD], {})[str(row[schema.ROW])] = (
            f"duplicate of {row[schema.DUPLICATE_OF]} (squared L2 {row[schema.DISTANCE]:.3f}, threshold "
            f"{manifest['threshold']:g}, cluster {row[schema.CLUSTER]})")
    return {shard: json.dumps(found) for shard, found in by_shard.items()}


def _actor_args(stage: StageConf, use_gpu: bool) -> dict:
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=stage.min_actors, max_size=stage.max_actors),
        "batch_size": stage.batch_size, "num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus if use_gpu else 0,
    }


def use_gpu(cfg: PreprocessConf) -> bool:
    """The configured choice, or whether the connected cluster has GPUs now."""
    if cfg.compute.use_gpu is not None:
        return cfg.compute.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def local_cpus(cfg: PreprocessConf, p: Plan) -> float:
    """Logical CPUs a local Ray needs so every actor pool and a read, a decode and a write task fit at once (else the
    pipeline waits forever on a machine with fewer cores)."""
    c = cfg.compute
    pools = [c.vae, c.text] + ([c.caption] if p.captioner else [])
    pools += [c.filters] if cfg.filters.active() else []
    return sum(stage.num_cpus * stage.min_actors for stage in pools) + 3 * c.decode_num_cpus


def build_dataset(cfg: PreprocessConf, p: Plan, pending: list[Shard]) -> ray.data.Dataset:
    """The streaming pipeline over the pending shards; yields one summary row per written file group."""
    gpu = use_gpu(cfg)
    device = "cuda" if gpu else "cpu"
    c, m = cfg.compute, cfg.models
    items = [s.item(duplicates=p.duplicates.get(s.index, "")) for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    synthetic = m.synthetic_captions == "input"  # read and normalised with the caption, rejected where missing
    ds = ds.flat_map(read_rows, fn_kwargs={"endpoint_url": cfg.endpoint_url, "synthetic": synthetic},
                     num_cpus=c.decode_num_cpus)
    pairs = p.shards[0].format == "pairs"
    ds = ds.map_batches(decode_batch, fn_kwargs={"limits": p.limits, "pairs": pairs, "synthetic": synthetic},
                        batch_size=c.decode_batch_size, num_cpus=c.decode_num_cpus)
    filters = cfg.filters.active()
    if filters:  # before the encoders, so filtered images cost them nothing
        ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"filters": filters, "device": device,
                                                               "threads": c.filters.torch_threads},
                            **_actor_args(c.filters, gpu))
    if pairs:  # a pair's caption is the prompt its images were judged against: no synthetic caption
        ds = ds.map_batches(copy_caption, batch_size=c.decode_batch_size, num_cpus=c.decode_num_cpus)
    elif p.captioner:
        ds = ds.map_batches(CaptionStage, fn_constructor_kwargs={
            "path": p.captioner, "device": device, "dtype": m.dtype, "max_new_tokens": m.caption_max_new_tokens,
            "threads": c.caption.torch_threads}, **_actor_args(c.caption, gpu))
    ds = ds.map_batches(VAEStage, fn_constructor_kwargs={
        "repo": p.repo, "device": device, "dtype": m.dtype, "threads": c.vae.torch_threads},
        **_actor_args(c.vae, gpu))
    ds = ds.map_batches(TextStage, fn_constructor_kwargs={
        "repo": p.repo, "device": device, "dtype": m.dtype, "threads": c.text.torch_threads},
        **_actor_args(c.text, gpu))
    return ds.map_batches(write_batch, fn_kwargs={"output": cfg.output, "endpoint_url": cfg.endpoint_url,
                                                  "text": p.text},
                          batch_size=c.write_batch_size, num_cpus=c.decode_num_cpus)


def write_manifest(cfg: PreprocessConf, p: Plan, markers: dict[int, dict], last_run: dict) -> dict:
    """_manifest.json from all shard markers: counts, files, schema, models, resolution, code version."""
    fs, root = filesystem(cfg.output, cfg.endpoint_url)
    files = sorted(f for m in markers.values() for f in m["files"])
    schemas = {}
    for path in files:
        bucket = schema.bucket_of(path)
        if bucket is not None and bucket not in schemas:
            schemas[bucket] = str(pq.read_schema(pa.BufferReader(fs.cat_file(path))))
    rejects: Counter = Counter()
    for path in (f for f in files if f"/{schema.REJECTS_DIR}/" in f):
        table = pq.read_table(pa.BufferReader(fs.cat_file(path)), columns=[schema.REJECT_STAGE])
        rejects.update(table.column(0).to_pylist())
    counts = {k: sum(m[f"rows_{k}"] for m in markers.values()) for k in ("read", "written", "rejected")}
    manifest = {
        **({"kind": schema.PAIRS_KIND} if p.shards[0].format == "pairs" else {}),
        "input": cfg.input, "output": cfg.output, "input_format": p.shards[0].format, "shards": len(p.shards),
        "dedup": cfg.dedup, "filters": {name: asdict(f) for name, f in cfg.filters.active().items()},
        "counts": counts, "rejected_by_stage": dict(rejects), "files": files, "schema": schemas,
        "models": {"kind": cfg.models.kind, "sd3_repo": p.repo, "captioner": p.captioner,
                   "synthetic_captions": cfg.models.synthetic_captions, "dtype": cfg.models.dtype,
                   "text": asdict(p.text)},
        "resolution": cfg.resolution, "buckets": [f"{w}x{h}" for w, h in p.limits.buckets],
        "limits": asdict(p.limits), "code_version": code_version(), "last_run": last_run,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_bytes(fs, join(root, schema.MANIFEST), json.dumps(manifest, indent=1).encode())  # never a partial one
    return manifest


def process(cfg: PreprocessConf, p: Plan, pending: list[Shard]) -> dict:
    """Run the pipeline over the pending shards, marking each as it completes; returns this run's timings."""
    ensure_ray(min_cpus=local_cpus(cfg, p))  # local, or the cluster in RAY_ADDRESS
    # one progress bar for the whole job in a terminal; in a log file the per-shard lines below say enough
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stdout.isatty()
    context.raise_original_map_exception = True  # a stage's DiskFull reaches `run` as itself (find_disk_full)
    start = time.perf_counter()
    progress = Progress(cfg.output, cfg.endpoint_url, {s.index: list(s.paths) for s in pending})
    first_done = progress.track(build_dataset(cfg, p, pending).iter_rows(), LOG)
    return {"shards": len(pending), "rows": progress.rows, "seconds": time.perf_counter() - start,
            "first_shard_seconds": first_done}


def run(cfg: PreprocessConf) -> dict:
    """Process the shards not yet marked done, then write the manifest; returns it. A SIGTERM or a full disk ends the
    job with one line (the finished shards are kept; the same command finishes the rest)."""
    start = time.perf_counter()
    p = plan(cfg)
    done = completed_shards(cfg.output, cfg.endpoint_url)
    pending = [s for s in p.shards if s.index not in done]
    removed = remove_unfinished(cfg.output, [s.index for s in pending], cfg.endpoint_url)
    LOG.info(f"{len(p.shards)} {p.shards[0].format} shards: {len(done)} done, {len(pending)} to do"
          + (f" ({removed} leftover files of an interrupted run removed)" if removed else ""))
    try:
        with sigterm_stops():
            last_run = process(cfg, p, pending) if pending else {"shards": 0, "rows": 0, "seconds": 0.0}
        manifest = write_manifest(cfg, p, completed_shards(cfg.output, cfg.endpoint_url), last_run)
    except Terminated:
        finished = len(completed_shards(cfg.output, cfg.endpoint_url))
        LOG.warning(f"stopped by SIGTERM: {finished} of {len(p.shards)} shards done and kept in {cfg.output}; run the "
                    "same command to finish the rest")
        return {"stopped": True, "shards_done": finished}
    except Exception as error:
        full = find_disk_full(error)
        if full is None:
            raise
        finished = len(completed_shards(cfg.output, cfg.endpoint_url))
        raise JobStopped(f"{full} ({finished} of {len(p.shards)} shards done and kept)") from None
    c = manifest["counts"]
    LOG.info(f"{c['read']} rows read = {c['written']} written + {c['rejected']} rejected "
          f"in {time.perf_counter() - start:.0f} s; manifest {join(cfg.output, schema.MANIFEST)}")
    return manifest


register()


def main() -> None:
    cli("preprocess", run, doc=__doc__)


if __name__ == "__main__":
    main()
