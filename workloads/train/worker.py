"""The Ray Train worker of `workloads.train`: resume, the step loop, the export. Metrics and progress lines
(`progress`), validation (`validation.Validator`) and checkpoints (`checkpointing.Checkpointer`) each keep their own
cadence, so the loop fits on a screen."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from ray.train.torch import get_device

from conf.train import TrainConf
from pipelines.geneval.stats import paired_change
from pipelines.storage import DiskFull, Location, write_bytes
from workloads.runtime import logger, quiet_ray, setup_logging
from workloads.train import checkpointing, faults, preemption
from workloads.train.checkpointing import CheckpointDiskFull, Checkpointer, TrainState
from workloads.train.distribute import init_distributed
from workloads.train.faults import StepDeadline
from workloads.train.initialize import weight_loader
from workloads.train.mfu import peak_tflops
from workloads.train.progress import Progress
from workloads.train.runlog import EVENTS, SUMMARY, RunLog, parse_records, read_records
from workloads.train.streaming import EpochStream, dataset_name
from workloads.train.trainer import Trainer
from workloads.train.validation import Validator, geneval_results

LOG = logger("train")
GENEVAL_BEFORE = "geneval_before"  # the event holding the starting weights' GenEval-shapes


def resume(trainer: Trainer, run: Location) -> tuple[TrainState | None, str | None]:
    """Load the newest complete checkpoint of the run (rank 0 picks it for everyone): (state, its URI), or
    (None, None) for a new run."""
    choice = [checkpointing.find_latest(run) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None, None
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        state = trainer.load(checkpointing.fetch(choice[0], Path(tmp)))
    if dist.get_rank() == 0:
        LOG.info(f"resumed from {choice[0]}: step {state.step}, epoch {state.epoch}, batch {state.offset}")
    return state, choice[0].uri


def track_nonfinite(state: TrainState, skipped: bool, limit: int) -> None:
    """Count a skipped (non-finite) step; `limit` of them in a row stop the run with a clear error."""
    state.skipped += skipped
    state.nonfinite_run = state.nonfinite_run + 1 if skipped else 0
    if state.nonfinite_run >= limit:
        raise FloatingPointError(f"{state.nonfinite_run} non-finite losses in a row up to step {state.step} "
                                 f"(trainer.max_nonfinite={limit}); the run stops. Lower the learning rate or check "
                                 "the data, then resume from the last checkpoint")


def export(trainer: Trainer, run: Location, log: RunLog | None) -> str | None:
    """<run>/export/: the EMA weights for diffusers (every rank joins: the ZeRO-3 gather is collective). It replaces
    an earlier export whole (`Location.write_folder`): on local disk a kill leaves the old export or the new one,
    never half of one; on an object store, whole files of both until the write is done. Returns rank 0's disk-full
    message when the export found no room (nothing of it is left; the checkpoints are kept)."""
    full = None
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        trainer.export(Path(tmp))
        if log is not None:
            try:
                run.write_folder("export", tmp)
            except DiskFull as error:
                full = str(DiskFull(error.path, error.needed, error.free, "free space there, then run the same "
                                    "command: it writes the export from the last checkpoint", error.reason))
    dist.barrier()
    return full


def worker(cfg: TrainConf, plan) -> dict | None:
    """One rank: resume, then steps until `trainer.max_steps`, each component keeping its own cadence; at the end
    the diffusers export and (rank 0) the session's summary. Between steps the ranks agree whether to stop
    (`preemption.Notice`): a preemption checkpoints and restarts, a driver stop checkpoints and returns, a full disk
    returns. Rank 0's return value reaches the driver (`Result.return_value`): None, or {"stopped": why} or
    {"interrupted": where}."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device() if cfg.trainer.use_gpu else torch.device("cpu")
    init_distributed(device, cfg.trainer.first_step_timeout_s)
    if faults.stop_if_repeated(plan.run, plan.session):
        return None
    notice = preemption.Notice(plan.stop, rank, world, device)
    load = weight_loader(Location.of(cfg.init_from, cfg.endpoint_url)) if cfg.init_from else None
    trainer = Trainer(cfg, plan.text, device, load)
    state, source = resume(trainer, plan.run)
    state = state or TrainState(world_size=world, zero_stage=cfg.deepspeed.stage)
    log, full = None, None
    if rank == 0:
        try:
            log = RunLog(plan.run, state.step, cfg.metrics.tensorboard)
        except DiskFull as error:  # no room to rewrite the run's records: every rank stops before the first step
            full = str(error)
    notice.disk_full = full
    if (stop := notice.check()) is not None and stop.kind == preemption.DISK_FULL:
        return stopped(None, plan, notice.disk_full_message(), rank)
    if log is not None:
        log.event("resumed" if source else "started", step=state.step, checkpoint=source, workers=world)
    t = cfg.trainer
    peak = peak_tflops(device, cfg.metrics.peak_tflops)
    progress = Progress(cfg.metrics, t.max_steps, t.batch_size, world, log, peak, plan.flops)
    validator = Validator(trainer, plan.val, cfg.validation, plan.vae, log, plan.geneval)
    if cfg.validation.geneval_before and source is None and validator.geneval is not None:
        before = validator.geneval_fields(0)  # every rank samples its share
        if log is not None:
            log.event(GENEVAL_BEFORE, **before)
            LOG.info(f"GenEval-shapes of the starting weights: {before['geneval']:.3f}")
    checkpointer = Checkpointer(trainer, cfg.checkpoint.every, log, cfg.checkpoint.final, plan.run)
    stream = epoch_stream(cfg, plan, rank, world)
    deadline = StepDeadline(plan.run, rank, t.first_step_timeout_s, t.collective_timeout_s)
    stop = None  # a signal seen before the first step is seen again at the first step boundary
    try:
        while state.step < t.max_steps and stop is None:
            for index, bucket, batch in progress.timed(stream.epoch(state.epoch, state.offset)):
                deadline.arm(state.step + 1)
                faults.inject(t.fault_injection, t, rank, state.step + 1)
                result = trainer.step(batch, state.step + 1)
                state.step, state.offset = state.step + 1, index + 1
                track_nonfinite(state, result.skipped, t.max_nonfinite)
                final = state.step >= t.max_steps
                record = progress.record(state, bucket, result) | validator.maybe_run(state.step, final)
                progress.maybe_print(record, final)
                checkpointer.maybe_save(state, final, progress.last)
                notice.disk_full = notice.disk_full or (log.full if log is not None else None)
                if final or (stop := notice.check()) is not None:
                    break
            else:
                state.epoch, state.offset = state.epoch + 1, 0
    except CheckpointDiskFull as error:
        return stopped(log, plan, str(error), rank)
    except Exception as error:
        raise faults.step_failure(error, deadline.step or state.step + 1, rank, cfg) from error
    finally:
        deadline.close()
    if stop is not None:  # the SIGTERM handler stays for the checkpoint: a second signal still ends the process
        return interrupt(stop, notice, checkpointer, state, progress, log, plan)
    notice.close()
    return finish(cfg, trainer, plan, state, progress, log, checkpointer.last_bytes)


