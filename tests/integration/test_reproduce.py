"""`make reproduce` end to end, shrunk far below its quick preset to fit the suite: the shapes at two resolutions
(with synthetic captions from their ground truth) -> every study as a Ray Tune sweep of `workloads.sweep` on shared
runs -> DPO of the shipped shapes reference model -> report.md with a verdict per claim. Started from the command
line, stopped (SIGTERM) once its first trial finished, then run again: the interrupted sweep resumes and nothing
finished is redone."""

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

from conf.reproduce import ReproduceConf
from model.formulations import PAPER_GLOBAL_RANK, paper_global_rank
from workloads import runtime
from workloads.reproduce import autoencoder, findings
from workloads.reproduce import driver as reproduce
from workloads.train.runlog import EVENTS, read_records

ROOT = Path(__file__).resolve().parents[2]
FORMULATIONS = ["rf/lognorm(0.00,1.00)", "eps/linear"]
SETTINGS = {"images": 48, "image_size": 64, "shard_size": 16, "resolution": 32, "high_resolution": 64,
            "depths": [1, 2], "study_depth": 2, "sampling_steps": [2, 4], "sampling_shifts": [1.0, 3.0],
            "geneval_prompts_per_task": 1, "geneval_images_per_prompt": 1, "geneval_steps": 2, "eval_samples": 8,
            "dpo_steps": 2, "pairs_prompts_per_task": 1, "pairs_images_per_prompt": 2, "pairs_sample_steps": 2,
            "dpo_geneval_images_per_prompt": 1, "reference_images": 8, "channels": [4, 16], "channel_depths": [],
            "reconstruction_images": 4}  # the autoencoder finding's reconstruction only: its depth series cost minutes
TRAIN = {"trainer.max_steps": 4, "trainer.batch_size": 8, "optim.warmup_steps": 1, "ema.decay": 0.9,
         "validation.every": 4, "validation.samples": 8, "validation.grid_prompts": 1,
         "validation.grid_per_prompt": 1, "validation.sample_steps": 2, "checkpoint.every": 4}


def overrides(out_dir: Path) -> list[str]:
    """The quick preset (`make reproduce preset=quick`), shrunk by overrides to fit the suite."""
    args = ["preset=quick", f"out_dir={out_dir}", "formulations=[" + ",".join(f"'{f}'" for f in FORMULATIONS) + "]"]
    args += [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}" for k, v in SETTINGS.items()]
    return args + [f"train.{k}={v}" for k, v in TRAIN.items()]


def cli(out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "workloads.reproduce", *overrides(out_dir)]


def conf(out_dir: Path) -> ReproduceConf:
    """The command line's config, composed in this process from the same overrides."""
    return runtime.compose("reproduce", overrides(out_dir))


@pytest.fixture(scope="module")
def reproduced(ray_local, tmp_path_factory):
    """The command line stopped after the formulation study's first trial, then the same `run` in this process. Both
    join the session's Ray (RAY_ADDRESS), as a job submitted to a cluster does."""
    import ray

    out = tmp_path_factory.mktemp("reproduce") / "report"
    cfg = conf(out)
    trials = Path(reproduce.Layout.of(cfg).storage) / "formulation" / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = out.parent / "first.log"  # a file, not a pipe: Ray's output would fill a pipe and stall the job
    with log.open("wb") as sink:
        first = subprocess.Popen(cli(out), cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and first.poll() is None and not (trials.exists() and any(trials.iterdir())):
        time.sleep(0.5)
    assert first.poll() is None, log.read_text()[-3000:]
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    # the trials recorded before the signal, as they were: a resume that re-ran one would rewrite its record
    interrupted = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(trials.glob("*.json"))}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reproduce.run(cfg)
    return cfg, out, interrupted, printed.getvalue()


def trained_runs(cfg: ReproduceConf) -> dict[str, list[str]]:
    runs = Path(reproduce.Layout.of(cfg).storage) / "runs"
    return {p.name: [e["event"] for e in read_records(str(p), EVENTS)] for p in sorted(runs.iterdir())}


def study(cfg: ReproduceConf, name: str) -> Path:
    return Path(reproduce.Layout.of(cfg).storage) / name


