"""Ray Tune studies on the local cluster: a depth sweep interrupted and resumed from the command line, then the
steps, shift and formulation studies on the same storage (reusing the trained runs where their configs match)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conf.sweep import SweepConf, toy_train
from model.formulations import PAPER_GLOBAL_RANK
from workloads.sweep import driver as sweep
from workloads.train.runlog import EVENTS, read_records

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"trainer.max_steps": 12, "trainer.batch_size": 8, "optim.warmup_steps": 2, "validation.every": 12,
         "checkpoint.every": 6, "validation.samples": 8}
SWEEP = {"depths": [1, 2], "study_depth": 1, "max_concurrent_trials": 1, "eval_samples": 16, "eval_sample_steps": 6,
         "sampling_shifts": [1.0, 3.0], "sampling_steps": [3, 6], "training_shifts": [1.0],
         "geneval_prompts_per_task": 1}


def cli(data: str, storage: str, study: str) -> list[str]:
    args = [f"study={study}", f"data={data}", f"storage={storage}"]
    args += [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}" for k, v in SWEEP.items()]
    args += [f"train.{k}={v}" for k, v in TRAIN.items()]
    return [sys.executable, "-m", "workloads.sweep", *args]


def conf(data: str, storage: str, study: str, **overrides) -> SweepConf:
    train = toy_train()
    for key, value in TRAIN.items():
        section, name = key.split(".")
        setattr(getattr(train, section), name, value)
    return SweepConf(study=study, data=data, storage=storage, train=train, **{**SWEEP, **overrides})


@pytest.fixture(scope="module")
def depth_sweep(train_dataset, ray_local, tmp_path_factory):
    """The depth sweep from the command line, stopped (SIGTERM) after its first trial, then run again (in this
    process: the same `run` the command calls). Both join the session's Ray, as a job submitted to a cluster does
    (RAY_ADDRESS), so the test starts no second cluster."""
    import ray

    storage = str(tmp_path_factory.mktemp("sweeps"))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    trials = Path(storage) / "depth-toy" / "trials"
    first = subprocess.Popen(cli(train_dataset, storage, "depth"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (trials.exists() and list(trials.glob("*.json"))):
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    interrupted = sorted(p.name for p in trials.glob("*.json"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sweep.run(conf(train_dataset, storage, "depth"))
    return storage, interrupted, printed.getvalue()


def test_interrupted_depth_sweep_resumes_without_rerunning_finished_trials(depth_sweep):
    storage, interrupted, stdout = depth_sweep
    assert len(interrupted) == 1
    assert "[sweep] resuming" in stdout
    results = pd.read_csv(Path(storage) / "depth-toy" / "results.csv")
    assert sorted(results["depth"]) == [1, 2]
    finished_first = results[results["run"] + ".json" == interrupted[0]]["run"].item()
    events = [e["event"] for e in read_records(str(Path(storage) / "runs" / finished_first), EVENTS)]
    assert events == ["started", "finished"]  # trained once: not rerun after the interruption
    assert (results["params"].diff().dropna() > 0).all() and (results["train_flops"] > 0).all()
    assert results["geneval"].between(0, 1).all() and "geneval_counting" in results  # GenEval-shapes per depth
    report = (Path(storage) / "depth-toy" / "report.md").read_text()
    assert "2 of 2 trials finished" in report and "against C:" in report and "predicted final validation loss" in report
    assert "validation loss against GenEval-shapes" in report
    assert (Path(storage) / "depth-toy" / "scaling.png").stat().st_size > 0
    assert len(pd.read_parquet(Path(storage) / "depth-toy" / "results.parquet")) == 2


def test_steps_and_shift_studies_sample_the_trained_runs(depth_sweep, train_dataset, ray_local):
    storage, _, _ = depth_sweep
    steps = sweep.run(conf(train_dataset, storage, "steps"))
    assert {"lfd@steps=3", "lfd@steps=6", "change@steps=3", "geneval@steps=3", "geneval@steps=6"} <= set(
        steps.columns)
    assert (steps["change@steps=6"] == 0).all() and (steps["change@steps=3"] > 0).all()
    report = (Path(storage) / "steps-toy" / "report.md").read_text()
    assert "LFD +% at 3" in report and "GenEval at 6" in report
    shift = sweep.run(conf(train_dataset, storage, "shift"))
    assert {"lfd@shift=1", "lfd@shift=3", "geneval@shift=1", "geneval@shift=3"} <= set(shift.columns)
    report = (Path(storage) / "shift-toy" / "report.md").read_text()
    assert "best sampling shift for 'LFD, trained at shift 1'" in report
    assert "best sampling shift for 'GenEval, trained at shift 1'" in report
    for study in ("steps", "shift"):  # evaluation only: the depth sweep's runs were reused
        for row in pd.read_csv(Path(storage) / f"{study}-toy" / "results.csv").itertuples():
            events = [e["event"] for e in read_records(str(Path(storage) / "runs" / row.run), EVENTS)]
            assert events == ["started", "finished"]


def test_formulation_study_ranks_next_to_the_paper(depth_sweep, train_dataset, ray_local):
    storage, _, _ = depth_sweep
    results = sweep.run(conf(train_dataset, storage, "formulation",
                             formulations=["rf/lognorm(0.00,1.00)", "eps/linear"]))
    assert sorted(results["formulation"]) == ["eps/linear", "rf/lognorm(0.00,1.00)"]
    report = (Path(storage) / "formulation-toy" / "report.md").read_text()
    ranked = results.sort_values("val_loss")["formulation"].tolist()
    header, _, *rows = [line.strip("| ").split(" | ") for line in report.splitlines() if line.startswith("| ")]
    assert header == ["rank", "formulation", "val_loss", "geneval", "geneval_rank", "paper_global_rank"]
    assert [row[:2] for row in rows] == [[str(i), f] for i, f in enumerate(ranked, 1)]
    assert [float(row[5]) for row in rows] == [PAPER_GLOBAL_RANK[f] for f in ranked]
    paper = sorted(ranked, key=PAPER_GLOBAL_RANK.__getitem__)
    d2 = sum((i - paper.index(f)) ** 2 for i, f in enumerate(ranked))
    rho = 1 - 6 * d2 / (len(ranked) * (len(ranked) ** 2 - 1))  # Spearman's formula, no ties
    assert f"ranked by validation loss: Spearman correlation with the paper's global ranking (Table 1) over 2 " \
           f"formulations: {rho:.3f}" in report
    assert json.loads((Path(storage) / "formulation-toy" / "trials").iterdir().__next__().read_text())["val_loss"] > 0