def stopped(log: RunLog | None, plan, reason: str, rank: int) -> dict | None:
    """The run ends without retrying (a full disk): rank 0 records why, if it still can, and returns it."""
    if rank != 0:
        return None
    if log is not None:
        log.event(faults.STOPPED, session=plan.session, reason=reason)
        log.close()
    return {faults.STOPPED: reason}


def interrupt(stop: preemption.Stop, notice: preemption.Notice, checkpointer: Checkpointer, state: TrainState,
              progress: Progress, log: RunLog | None, plan) -> dict | None:
    """The agreed stop at this step boundary: a full disk ends the run; otherwise this step is checkpointed (unless
    it just was), then a preemption restarts the workers and a driver stop returns where the run stopped."""
    rank = dist.get_rank()
    if stop.kind == preemption.DISK_FULL:
        return stopped(log, plan, notice.disk_full_message(), rank)
    if checkpointer.last_step != state.step:
        try:
            checkpointer.save(state, progress.last)
        except CheckpointDiskFull as error:
            return stopped(log, plan, str(error), rank)
    where = plan.run.child(checkpointing.dir_name(state.step)).uri
    if log is not None:
        log.event(stop.kind, step=state.step, checkpoint=where, reason=stop.reason, session=plan.session)
        log.close()
    if stop.kind == preemption.PREEMPTED:
        if log is not None:
            LOG.warning(f"preempted ({stop.reason}) after step {state.step}: checkpoint {where} written; the workers "
                        "restart from it (not counted in trainer.max_failures)")
        preemption.restart_now(rank)
    return {preemption.INTERRUPTED: {"step": state.step, "checkpoint": where}} if log is not None else None