def results(cfg: ReproduceConf, name: str) -> pd.DataFrame:
    return pd.read_csv(study(cfg, name) / "results.csv")


def two_point_status(agrees: bool, tied: bool) -> str:
    """A rank-correlation claim over two points: their one order never reaches p < 0.05 (p = 1/2), so the verdict
    is inconclusive when the two agree with the paper (or tie) and not reproduced when they run against it."""
    return findings.INCONCLUSIVE if agrees or tied else findings.NOT_REPRODUCED


def expected_statuses(cfg: ReproduceConf) -> list[str]:
    """Each claim's verdict as the studies' stored results decide it: worked out here for the two-point claims, by
    the (unit-tested) rules of `findings` for the shift, caption and DPO comparisons."""
    from pipelines.geneval.stats import PairedChange

    form = results(cfg, "formulation").set_index("formulation")
    combined = form["val_loss"].rank(method="min") + form["geneval"].rank(ascending=False, method="min")
    first, other = combined["rf/lognorm(0.00,1.00)"], combined["eps/linear"]  # Table 1: rf/lognorm first
    statuses = [two_point_status(first < other, first == other)]
    depth = results(cfg, "depth").sort_values("depth")
    (l1, l2), (g1, g2) = depth["val_loss"], depth["geneval"]
    statuses.append(findings.INCONCLUSIVE if l2 < l1 else findings.NOT_REPRODUCED)  # any 2 falling points fit
    statuses.append(two_point_status((l2 < l1) == (g2 > g1), l1 == l2 or g1 == g2))
    sweeps = reproduce.sweeps(cfg, reproduce.Layout.of(cfg))
    shift = findings.shift(cfg, results(cfg, "shift-32"), results(cfg, "shift-64"), sweeps)
    statuses += [v.status for v in shift.verdicts]
    steps = results(cfg, "steps").sort_values("depth")
    lost = ((steps["lfd@steps=2"] - steps["lfd@steps=4"]) / steps["lfd@steps=4"]).tolist()
    statuses.append(two_point_status(lost[1] < lost[0], lost[1] == lost[0]))  # deeper: less lost at 2 steps
    captions = findings.captions(cfg, results(cfg, "captions-original"), results(cfg, "captions-mix"))
    statuses.append(captions.verdicts[0].status)
    runs = Path(reproduce.Layout.of(cfg).storage) / "runs"
    summaries = [json.loads(f.read_text()) for f in runs.glob("dpo-*/summary.json")]
    assert [f.parent.name for f in runs.glob("dpo-*/summary.json")] in ([], ["dpo-shapes-reference"])  # dpo_base
    if summaries and summaries[0].get("geneval_before") is not None:
        images = findings.images_per_trial(cfg, cfg.dpo_geneval_images_per_prompt)
        paired = PairedChange.of_summary(summaries[0], images)
        assert paired is not None  # before and after scored the same images
        statuses.append(findings.paired_verdict(paired)[0])
    else:
        statuses.append(findings.INCONCLUSIVE)  # DPO skipped: no pairs from the base's samples
    reconstructed = autoencoder.reconstruction(cfg)  # deterministic: the same held-out images, the shipped weights
    statuses += [autoencoder.reconstruction_verdict(reconstructed, size).status for size in (32, 64)]
    return statuses + [findings.INCONCLUSIVE] * 2  # Fig. 10's two claims: not trained (channel_depths=[])


