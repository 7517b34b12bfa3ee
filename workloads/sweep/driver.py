"""`python -m workloads.sweep study=depth|shift|formulation|steps preset=toy|paper data=<preprocessed>`.

Ray Tune runs one trial per configuration; each trial is a full `workloads.train` run (Ray Train + DeepSpeed, its
own fault tolerance) followed, for the shift and steps studies, by sampling metrics from its EMA export. Trial runs
live in `<storage>/runs/<key>`, keyed by their training config, so studies share them: `study=steps` after
`study=depth` only samples. Results go to `<storage>/<name>/`: `trials/*.json` (one per finished trial),
`results.parquet`, `results.csv`, `report.md` and PNG plots, rewritten whenever a trial finishes. Running the same
command again resumes a sweep whose driver died: Tune skips finished trials and retries failed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re

import pandas as pd

from conf.model import ModelConf
from conf.sweep import SweepConf, register
from conf.train import TrainConf
from pipelines.storage import filesystem, join, refreshed, write_bytes
from workloads.runtime import cli, ensure_ray
from workloads.sweep import studies
from workloads.train import driver as train
from workloads.train.runlog import SUMMARY

TRIAL_DRIVER_CPUS = 0.25  # the trial's own process mostly waits on its Train workers


def sweep_name(cfg: SweepConf) -> str:
    return cfg.name or f"{cfg.study}-{cfg.preset}"


def trial_train_conf(cfg: SweepConf, params: dict) -> TrainConf:
    """The training run of one trial: width 64 * depth and depth heads (the paper's family), shared settings."""
    t, depth = cfg.train, int(params["depth"])
    c = TrainConf(data=cfg.data, val_data=cfg.val_data, endpoint_url=cfg.endpoint_url)
    c.model = ModelConf(flavor=t.base_flavor, depth=depth, hidden_size=64 * depth, num_heads=depth)
    c.trainer.num_workers, c.trainer.use_gpu = cfg.trial.workers, cfg.trial.use_gpu
    c.trainer.cpus_per_worker, c.trainer.max_steps, c.trainer.batch_size = cfg.trial.cpus_per_worker, t.steps, \
        t.batch_size
    c.deepspeed.stage = t.deepspeed_stage
    c.optim.lr, c.optim.warmup_steps = t.lr, t.warmup_steps
    c.objective.formulation, c.objective.shift = params["formulation"], float(params["train_shift"])
    c.ema.decay = t.ema_decay
    v = c.validation
    v.every, v.samples, v.grid_prompts, v.grid_per_prompt, v.sample_steps = \
        t.val_every, t.val_samples, t.grid_prompts, t.grid_per_prompt, 20
    c.checkpoint.every, c.checkpoint.keep = t.checkpoint_every, 2
    c.run.storage = join(cfg.storage, "runs")
    c.run.name = run_key(c)
    return c


def run_key(c: TrainConf) -> str:
    """A readable, stable run name from everything that shapes the training run (not where it is stored)."""
    settings = dataclasses.asdict(c)
    settings.pop("run")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9.]+", "-", c.objective.formulation.lower()).strip("-")
    return f"d{c.model.depth}-{slug}-shift{c.objective.shift:g}-{digest}"


def finished(c: TrainConf) -> dict | None:
    """The run's summary when it already trained to the end and exported, else None."""
    fs, root = refreshed(join(c.run.storage, c.run.name), c.endpoint_url)
    try:
        summary = json.loads(fs.cat_file(join(root, SUMMARY)))
    except FileNotFoundError:
        return None
    done = summary.get("step", 0) >= c.trainer.max_steps and fs.exists(join(root, "export", "config.json"))
    return summary if done else None


