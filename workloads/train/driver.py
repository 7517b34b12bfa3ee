"""`python -m workloads.train data=<preprocessed> model=<flavor> ...`: MM-DiT training on Ray Train + DeepSpeed.

The driver checks the config and the data against the model (before any Ray work), holds out validation rows,
builds one streaming Ray dataset per resolution bucket and runs a `TorchTrainer`. Each worker runs `train_loop`:
resume from the newest complete checkpoint in `<run.storage>/<run.name>/`, train, validate and sample with the EMA,
checkpoint every N steps through `ray.train.report`, and at the end export the EMA weights for diffusers.
A worker or node that dies is replaced by Ray Train (`trainer.max_failures`) and the group resumes from the latest
checkpoint; running the same command again after the whole job died resumes it the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from conf.train import TrainConf, register
from model import count_params, train_flops
from model.conditioning import TextConditioningConfig
from model.formulations import get_formulation
from model.interop import config_from_diffusers
from model.sampling import SAMPLERS
from pipelines.storage import filesystem, join
from workloads.runtime import cli, ensure_ray
from workloads.train import streaming
from workloads.train.data import check_spec, latent_shape, read_spec
from workloads.train.initialize import init_source
from workloads.train.validation import ValGroup, read_val_set


@dataclass
class Plan:
    """What the driver works out once and hands every worker."""

    run_uri: str
    text: TextConditioningConfig
    train_files: dict[str, list[str]]
    batches: dict[str, int]  # per rank and epoch, by bucket
    val: list[ValGroup]
    val_source: str
    vae: str | None
    flops: dict[str, float]  # training FLOPs per sample, by bucket
    params: int


def check(cfg: TrainConf) -> None:
    """Config errors that need no data, raised before anything runs."""
    config = cfg.model.build()
    get_formulation(cfg.objective.formulation)
    t, v = cfg.trainer, cfg.validation
    for name, value in (("trainer.num_workers", t.num_workers), ("trainer.max_steps", t.max_steps),
                        ("trainer.batch_size", t.batch_size), ("validation.every", v.every),
                        ("validation.samples", v.samples), ("validation.batch_size", v.batch_size),
                        ("validation.sample_steps", v.sample_steps), ("checkpoint.every", cfg.checkpoint.every),
                        ("checkpoint.keep", cfg.checkpoint.keep), ("metrics.t_bins", cfg.metrics.t_bins),
                        ("metrics.print_every", cfg.metrics.print_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t.batch_size % t.num_workers:
        raise ValueError(f"trainer.batch_size={t.batch_size} (global) must be divisible by "
                         f"trainer.num_workers={t.num_workers}")
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage must be 0, 1, 2 or 3, got {cfg.deepspeed.stage}")
    if cfg.deepspeed.offload and cfg.deepspeed.stage == 0:
        raise ValueError("deepspeed.offload needs ZeRO stage 1, 2 or 3")
    if v.sampler not in SAMPLERS:
        raise ValueError(f"validation.sampler must be one of {SAMPLERS}, got {v.sampler!r}")
    if not 0.0 <= cfg.objective.synthetic_caption_prob <= 1.0 or not 0.0 <= cfg.objective.text_drop_prob <= 1.0:
        raise ValueError("objective.synthetic_caption_prob and objective.text_drop_prob must be in [0, 1]")
    if cfg.stage_needs_init and not cfg.init_from:
        raise ValueError(f"stage at {cfg.stage_resolution}px continues a previous stage: set init_from=<the previous "
                         "stage's run folder>")
    if cfg.init_from:
        source = init_source(cfg.init_from, cfg.endpoint_url)
        fs, path = filesystem(source, cfg.endpoint_url)
        previous = config_from_diffusers(json.loads(fs.cat_file(join(path, "config.json"))))
        if previous != config:
            raise ValueError(f"init_from={cfg.init_from!r} holds a different network ({previous}) than "
                             f"model={cfg.model.flavor} ({config})")


def check_resolution(cfg: TrainConf, buckets: list[str]) -> None:
    """A resolution stage's data must be near its resolution (pixel area within a factor 2)."""
    if cfg.stage_resolution is None:
        return
    for bucket in buckets:
        width, height = (int(x) for x in bucket.split("=", 1)[1].split("x"))
        if not 0.5 <= width * height / cfg.stage_resolution**2 <= 2.0:
            raise ValueError(f"the stage trains at {cfg.stage_resolution}px but the data's {bucket} is far from it: "
                             "preprocess the data at the stage's resolution")


