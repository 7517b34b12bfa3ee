"""The figures of `tools.gpu.gpu_job`: a stage runner that records each stage's figures, time and error in
one JSON file as it goes, and the final table (each figure beside its baseline and their ratio)."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workloads.runtime import logger, one_line

LOG = logger("gpu_job")
ENCODER_NAMES = {"vae": "VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}  # as Table 7 names them


def free_device_memory() -> None:
    """Give back what this process cached on the GPU: the next stage's actors or workers are other processes."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Job:
    """Figures by stage (`figures["stages"][name]`: seconds, error, then the stage's own), written to `report`
    after every stage so that a run stopped by its time guard keeps what it measured."""

    report: Path
    figures: dict = field(default_factory=dict)

    def stage(self, name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one stage: its figures, or None when it failed (the error is recorded and the job goes on)."""
        LOG.info(f"--- {name}")
        start = time.perf_counter()
        try:
            result, error = fn(), None
        except Exception as err:  # one failed stage must not hide the others' figures
            LOG.exception(f"{name} failed")
            result, error = {}, f"{type(err).__name__}: {one_line(err)}"
        seconds = time.perf_counter() - start
        self.figures.setdefault("stages", {})[name] = {"seconds": round(seconds, 1), "error": error, **result}
        LOG.info(f"--- {name}: {seconds:.1f} s" + (f", failed: {error}" if error else ""))
        free_device_memory()
        self.write()
        return None if error else result

    def write(self) -> None:
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(json.dumps(self.figures, indent=1, default=str) + "\n")


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""


def _ratio(value: float | None, baseline: float | None) -> str:
    return f"{value / baseline:.2f}" if value is not None and baseline else ""


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _done(stages: dict, name: str) -> dict | None:
    stage = stages.get(name)
    return stage if stage and not stage.get("error") else None


def encoder_rows(s: dict) -> list[Row]:
    return [Row(f"{ENCODER_NAMES[name]} ms/sample ({s['dtype']}, batch {s['batch']})", f"{ms:.3f}",
                f"paper {s['paper_ms'][name]} ms", _ratio(ms, s["paper_ms"][name]))
            for name, ms in s["ms_per_sample"].items()]


def preprocess_rows(p: dict) -> list[Row]:
    plain = p["plain_images_per_s"]
    rows = [Row(f"preprocess images/s (Ray Data job, {p['images']} images)", f"{p['images_per_s']:.1f}",
                f"plain loop {plain:.1f}", _ratio(p["images_per_s"], plain))]
    if p.get("steady_images_per_s"):
        rows.append(Row("  after the first shard", f"{p['steady_images_per_s']:.1f}", f"plain loop {plain:.1f}",
                        _ratio(p["steady_images_per_s"], plain)))
    shares = ", ".join(f"{name} {share:.0%}" for name, share in p["plain_shares"].items())
    return [*rows, Row("  plain loop time share", shares)]


def attention_rows(a: dict) -> list[Row]:
    used = "+".join(a["used"]) or "none seen"
    rows = [Row(f"SDPA used at {a['resolution']}^2 ({a['tokens']} tokens, head dim {a['head_dim']}, {a['dtype']})",
                used, f"flash-only: {a['flash_only']}", "math fallback!" if a["math_fallback"] else "")]
    if a.get("enabled"):
        rows.append(Row("  SDPA backends enabled", ", ".join(k for k, on in a["enabled"].items() if on)))
    return rows


def train_rows(t: dict, n: dict | None, mfu_target: float) -> list[Row]:
    alone = n or {}
    rows = [Row(f"train samples/s (job, batch {t['batch']}, ZeRO-{t['zero_stage']})", f"{t['samples_per_s']:.1f}",
                f"network alone {alone['samples_per_s']:.1f}" if n else "", _ratio(t["samples_per_s"],
                                                                                   alone.get("samples_per_s"))),
            Row("train MFU (job)", _percent(t["mfu"]), f"network alone {_percent(alone.get('mfu'))}" if n else "",
                _ratio(t["mfu"], alone.get("mfu")))]
    if t["mfu"] is not None:
        verdict = "met" if t["mfu"] >= mfu_target else "not met"
        rows.append(Row("  MFU target of the job", f"{mfu_target:.0%}", verdict))
    steps = f"{t['first_step_s']:.2f} s / {t['median_step_s']:.3f} s"
    rows.append(Row("  first step (compiles on GPU) / median step", steps, f"data wait {t['data_wait']:.1%} of a step"))
    if t.get("run_error"):
        rows.append(Row("  the job ended with", t["run_error"], f"figures from {t['source']}"))
    return rows


def job_rows(figures: dict, mfu_target: float) -> list[Row]:
    """The table of a run's figures; a stage that failed shows its error, one that did not run is left out."""
    stages = figures.get("stages", {})
    rows = [Row("device", str(figures.get("device")), f"peak {figures.get('peak_tflops') or '-'} TFLOP/s bf16")]
    if s := _done(stages, "encoders"):
        rows += encoder_rows(s)
    if p := _done(stages, "preprocess"):
        rows += preprocess_rows(p)
    if a := _done(stages, "attention"):
        rows += attention_rows(a)
    n = _done(stages, "network alone")
    if n:
        rows.append(Row(f"network alone ms/step (batch {n['batch']}, latent {n['latent']}^2)",
                        f"{n['ms_per_step']:.1f}", f"MFU {_percent(n['mfu'])}"))
    if (t := _done(stages, "train")) and t.get("samples_per_s"):
        rows += train_rows(t, n, mfu_target)
    rows += [Row(f"{name} FAILED", s["error"]) for name, s in stages.items() if s.get("error")]
    times = ", ".join(f"{name} {s['seconds']:.0f}" for name, s in stages.items())
    return [*rows, Row("stage seconds", times, f"total {figures.get('seconds', 0):.0f} s")]


def format_table(rows: list[Row]) -> str:
    """Aligned columns: figure, value, baseline, ratio."""
    table = [Row("figure", "value", "baseline", "ratio"), *rows]
    # a long cell (the time shares) runs over rather than widening its whole column
    widths = [min(cap, max(len(getattr(r, f)) for r in table)) for f, cap in (("figure", 60), ("value", 24),
                                                                                ("baseline", 40))]
    return "\n".join(f"{r.figure:<{widths[0]}}  {r.value:<{widths[1]}}  {r.baseline:<{widths[2]}}  {r.ratio}".rstrip()
                     for r in table)
