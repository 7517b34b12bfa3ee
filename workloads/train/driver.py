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
import math
import uuid
from dataclasses import dataclass, replace

from conf.checks import Objective, validate
from conf.train import TrainConf, register
from model import count_params, train_flops
from model.conditioning import TextConditioningConfig
from model.interop import config_from_diffusers
from pipelines.geneval import TAGS
from pipelines.storage import Location, absolute, join
from workloads.evaluate.inline import PromptSet, encode_prompt_set
from workloads.runtime import JobStopped, cli, ensure_ray, logger
from workloads.train import checkpointing, preemption, streaming
from workloads.train.data import TENSOR_COLUMNS, check_spec, latent_shape, read_spec, training_columns
from workloads.train.faults import STOPPED, FailureLog, stopped_reason
from workloads.train.initialize import init_source
from workloads.train.runlog import SUMMARY
from workloads.train.validation import ValGroup, read_val_set

LOG = logger("train")
# A DPO step trains on both images of a pair (a forward and backward pass each) and runs the reference forward on
# both: 2 * 3 + 2 * 1 forward-pass costs per pair, against 3 for one image of the flow objective.
DPO_FLOPS_PER_SAMPLE = 8 / 3


@dataclass
class Plan:
    """What the driver works out once and hands every worker."""

    run: Location  # <run.storage>/<run.name>
    text: TextConditioningConfig
    data: Location  # the training dataset, made once from `data=` and `endpoint_url=`
    train_files: dict[str, list[str]]
    batches: dict[str, int]  # per rank and epoch, by bucket
    val: list[ValGroup]
    val_source: str
    vae: str | None
    flops: dict[str, float]  # training FLOPs per sample (a preference pair under DPO), by bucket
    params: int
    holdout: float = 0.0  # `Split.holdout`: the training stream drops the rows held out for validation
    # with validation.geneval_every: the prompt set encoded, or the ObjectRef of its encoding task (`geneval_prompts`)
    geneval: PromptSet | object | None = None
    # what the training stream reads: the captions it can draw (`data.training_columns`), DPO's loser too
    tensor_columns: tuple[str, ...] = TENSOR_COLUMNS
    session: str = ""  # this job's id: its failed attempts are counted apart from an earlier job's (`faults`)
    stop: object | None = None  # the driver's `preemption.StopRequest` actor: how its SIGTERM reaches the workers


def check(cfg: TrainConf) -> None:
    """Config errors that need no data, raised before anything runs (each section's own checks, run again for
    configs made in code, and the `init_from` network against `model`)."""
    validate(cfg)
    config = cfg.model.build()
    if not cfg.data:
        raise ValueError("data= is required: a preprocessing output (local folder or s3://)")
    if cfg.init_from:
        source = init_source(Location.of(cfg.init_from, cfg.endpoint_url))
        previous = config_from_diffusers(json.loads(source.read_bytes("config.json")))
        if previous != config.exported():  # an export is in SP, muP folded into its weights
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
    spec = read_spec(Location.of(cfg.data, cfg.endpoint_url))
    check_spec(spec, config)
    dpo = cfg.objective.kind == Objective.dpo
    if dpo and not spec.pairs:
        raise ValueError(f"objective=dpo trains on preference pairs, and data={cfg.data} is not a preference dataset: "
                         "make one with `python -m workloads.make_pairs` (or train it with objective.kind=flow)")
    if cfg.validation.geneval_every and not spec.vae:
        raise ValueError(f"validation.geneval_every needs the text encoders and VAE data={cfg.data} was preprocessed "
                         "with, and its manifest names no models.sd3_repo")
    val_spec = None
    if cfg.val_data:
        val_spec = read_spec(Location.of(cfg.val_data, cfg.endpoint_url))
        check_spec(val_spec, config)
        if val_spec.text != spec.text:
            raise ValueError(f"val_data was encoded with {val_spec.text}, data with {spec.text}")
    split = streaming.split_files(spec, val_spec, cfg.loader.val_fraction, min_rows=cfg.trainer.num_workers)
    check_resolution(cfg, list(split.train))
    world, local = cfg.trainer.num_workers, cfg.trainer.batch_size // cfg.trainer.num_workers
    rows = streaming.training_rows(split)
    batches = streaming.batches_per_epoch(rows, world, local)
    if sum(batches.values()) == 0:
        raise ValueError(f"the training data ({rows}) has no bucket with a full global batch of "
                         f"{cfg.trainer.batch_size}: lower trainer.batch_size or add data")
    val = read_val_set(split.val_data, split.val, cfg.validation.samples, world, holdout=split.holdout)
    text_tokens = spec.text.text_tokens
    flops = {b: train_flops(config, *latent_shape(spec.location, split.train[b][0])[1:], text_tokens=text_tokens)
             * (DPO_FLOPS_PER_SAMPLE if dpo else 1.0) for b in batches}
    LOG.info(f"{sum(rows.values())} training rows in {len(rows)} bucket(s) {rows}; "
             f"{sum(batches.values())} steps per epoch; {sum(len(g) for g in val)} validation rows "
             f"({split.val_source})")
    return Plan(run_location(cfg), spec.text, spec.location, split.train, batches, val, split.val_source, spec.vae,
                flops, count_params(config), split.holdout,
                tensor_columns=training_columns(cfg.objective.synthetic_caption_prob, pairs=dpo))