def plan(cfg: TrainConf) -> Plan:
    """Check config and data against each other and work out the split, epochs and validation rows."""
    check(cfg)
    config = cfg.model.build()
    spec = read_spec(cfg.data, cfg.endpoint_url)
    check_spec(spec, config, cfg.endpoint_url)
    val_spec = None
    if cfg.val_data:
        val_spec = read_spec(cfg.val_data, cfg.endpoint_url)
        check_spec(val_spec, config, cfg.endpoint_url)
        if val_spec.text != spec.text:
            raise ValueError(f"val_data was encoded with {val_spec.text}, data with {spec.text}")
    split = streaming.split_files(spec, val_spec, cfg.loader.val_fraction)
    check_resolution(cfg, list(split.train))
    world, local = cfg.trainer.num_workers, cfg.trainer.batch_size // cfg.trainer.num_workers
    rows = {b: streaming.row_counts(files, cfg.endpoint_url) for b, files in split.train.items()}
    batches = streaming.batches_per_epoch(rows, world, local)
    if sum(batches.values()) == 0:
        raise ValueError(f"the training data ({rows}) has no bucket with a full global batch of "
                         f"{cfg.trainer.batch_size}: lower trainer.batch_size or add data")
    val = read_val_set(split.val, cfg.validation.samples, world, cfg.endpoint_url)
    text_tokens = spec.text.text_tokens
    flops = {b: train_flops(config, *latent_shape(split.train[b][0], cfg.endpoint_url)[1:], text_tokens=text_tokens)
             for b in batches}
    print(f"[train] {sum(rows.values())} training rows in {len(rows)} bucket(s) {rows}; "
          f"{sum(batches.values())} steps per epoch; {sum(len(g) for g in val)} validation rows "
          f"({split.val_source})", flush=True)
    return Plan(join(cfg.run.storage, cfg.run.name), spec.text, split.train, batches, val, split.val_source,
                spec.vae, flops, count_params(config))


def run_config(cfg: TrainConf, callbacks: list | None = None):
    import ray.train

    pafs, storage = streaming.ray_storage(cfg.run.storage, cfg.endpoint_url)
    return ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage, storage_filesystem=pafs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep), callbacks=callbacks)


def run(cfg: TrainConf, callbacks: list | None = None):
    """Plan, then train on the Ray cluster (local unless RAY_ADDRESS is set); returns Ray Train's Result.
    `callbacks` are Ray Train `UserCallback`s (a Tune trial passes `TuneReportCallback`)."""
    p = plan(cfg)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from workloads.train.worker import train_loop

    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 2)  # + room for Ray Data's readers
    files = {b: f for b, f in p.train_files.items() if p.batches.get(b)}
    data_bytes = streaming.total_bytes(files, cfg.endpoint_url)
    materialize = streaming.should_materialize(cfg.loader.materialize, data_bytes, cfg.loader.materialize_fraction)
    print(f"[train] training data {data_bytes / 2**20:.1f} MiB: "
          f"{'read once into the object store' if materialize else 'streamed every epoch'}", flush=True)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "plan": p},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
                                               resources_per_worker={"CPU": cfg.trainer.cpus_per_worker}),
        run_config=run_config(cfg, callbacks),
        datasets=streaming.bucket_datasets(files, cfg.trainer.seed, cfg.endpoint_url, materialize),
        dataset_config=streaming.ordered_ingest())
    result = trainer.fit()
    print(f"[train] finished: {result.metrics}; run folder {p.run_uri}", flush=True)
    return result


register()


def main() -> None:
    cli("train", run, doc=__doc__)


if __name__ == "__main__":
    main()