def evaluate(cfg: SweepConf, c: TrainConf, settings: list[tuple[int, float]]) -> dict:
    """Sampling metrics of a finished run's EMA export (in a Ray task with a GPU when trials use GPUs)."""
    import tempfile

    import torch

    from model.interop import load_diffusers
    from model.precision import resolve_device
    from workloads.sweep.evaluation import sample_metrics
    from workloads.train.data import check_spec, read_spec
    from workloads.train.streaming import split_files
    from workloads.train.validation import read_val_set

    device = resolve_device("cuda" if cfg.trial.use_gpu else "cpu")
    spec = read_spec(c.data, c.endpoint_url)
    check_spec(spec, c.model.build(), c.endpoint_url)
    val_spec = read_spec(c.val_data, c.endpoint_url) if c.val_data else None
    groups = read_val_set(split_files(spec, val_spec, c.loader.val_fraction).val, cfg.eval_samples, 1,
                          c.endpoint_url)
    fs, root = filesystem(join(c.run.storage, c.run.name, "export"), c.endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(root + "/", tmp + "/", recursive=True)
        network = load_diffusers(tmp).to(device).eval()
    metrics = sample_metrics(network, groups[0], spec.text, settings, c.objective.formulation, c.trainer.seed,
                             device)
    out = {}
    for (steps, shift), values in metrics.items():
        key = f"shift={shift:g}" if cfg.study == "shift" else f"steps={steps}"
        out[f"lfd@{key}"], out[f"change@{key}"] = values["lfd"], values["change"]
    del network
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def trial(config: dict) -> None:
    """One Tune trial: train (or find the finished run), evaluate, report, and refresh the sweep's results."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg: SweepConf = config["sweep"]
    params = config["params"]
    c = trial_train_conf(cfg, params)
    summary = finished(c)
    if summary is None:
        train.run(c, callbacks=[TuneReportCallback()])
        summary = finished(c)
        if summary is None:
            raise RuntimeError(f"run {c.run.name} ended without its summary and export")
    row = {**params, "run": c.run.name, "params": summary["params"],
           "flops_per_sample": summary["train_flops_per_sample"],
           "train_flops": summary["train_flops_per_sample"] * c.trainer.max_steps * c.trainer.batch_size,
           "val_loss": summary["val_loss"], "samples_per_s": summary["samples_per_s"]}
    settings = studies.eval_settings(cfg, float(params["train_shift"]))
    if settings:
        # outside the trial's placement group (it only holds the trial's own CPU share), like the Train workers
        task = ray.remote(evaluate).options(num_cpus=cfg.trial.cpus_per_worker, num_gpus=int(cfg.trial.use_gpu),
                                            scheduling_strategy="DEFAULT")
        row.update(ray.get(task.remote(cfg, c, settings)))
    fs, root = filesystem(join(cfg.storage, sweep_name(cfg)), cfg.endpoint_url)
    write_bytes(fs, join(root, "trials", f"{c.run.name}.json"), json.dumps(row).encode())
    write_results(cfg)
    ray.tune.report(row)


def read_rows(cfg: SweepConf) -> pd.DataFrame:
    fs, root = refreshed(join(cfg.storage, sweep_name(cfg)), cfg.endpoint_url)
    folder = join(root, "trials")
    files = sorted(fs.glob(join(folder, "*.json"))) if fs.exists(folder) else []
    wanted = {trial_train_conf(cfg, p).run.name for p in studies.trial_params(cfg)}
    rows = [json.loads(fs.cat_file(f)) for f in files]
    return pd.DataFrame([r for r in rows if r["run"] in wanted])


def write_results(cfg: SweepConf) -> pd.DataFrame:
    """results.parquet/.csv, report.md and plots from the trials finished so far."""
    results = read_rows(cfg)
    fs, root = filesystem(join(cfg.storage, sweep_name(cfg)), cfg.endpoint_url)
    if results.empty:
        return results
    buffer = io.BytesIO()
    results.to_parquet(buffer, index=False)
    write_bytes(fs, join(root, "results.parquet"), buffer.getvalue())
    write_bytes(fs, join(root, "results.csv"), results.to_csv(index=False).encode())
    analysis = studies.analyze(cfg, results)
    for name, png in analysis.plots.items():
        write_bytes(fs, join(root, name), png)
    total = len(studies.trial_params(cfg))
    report = [f"# {cfg.study} study ({cfg.preset} preset)", "",
              f"{len(results)} of {total} trials finished; data `{cfg.data}`; trial runs under "
              f"`{join(cfg.storage, 'runs')}`.", "", analysis.markdown, ""]
    report += [f"![{name}]({name})" for name in analysis.plots]
    write_bytes(fs, join(root, "report.md"), ("\n".join(report) + "\n").encode())
    return results


def check(cfg: SweepConf) -> list[TrainConf]:
    """Every trial's training config checked (and the data against the largest model) before Ray starts."""
    confs = [trial_train_conf(cfg, p) for p in studies.trial_params(cfg)]
    if not confs:
        raise ValueError(f"the {cfg.study} study has no trials: check depths / training_shifts / formulations")
    for c in confs:
        train.check(c)
    largest = max(confs, key=lambda c: c.model.depth)
    train.plan(largest)
    if cfg.study == "steps" and len(cfg.sampling_steps) < 2:
        raise ValueError("the steps study needs at least two sampling_steps (the largest is the reference)")
    return confs


def concurrency(cfg: SweepConf) -> int:
    """Trials that fit the cluster at once (its CPUs, and GPUs when trials use them), or the configured cap."""
    import ray

    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    resources = ray.cluster_resources()
    cpus = TRIAL_DRIVER_CPUS + cfg.trial.workers * cfg.trial.cpus_per_worker + 1  # + a reader's CPU
    fits = resources.get("CPU", 1) / cpus
    if cfg.trial.use_gpu:
        fits = min(fits, resources.get("GPU", 0) / cfg.trial.workers)
    return max(1, math.floor(fits))


def run(cfg: SweepConf) -> pd.DataFrame:
    import ray.tune

    check(cfg)
    ensure_ray(min_cpus=cfg.trial.workers * cfg.trial.cpus_per_worker + 2)
    from workloads.train.streaming import ray_storage

    pafs, storage = ray_storage(cfg.storage, cfg.endpoint_url)
    trainable = ray.tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPUS})
    experiment = join(storage, sweep_name(cfg))
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=pafs):
        print(f"[sweep] resuming {experiment}: finished trials are kept, failed ones retried", flush=True)
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=pafs,
                                       param_space=param_space(cfg))
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency(cfg)),
            run_config=ray.tune.RunConfig(name=sweep_name(cfg), storage_path=storage, storage_filesystem=pafs,
                                          failure_config=ray.tune.FailureConfig(max_failures=cfg.max_failures)))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    results = write_results(cfg)
    print(f"[sweep] {len(results)} trials finished, {len(errors)} failed; report "
          f"{join(cfg.storage, sweep_name(cfg), 'report.md')}", flush=True)
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed; run the same command again to retry them: {errors[0]}")
    return results


def param_space(cfg: SweepConf) -> dict:
    import ray.tune

    return {"sweep": cfg, "params": ray.tune.grid_search(studies.trial_params(cfg))}


register()


def main() -> None:
    cli("sweep", run, doc=__doc__)


if __name__ == "__main__":
    main()