def geneval_prompts(cfg: TrainConf, models: str):
    """validation.geneval_every's prompt set, encoded once on a Ray task (on a GPU when training has them), so
    the text encoders (T5-XXL in production) stay out of the driver and the training workers. Returns the task's
    ObjectRef at once: the encoding overlaps the worker group's start-up, and the workers fetch it when first due."""
    import ray

    v = cfg.validation
    # outside a Tune trial's placement group (it holds only the trial driver's CPU share), like the Train workers
    task = ray.remote(encode_prompt_set).options(num_cpus=cfg.trainer.cpus_per_worker,
                                                 num_gpus=int(cfg.trainer.use_gpu), scheduling_strategy="DEFAULT")
    LOG.info(f"GenEval-shapes every {v.geneval_every} steps: {len(TAGS) * v.geneval_prompts_per_task} prompts x "
             f"{v.geneval_images_per_prompt} image(s), {v.sample_steps} {v.sampler} steps, guidance {v.guidance}")
    return task.remote(models, v.geneval_prompts_per_task, v.geneval_images_per_prompt)


def run_location(cfg: TrainConf) -> Location:
    """`<run.storage>/<run.name>/`: everything the run writes (checkpoints, metrics, samples, export)."""
    return Location.of(join(cfg.run.storage, cfg.run.name), cfg.endpoint_url)


def run_config(cfg: TrainConf, callbacks: list | None = None):
    import ray.train

    pafs, storage = streaming.ray_storage(Location.of(cfg.run.storage, cfg.endpoint_url))
    return ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage, storage_filesystem=pafs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures,
                                               max_preemption_failures=cfg.trainer.max_preemptions),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep), callbacks=callbacks)


def worker_conf(cfg: TrainConf) -> TrainConf:
    """The config the workers get: the paths they read themselves (`init_from`) absolute, as the driver saw them."""
    return replace(cfg, init_from=absolute(cfg.init_from))