def test_every_claim_gets_a_verdict_beside_the_papers_figure(reproduced):
    cfg, out, _, _ = reproduced
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["finding"] for v in verdicts] == ["formulation", "depth", "depth", "shift", "shift", "steps",
                                                "captions", "dpo", *["autoencoder"] * 4]
    assert all(v["reason"] for v in verdicts)
    assert [v["status"] for v in verdicts] == expected_statuses(cfg), verdicts
    report = (out / "report.md").read_text()
    assert report.count("| **") == len(verdicts)  # the verdict table: one row a claim
    for figure in ("15.58", "4.30", "43.27", "49.78", "0.68 -> 0.71", "sqrt(m/n)", "PSNR 25.12 / 28.62"):
        assert figure in report, figure
    for plot in ("formulation-formulations.png", "depth-scaling.png", "steps-steps.png", "shift-32-shift.png",
                 "shift-64-shift.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report


def test_the_interrupted_command_resumes_and_each_run_trains_once(reproduced):
    cfg, _, interrupted, printed = reproduced
    # two trials train side by side (concurrent_trials): the second may also have finished before the signal landed
    assert 1 <= len(interrupted) <= len(FORMULATIONS) and "[sweep] resuming" in printed
    trials = study(cfg, "formulation") / "trials"
    # a trial finished before the signal keeps its record (Tune may report it once more when the signal landed before
    # it recorded the trial's end: the same row, rewritten from the finished run, not a retrained one)
    for name, (record, _) in interrupted.items():
        assert (trials / name).read_bytes() == record, name
    runs = trained_runs(cfg)
    # d1 and d2 (depth; d2 is also the formulation, steps, 32-px shift and original-captions run), eps/linear at
    # d2, d2 at 64 px, the caption mix at d2; DPO too when the 4-step runs drew a correct and an incorrect image
    flow = {name: events for name, events in runs.items() if not name.startswith("dpo-")}
    assert len(flow) == 5 and all(events[-1] == "finished" and events.count("finished") == 1
                                  for events in runs.values()), runs  # each run trains to the end once
    finished_first = {name.removesuffix(".json") for name in interrupted}
    in_flight = set(results(cfg, "formulation")["run"]) - finished_first
    for name, events in runs.items():
        if events != ["started", "finished"]:
            # only the other formulation trial, in training when the signal landed, starts (or resumes) again
            assert name in in_flight and set(events[:-1]) <= {"started", "resumed"}, (name, events)
    assert all(runs[name] == ["started", "finished"] for name in finished_first)
    names = ("formulation", "depth", "steps", "shift-32", "shift-64", "captions-original", "captions-mix")
    runs_of = {name: set(pd.read_csv(study(cfg, name) / "results.csv")["run"]) for name in names}
    assert runs_of["captions-original"] <= runs_of["formulation"] & runs_of["depth"] & runs_of["shift-32"]
    assert runs_of["steps"] == runs_of["depth"] and runs_of["shift-64"].isdisjoint(runs_of["depth"])
    (mix,) = runs_of["captions-mix"]
    assert mix in flow and mix not in runs_of["formulation"] | runs_of["depth"]


def test_a_run_scored_by_several_studies_is_sampled_once_per_setting(reproduced):
    cfg, _, _, _ = reproduced
    rows = {name: pd.read_csv(study(cfg, name) / "results.csv") for name in ("formulation", "depth", "steps",
                                                                             "shift-32", "captions-original")}
    (run,) = rows["captions-original"]["run"]  # the study-depth run at the training shift (1) and resolution 32
    # GenEval at 2 sampling steps and shift 1 (five studies), at 4 steps (steps) and at shift 3 (shift): three files
    scored = sorted((study(cfg, "runs") / run / "scores").glob("geneval-*.json"))
    assert len(scored) == 3, scored
    score = lambda name, column="geneval": rows[name].set_index("run").loc[run, column]  # noqa: E731
    assert score("formulation") == score("depth") == score("captions-original") == score("steps", "geneval@steps=2") \
        == score("shift-32", "geneval@shift=1")
    records = [json.loads(f.read_text()) for f in scored]
    stored = {r["setting"]["steps"]: r["summary"]["overall"] for r in records if r["setting"]["shift"] == 1.0}
    assert stored == {2: score("depth"), 4: score("steps", "geneval@steps=4")}


def test_the_formulation_tables_rank_the_trials_and_correlate_with_table_1(reproduced):
    cfg, out, _, _ = reproduced
    results = pd.read_csv(study(cfg, "formulation") / "results.csv")
    assert sorted(results["formulation"]) == sorted(FORMULATIONS) and (results["val_loss"] > 0).all()
    ranked = results.sort_values("val_loss")["formulation"].tolist()
    paper = sorted(ranked, key=PAPER_GLOBAL_RANK.__getitem__)
    d2 = sum((i - paper.index(f)) ** 2 for i, f in enumerate(ranked))
    rho = 1 - 6 * d2 / (len(ranked) * (len(ranked) ** 2 - 1))  # Spearman's formula, no ties
    # the sweep's own report: ranked by validation loss, each beside its Table 1 rank
    sweep_report = (study(cfg, "formulation") / "report.md").read_text()
    header, _, *rows = [line.strip("| ").split(" | ") for line in sweep_report.splitlines() if line.startswith("| ")]
    assert header == ["rank", "formulation", "val_loss", "geneval", "geneval_rank", "paper_global_rank"]
    assert [row[:2] for row in rows] == [[str(i), f] for i, f in enumerate(ranked, 1)]
    assert [float(row[5]) for row in rows] == [PAPER_GLOBAL_RANK[f] for f in ranked]
    assert f"ranked by validation loss: Spearman correlation with the paper's global ranking (Table 1) over 2 " \
           f"formulations: {rho:.3f}" in sweep_report
    # the reproduction's: both rankings and their combination
    section = (out / "report.md").read_text().split("## 1. ")[1].split("## 2. ")[0]
    header, _, *rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    assert header == ["formulation", "val_loss", "loss_rank", "geneval", "geneval_rank", "combined_rank",
                      "paper_global_rank"]
    assert {row[0]: float(row[2]) for row in rows} == {f: float(i) for i, f in enumerate(ranked, 1)}
    assert [float(row[6]) for row in rows] == [paper_global_rank(row[0]) for row in rows]
    assert f"ranked by validation loss: Spearman correlation with Table 1's global ranks over 2 formulations: " \
           f"{rho:.3f}" in section


def test_depth_steps_and_shift_studies_write_their_tables(reproduced):
    cfg, _, _, _ = reproduced
    depth = pd.read_csv(study(cfg, "depth") / "results.csv").sort_values("depth")
    assert depth["depth"].tolist() == [1, 2] and (depth["params"].diff().dropna() > 0).all()
    assert (depth["train_flops"] > 0).all() and depth["geneval"].between(0, 1).all() and "geneval_counting" in depth
    report = (study(cfg, "depth") / "report.md").read_text()
    assert "2 of 2 trials finished" in report and "against C:" in report and "predicted final validation loss" in report
    assert "validation loss against GenEval-shapes" in report and len(pd.read_parquet(
        study(cfg, "depth") / "results.parquet")) == 2
    steps = pd.read_csv(study(cfg, "steps") / "results.csv")
    assert {"lfd@steps=2", "lfd@steps=4", "change@steps=2", "geneval@steps=2", "geneval@steps=4"} <= set(steps)
    assert (steps["change@steps=4"] == 0).all() and (steps["change@steps=2"] > 0).all()
    report = (study(cfg, "steps") / "report.md").read_text()
    assert "LFD +% at 2" in report and "GenEval at 4" in report
    for resolution in (32, 64):
        shift = pd.read_csv(study(cfg, f"shift-{resolution}") / "results.csv")
        assert {"lfd@shift=1", "lfd@shift=3", "geneval@shift=1", "geneval@shift=3"} <= set(shift)
        report = (study(cfg, f"shift-{resolution}") / "report.md").read_text()
        assert "best sampling shift for 'LFD, trained at shift 1'" in report
        assert "best sampling shift for 'GenEval, trained at shift 1'" in report


def test_a_bad_setting_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="study_depth=3"):
        ReproduceConf(out_dir=str(tmp_path), study_depth=3, depths=[1, 2])
    cmd = [sys.executable, "-m", "workloads.reproduce", f"out_dir={tmp_path}", "high_resolution=32"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and "Traceback" not in done.stderr
    assert "high_resolution" in done.stderr and not (tmp_path / "work").exists()


def test_the_report_folder_is_kept_on_object_storage(s3, tmp_path):
    from pipelines.storage import Location
    from workloads.reproduce import report

    files = {"report.md": b"# report\n", "verdicts.json": b"[]\n", "depth-scaling.png": b"\x89PNG"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "work").mkdir()  # a local run's data folder is not the report's
    report.publish(tmp_path, Location.of(s3.uri("reproduce/report")))
    back = Location.of(s3.uri("reproduce/report"))
    assert sorted(p.rsplit("/", 1)[-1] for p in back.fs.ls(back.root)) == sorted(files)
    assert all(back.read_bytes(name) == data for name, data in files.items())