def epoch_stream(cfg: TrainConf, plan, rank: int, world: int) -> EpochStream:
    """This rank's bucketed batches from the Ray Train dataset shards of the buckets that have batches."""
    batches = {b: n for b, n in plan.batches.items() if n > 0}
    shards = {b: ray.train.get_dataset_shard(dataset_name(b)) for b in batches}
    return EpochStream(shards, batches, cfg.trainer.batch_size // world, cfg.trainer.seed, rank,
                       cfg.loader.shuffle_buffer, cfg.loader.prefetch_batches, cfg.objective.synthetic_caption_prob,
                       pin_memory=cfg.trainer.use_gpu)


def finish(cfg: TrainConf, trainer: Trainer, plan, state: TrainState, progress: Progress, log: RunLog | None,
           checkpoint_bytes: int | None = None) -> dict | None:
    """The diffusers export (every rank joins), then rank 0 writes the summary and closes the run log."""
    full = export(trainer, plan.run, log) if cfg.export else None
    if log is None:
        return None
    if full is not None:
        return stopped(log, plan, full, 0)
    last = progress.last
    if last:  # not when a finished run was only started again
        n = sum(plan.batches.values())
        summary = {"step": state.step, "params": plan.params, "skipped_steps": state.skipped,
                   "val_source": plan.val_source, "loss": last["loss"], "val_loss": last.get("val_loss"),
                   "geneval": last.get("geneval"), "trained_params": trainer.trained_numel,
                   "lora_rank": cfg.lora.rank, "checkpoint_bytes": checkpoint_bytes,
                   "samples_per_s": progress.median_rate(),  # of this session's steps
                   "train_flops_per_sample": sum(plan.flops[b] * k for b, k in plan.batches.items()) / n}
        summary |= {k: v for k, v in last.items() if k.startswith(("credit_", "chance_"))}  # GenEval's partial credits
        summary |= before_and_after(plan.run, last, state.step, log)
        # whole or not at all: a later start (the sweep, the reference job) reads it as the sign the run finished
        write_bytes(LocalFileSystem(), str(log.path(SUMMARY)), (json.dumps(summary, indent=1) + "\n").encode())
    log.event("finished", step=state.step)
    log.close()
    return None


def before_and_after(run: Location, last: dict, step: int, log: RunLog) -> dict:
    """`geneval_before` / `geneval_after` (overall) and `geneval_tasks_before` / `_after` for a run that scored its
    starting weights (`validation.geneval_before`), with the paired change of its per-image results (the same prompts
    and noise both times): `geneval_change_se`, `geneval_gained`, `geneval_lost`; {} otherwise."""
    before = next((e for e in read_records(run, EVENTS) if e["event"] == GENEVAL_BEFORE), None)
    if before is None or "geneval" not in last:
        return {}
    tasks = lambda fields: {k[len("geneval_"):]: v for k, v in fields.items() if k.startswith("geneval_")}  # noqa: E731
    out = {"geneval_before": before["geneval"], "geneval_after": last["geneval"],
           "geneval_tasks_before": tasks({k: v for k, v in before.items() if k not in ("event", "time")}),
           "geneval_tasks_after": tasks(last)}
    first, final = (per_image_geneval(run, log, s) for s in (0, step))
    if first is not None and final is not None:
        try:
            out |= paired_change(first, final).summary_fields()
        except ValueError as error:  # a resumed run that changed its GenEval prompt set: no image pairs up
            LOG.warning(f"no paired GenEval change: {error}")
    return out


def per_image_geneval(run: Location, log: RunLog, step: int) -> list[dict] | None:
    """The per-image GenEval-shapes results of `step` (`Validator.geneval_fields`): this session's local copy, else
    the run folder's; None when neither has them."""
    name = geneval_results(step)
    local = log.path(name)
    results = parse_records(local.read_text(), str(local)) if local.exists() else read_records(run, name)
    return results or None


def train_loop(config: dict) -> dict | None:
    """One Ray Train worker (the function `TorchTrainer` runs on every rank); rank 0's return value reaches the
    driver as `Result.return_value`."""
    setup_logging()
    quiet_ray()
    return worker(config["cfg"], config["plan"])