def run(cfg: TrainConf, callbacks: list | None = None):
    """Plan, then train on the Ray cluster (local unless RAY_ADDRESS is set); returns Ray Train's Result.
    `callbacks` are Ray Train `UserCallback`s (a Tune trial passes `TuneReportCallback`)."""
    cfg = worker_conf(cfg)
    p = plan(cfg)
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from workloads.train.worker import train_loop

    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 2)  # + room for Ray Data's readers
    p.session = uuid.uuid4().hex[:12]
    p.stop = preemption.StopRequest.remote()
    failures = FailureLog(p.run.uri, cfg.endpoint_url, p.session)
    if cfg.validation.geneval_every:
        p.geneval = geneval_prompts(cfg, p.vae)
    files = {b: f for b, f in p.train_files.items() if p.batches.get(b)}
    data_bytes = streaming.total_bytes(p.data, files)
    materialize = streaming.should_materialize(cfg.loader.materialize, data_bytes, cfg.loader.materialize_fraction)
    LOG.info(f"training data {data_bytes / 2**20:.1f} MiB: "
             f"{'read once into the object store' if materialize else 'streamed every epoch'}")
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "plan": p},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
                                               resources_per_worker={"CPU": cfg.trainer.cpus_per_worker,
                                                                     **cfg.trainer.worker_resources}),
        run_config=run_config(cfg, [failures, *(callbacks or [])]),
        datasets=streaming.bucket_datasets(p.data, files, cfg.trainer.seed, materialize, p.holdout,
                                           p.tensor_columns),
        dataset_config=streaming.ordered_ingest(),
        # the start-up and first step's collective timeout; the workers lower it after (`faults.StepDeadline`)
        torch_config=TorchConfig(timeout_s=math.ceil(cfg.trainer.first_step_timeout_s)))
    with preemption.driver_sigterm(p.stop):
        try:
            result = trainer.fit()
        except ray.train.PreemptionError:  # more preemptions than trainer.max_preemptions
            latest = checkpointing.find_latest(p.run)
            raise JobStopped(f"preempted more than trainer.max_preemptions={cfg.trainer.max_preemptions} times; "
                             f"checkpoint {latest}: run the same command to resume") from None
    outcome = result.return_value or {}
    if (reason := outcome.get(STOPPED) or stopped_reason(p.run, p.session)) is not None:
        raise JobStopped(reason)
    if (where := outcome.get(preemption.INTERRUPTED)) is not None:
        LOG.warning(f"stopped by SIGTERM after step {where['step']} of {cfg.trainer.max_steps}: checkpoint "
                    f"{where['checkpoint']}; run the same command to resume")
        return result
    LOG.info(summary_table(p.run, cfg))
    return result


def summary_table(run: Location, cfg: TrainConf) -> str:
    """The finished run in a few aligned lines: steps, losses, speed, size and where everything is."""
    try:
        summary = json.loads(run.refreshed().read_bytes(SUMMARY))
    except FileNotFoundError:
        return f"finished; run folder {run}"
    val = summary.get("val_loss")
    rows = [("steps", f"{summary['step']} of {cfg.trainer.max_steps} (global batch {cfg.trainer.batch_size}, "
                      f"{cfg.trainer.num_workers} workers, ZeRO-{cfg.deepspeed.stage})"),
            ("training loss", f"{summary['loss']:.4f} (last step)"),
            ("EMA val loss", "-" if val is None else f"{val:.4f} ({summary['val_source']})"),
            *([("GenEval-shapes", f"{summary['geneval']:.3f} (EMA, last)")] if summary.get("geneval") is not None
              else []),
            ("samples/s", f"{summary['samples_per_s']:.1f} (median)" if summary.get("samples_per_s") else "-"),
            ("parameters", f"{summary['params']:,}"),
            *([("LoRA adapters", f"rank {summary['lora_rank']}: {summary['trained_params']:,} trained parameters")]
              if summary.get("lora_rank") else []),
            *([("checkpoint", f"{summary['checkpoint_bytes'] / 2**20:.1f} MiB (last, all ranks)")]
              if summary.get("checkpoint_bytes") else []),
            ("skipped steps", str(summary["skipped_steps"])),
            ("run folder", run.uri)]
    width = max(len(name) for name, _ in rows)
    return "finished\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


register()


def main() -> None:
    cli("train", run, doc=__doc__)


if __name__ == "__main__":
    main()
