"""Per-step metrics and what a person sees: one record per step into the run log (rank 0), a progress line every
`metrics.print_every` steps with the ETA, periodic uploads of the run log, and the summary of the session."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from conf.train import MetricsConf
from workloads.runtime import logger
from workloads.train.checkpointing import TrainState
from workloads.train.mfu import mfu
from workloads.train.runlog import RunLog
from workloads.train.trainer import StepResult

LOG = logger("train")
RATE_WINDOW = 50  # steps whose median time gives the ETA
T = TypeVar("T")


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Progress:
    """Times each step, turns its result into a metrics record, and owns the print and upload cadence."""

    metrics: MetricsConf
    max_steps: int
    global_batch: int
    world: int
    log: RunLog | None  # rank 0's run log; None on the other ranks
    peak_tflops: float | None = None
    flops: dict[str, float] = field(default_factory=dict)  # training FLOPs per sample, by bucket
    last: dict = field(default_factory=dict)  # every key's latest value (checkpoints report it)
    rates: list[float] = field(default_factory=list)  # samples/s of this session's steps
    _recent: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    _tick: float = field(default_factory=time.perf_counter)
    _data_s: float = 0.0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """The batches, each step's clock started before its batch is fetched (the fetch is the data wait)."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._tick, self._data_s = start, time.perf_counter() - start
            yield item

    def record(self, state: TrainState, bucket: str, result: StepResult) -> dict:
        """The step's metrics record (call right after the optimizer step)."""
        step_s = time.perf_counter() - self._tick
        samples_per_s = self.global_batch / step_s
        record = {"step": state.step, "epoch": state.epoch, "bucket": bucket, "loss": result.loss,
                  "grad_norm": result.grad_norm, "lr": result.lr, "samples_per_s": samples_per_s,
                  "data_wait": self._data_s / step_s, "step_s": step_s, "skipped": result.skipped,
                  "skipped_total": state.skipped}
        record.update({f"loss_t{i}": value for i, value in enumerate(result.bins)})
        record.update(result.extra)
        if self.peak_tflops is not None:
            record["mfu"] = mfu(self.flops[bucket], samples_per_s / self.world, self.peak_tflops)
        self._recent.append(step_s)
        self.rates.append(samples_per_s)
        return record

    def maybe_print(self, record: dict, final: bool) -> None:
        """Log the record (rank 0), print a progress line every `print_every` steps, at validations and at the
        end, and upload the run log every `sync_every` steps; then restart the step timer."""
        self.last.update(record)
        step = record["step"]
        if self.log is not None:
            self.log.log(record)
            if step % self.metrics.print_every == 0 or "val_loss" in record or "geneval" in record or final:
                LOG.info(self.line(record))
            if step % self.metrics.sync_every == 0:
                self.log.sync()

    def line(self, record: dict) -> str:
        step = record["step"]
        parts = [f"step {step}/{self.max_steps}", f"loss {record['loss']:.4f}"]
        if "dpo_accuracy" in record:
            parts.append(f"DPO accuracy {record['dpo_accuracy']:.2f}, margin {record['dpo_reward_margin']:.3f}")
        if "val_loss" in record:
            parts.append(f"EMA val loss {record['val_loss']:.4f}")
        if "geneval" in record:
            credits = [f"{f} {record[f'credit_{f}']:.2f}" for f in ("count", "colors", "shapes")
                       if f"credit_{f}" in record]
            parts.append(f"GenEval {record['geneval']:.3f}" + (f" ({', '.join(credits)})" if credits else ""))
        parts += [f"{label} {record[key]:.2f}" for key, label in (("clip_score", "CLIP score"), ("fid", "FID"))
                  if key in record]
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
        if "mfu" in record:
            parts.append(f"MFU {record['mfu']:.0%}")
        if step < self.max_steps:
            parts.append(f"ETA {duration(statistics.median(self._recent) * (self.max_steps - step))}")
        return " | ".join(parts)

    def median_rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None
