"""The Ray Train worker of `workloads.train`: resume, the step loop with metrics, validation, checkpoints, export."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import get_device

from conf.train import TrainConf
from model.objective import validation_timesteps
from pipelines.storage import filesystem, is_remote, join
from workloads.train import checkpointing
from workloads.train.checkpointing import TrainState
from workloads.train.initialize import weight_loader
from workloads.train.mfu import mfu, peak_tflops
from workloads.train.runlog import SUMMARY, RunLog
from workloads.train.streaming import EpochStream, dataset_name
from workloads.train.trainer import StepResult, Trainer
from workloads.train.validation import LatentDecoder, write_grid


def resume(trainer: Trainer, run_uri: str, endpoint_url: str | None) -> tuple[TrainState | None, str | None]:
    """Load the newest complete checkpoint of the run (rank 0 picks it for everyone): (state, its URI), or
    (None, None) for a new run."""
    choice = [checkpointing.find_latest(run_uri, endpoint_url) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None, None
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        state = trainer.load(checkpointing.fetch(choice[0], Path(tmp), endpoint_url))
    if dist.get_rank() == 0:
        print(f"[train] resumed from {choice[0]}: step {state.step}, epoch {state.epoch}, batch {state.offset}",
              flush=True)
    return state, choice[0]


def track_nonfinite(state: TrainState, skipped: bool, limit: int) -> None:
    """Count a skipped (non-finite) step; `limit` of them in a row stop the run with a clear error."""
    state.skipped += skipped
    state.nonfinite_run = state.nonfinite_run + 1 if skipped else 0
    if state.nonfinite_run >= limit:
        raise FloatingPointError(f"{state.nonfinite_run} non-finite losses in a row up to step {state.step} "
                                 f"(trainer.max_nonfinite={limit}); the run stops. Lower the learning rate or check "
                                 "the data, then resume from the last checkpoint")


def step_record(state: TrainState, bucket: str, result: StepResult, step_s: float, data_s: float,
                global_batch: int, flops: float, peak: float | None, world: int) -> dict:
    samples_per_s = global_batch / step_s
    record = {"step": state.step, "epoch": state.epoch, "bucket": bucket, "loss": result.loss,
              "grad_norm": result.grad_norm, "lr": result.lr, "samples_per_s": samples_per_s,
              "data_wait": data_s / step_s, "step_s": step_s, "skipped": result.skipped,
              "skipped_total": state.skipped}
    record.update({f"loss_t{i}": value for i, value in enumerate(result.bins)})
    if peak is not None:
        record["mfu"] = mfu(flops, samples_per_s / world, peak)
    return record


def progress_line(record: dict, max_steps: int) -> str:
    line = (f"[train] step {record['step']}/{max_steps} loss {record['loss']:.4f} "
            f"{record['samples_per_s']:.1f} samples/s")
    return line + (f" | EMA validation loss {record['val_loss']:.4f}" if "val_loss" in record else "")


def validation_record(trainer: Trainer, plan, log: RunLog | None, decoder: list, step: int) -> dict:
    """EMA validation loss (overall and per timestep) and, on rank 0, the sample grid PNG."""
    per_t = trainer.validate(plan.val)
    record = {"val_loss": float(per_t.mean())}
    record.update({f"val_loss_at_{t:.3f}": float(v) for t, v in zip(validation_timesteps(len(per_t)).tolist(),
                                                                      per_t.tolist(), strict=True)})
    latents, captions = trainer.samples(plan.val[0])
    if log is not None:
        if not decoder:
            decoder.append(LatentDecoder(plan.vae))
        write_grid(decoder[0], latents, captions, log.path(f"samples/step_{step:08d}.png"))
    return record


def save_checkpoint(trainer: Trainer, state: TrainState, metrics: dict, log: RunLog | None) -> None:
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        trainer.save(Path(tmp), state)
        if log is not None:
            log.sync()
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpointing.dir_name(state.step))


def export(trainer: Trainer, plan, log: RunLog | None, endpoint_url: str | None) -> None:
    """<run>/export/: the EMA weights for diffusers (every rank joins: the ZeRO-3 gather is collective)."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        trainer.export(Path(tmp))
        if log is not None:
            fs, root = filesystem(plan.run_uri, endpoint_url)
            target = join(root, "export")
            if fs.exists(target):
                fs.rm(target, recursive=True)
            if is_remote(plan.run_uri):
                fs.put(tmp + "/", target + "/", recursive=True)
            else:
                fs.copy(tmp + "/", target + "/", recursive=True)
    dist.barrier()


def worker(cfg: TrainConf, plan) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device() if cfg.trainer.use_gpu else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    load = None
    if cfg.init_from:
        load = weight_loader(cfg.init_from, cfg.endpoint_url)
    trainer = Trainer(cfg, plan.text, device, load)
    state, source = resume(trainer, plan.run_uri, cfg.endpoint_url)
    state = state or TrainState(world_size=world, zero_stage=cfg.deepspeed.stage)
    log = RunLog(plan.run_uri, state.step, cfg.metrics.tensorboard, cfg.endpoint_url) if rank == 0 else None
    if log is not None:
        log.event("resumed" if source else "started", step=state.step, checkpoint=source, workers=world)
    decoder: list = []
    batches = {b: n for b, n in plan.batches.items() if n > 0}
    shards = {b: ray.train.get_dataset_shard(dataset_name(b)) for b in batches}
    local_batch = cfg.trainer.batch_size // world
    stream = EpochStream(shards, batches, local_batch, cfg.trainer.seed, rank, cfg.loader.shuffle_buffer,
                         cfg.loader.prefetch_batches)
    peak = peak_tflops(device, cfg.metrics.peak_tflops)
    t, last, rates = cfg.trainer, {}, []
    while state.step < t.max_steps:
        tick = time.perf_counter()
        for index, bucket, batch in stream.epoch(state.epoch, state.offset):
            data_s = time.perf_counter() - tick
            result = trainer.step(batch, state.step + 1)
            state.step, state.offset = state.step + 1, index + 1
            track_nonfinite(state, result.skipped, t.max_nonfinite)
            record = step_record(state, bucket, result, time.perf_counter() - tick, data_s, t.batch_size,
                                 plan.flops[bucket], peak, world)
            final = state.step >= t.max_steps
            if state.step % cfg.validation.every == 0 or final:
                record.update(validation_record(trainer, plan, log, decoder, state.step))
            last.update(record)
            rates.append(record["samples_per_s"])
            if log is not None:
                log.log(record)
                if state.step % cfg.metrics.print_every == 0 or "val_loss" in record:
                    print(progress_line(record, t.max_steps), flush=True)
                if is_remote(plan.run_uri) and state.step % cfg.metrics.sync_every == 0:
                    log.sync()
            if state.step % cfg.checkpoint.every == 0 or final:
                save_checkpoint(trainer, state, last, log)
            if final:
                break
            tick = time.perf_counter()
        else:
            state.epoch, state.offset = state.epoch + 1, 0
    if cfg.export:
        export(trainer, plan, log, cfg.endpoint_url)
    if log is not None:
        if last:  # not when a finished run was only started again
            n = sum(plan.batches.values())
            summary = {"step": state.step, "params": plan.params, "skipped_steps": state.skipped,
                       "val_source": plan.val_source, "loss": last["loss"], "val_loss": last.get("val_loss"),
                       "samples_per_s": statistics.median(rates),  # of this session's steps
                       "train_flops_per_sample": sum(plan.flops[b] * k for b, k in plan.batches.items()) / n}
            log.path(SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        log.event("finished", step=state.step)
        log.close()


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    worker(config["cfg"], config["plan"])
