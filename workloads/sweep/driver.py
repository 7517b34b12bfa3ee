"""`python -m workloads.sweep study=depth|shift|formulation|steps preset=toy|paper data=<preprocessed>`.

Ray Tune runs one trial per configuration; each trial is a full `workloads.train` run (Ray Train + DeepSpeed, its
own fault tolerance) followed by sampling metrics of its EMA export: GenEval on shapes in every study, the latent
metric in the shift and steps studies. Trial runs
live in `<storage>/runs/<key>`, keyed by their training config, so studies share them: `study=steps` after
`study=depth` only samples. Results go to `<storage>/<name>/`: `trials/*.json` (one per finished trial),
`results.parquet`, `results.csv`, `report.md` and PNG plots, rewritten whenever a trial finishes. Running the same
command again resumes a sweep whose driver died: Tune skips finished trials and retries failed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import re
from typing import TYPE_CHECKING

import pandas as pd

from conf.checks import validate
from conf.sweep import SweepConf, register
from conf.train import TrainConf, TrainerConf
from pipelines import schema
from pipelines.storage import Location, join
from workloads.runtime import cli, ensure_ray, logger
from workloads.sweep import recipe, scores, studies
from workloads.train import driver as train
from workloads.train.runlog import SUMMARY

if TYPE_CHECKING:  # the sampling modules are imported where a trial samples
    from workloads.evaluate.inline import Sampling

LOG = logger("sweep")

TRIAL_DRIVER_CPUS = 0.25  # the trial's own process mostly waits on its Train workers


def sweep_name(cfg: SweepConf) -> str:
    """`name`, or one from the study, the preset and how it samples: a sweep sampling otherwise is another sweep
    (under the same name, Tune would resume the first one and keep its finished trials)."""
    if cfg.name:
        return cfg.name
    sampler = "" if cfg.sampler == "euler" else f"-{cfg.sampler}"
    return f"{cfg.study}-{cfg.preset}{sampler}{'-slg' if cfg.skip_layers else ''}"


def trial_train_conf(cfg: SweepConf, params: dict) -> TrainConf:
    """The training run of one trial: the sweep's `train` section with the trial's axis set (depth with the paper's
    width rule, training shift, formulation), the sweep's data, and the run named by its key."""
    if "knobs" in params:  # the recipe study: its own data variant, network, optimiser and budget
        c = recipe.trial_conf(cfg, params["knobs"])
        c.val_data, c.endpoint_url = cfg.val_data, cfg.endpoint_url
    else:
        c = copy.deepcopy(cfg.train)
        c.data, c.val_data, c.endpoint_url = cfg.data, cfg.val_data, cfg.endpoint_url
        c.model = cfg.train.model.with_depth(int(params["depth"]))
        c.objective.formulation, c.objective.shift = params["formulation"], float(params["train_shift"])
        if "lr" in params:  # the transfer study
            c.optim.lr, c.model.parametrization = float(params["lr"]), params["parametrization"]
    c.run.storage = join(cfg.storage, "runs")
    c.run.name = run_key(c)
    return c


def run_key(c: TrainConf) -> str:
    """A readable, stable run name from everything that shapes the training run (not where it is stored)."""
    settings = dataclasses.asdict(c)
    settings.pop("run")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9.]+", "-", c.objective.formulation.lower()).strip("-")
    mup = "-mup" if c.model.parametrization == "mup" else ""
    return f"d{c.model.depth}{mup}-{slug}-shift{c.objective.shift:g}-{digest}"


def finished(c: TrainConf) -> dict | None:
    """The run's summary when it already trained to the end and exported, else None."""
    run = train.run_location(c).refreshed()
    try:
        summary = json.loads(run.read_bytes(SUMMARY))
    except FileNotFoundError:
        return None
    done = summary.get("step", 0) >= c.trainer.max_steps and run.exists("export", "config.json")
    return summary if done else None


def evaluate(cfg: SweepConf, c: TrainConf, settings: list[tuple[int, float]],
             geneval_at: list[tuple[int, float]]) -> dict:
    """Sampling metrics of a finished run's EMA export (in a Ray task with a GPU when trials use GPUs): the latent
    metric at `settings` and GenEval-shapes at `geneval_at`, as the trial row's columns. GenEval scores the run
    already has at a setting (another study's) are read from its folder, not sampled again."""
    import tempfile

    import torch

    from model.interop import load_diffusers
    from model.precision import resolve_device
    from pipelines.geneval.credit import overall_credit
    from workloads.evaluate.inline import metric_fields
    from workloads.sweep.evaluation import sample_metrics
    from workloads.train.data import check_spec, read_spec
    from workloads.train.streaming import split_files
    from workloads.train.validation import read_val_set

    run = train.run_location(c)
    setting = {at: geneval_setting(cfg, c, *at) for at in geneval_at}
    summaries = {at: scores.read(run, s) for at, s in setting.items()}
    missing = [at for at, summary in summaries.items() if summary is None]
    out = {}
    if settings or missing:
        device = resolve_device("cuda" if c.trainer.use_gpu else "cpu")
        spec = read_spec(Location.of(c.data, c.endpoint_url))
        check_spec(spec, c.model.build())
        val_spec = read_spec(Location.of(c.val_data, c.endpoint_url)) if c.val_data else None
        split = split_files(spec, val_spec, c.loader.val_fraction)
        groups = read_val_set(split.val_data, split.val, cfg.eval_samples, 1, holdout=split.holdout)
        export = run.child("export")
        with tempfile.TemporaryDirectory() as tmp:
            export.fs.get(export.root + "/", tmp + "/", recursive=True)
            network = load_diffusers(tmp).to(device).eval()
        metrics = sample_metrics(network, groups[0], spec.text, settings, c.objective.formulation, c.trainer.seed,
                                 device, method=str(cfg.sampler)) if settings else {}
        for (steps, shift), values in metrics.items():
            out[studies.metric_column(cfg, "lfd", steps, shift)] = values["lfd"]
            out[studies.metric_column(cfg, "change", steps, shift)] = values["change"]
        if missing:
            latent_shape = tuple(groups[0].columns[schema.LATENT].shape[1:])
            for at, summary in geneval_summaries(cfg, c, network, spec, latent_shape, missing, device).items():
                scores.write(run, setting[at], summary)
                summaries[at] = summary
        del network
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for (steps, shift), summary in summaries.items():
        column = studies.metric_column(cfg, "geneval", steps, shift)
        out[column] = summary["overall"]
        if len(summaries) == 1:
            out |= {f"{column}_{t}": v for t, v in summary["tasks"].items()}
            out |= overall_credit(metric_fields(summary))
    return out


def geneval_sampling(cfg: SweepConf, c: TrainConf, steps: int, shift: float) -> Sampling:
    """How a trial's GenEval samples at (steps, shift): the sweep's guidance, sampler and skip-layer guidance, the
    run's formulation and seed."""
    from workloads.evaluate.inline import Sampling

    return Sampling(steps, cfg.geneval_guidance, shift, str(cfg.sampler), c.objective.formulation, c.trainer.seed,
                    cfg.skip_layer_guidance)


def geneval_setting(cfg: SweepConf, c: TrainConf, steps: int, shift: float) -> scores.GenEvalSetting:
    """The key of a trial's stored GenEval score at (steps, shift), made from the sampling that scores it."""
    how = geneval_sampling(cfg, c, steps, shift)
    return scores.GenEvalSetting(how.steps, how.shift, how.guidance, cfg.geneval_prompts_per_task,
                                 cfg.geneval_images_per_prompt, how.seed, how.method, how.slg)


def geneval_summaries(cfg: SweepConf, c: TrainConf, network, spec, latent_shape: tuple[int, ...],
                      settings: list[tuple[int, float]], device) -> dict[tuple[int, float], dict]:
    """GenEval-shapes (overall and per task) of the network's samples at each (steps, shift)."""
    from workloads.evaluate.inline import encode_prompt_set, geneval_summary, sample_prompt_set, to_uint8
    from workloads.train.validation import LatentDecoder

    if not spec.vae:
        raise ValueError(f"geneval_prompts_per_task: data={c.data} names no text encoders and VAE (models.sd3_repo "
                         "in its manifest); set geneval_prompts_per_task=0")
    prompts = encode_prompt_set(spec.vae, cfg.geneval_prompts_per_task, cfg.geneval_images_per_prompt,
                                device=device.type)
    decoder = LatentDecoder(spec.vae)
    decoder.for_scoring("geneval_prompts_per_task (0 turns it off)").to(device)
    out = {}
    for steps, shift in settings:
        latents = sample_prompt_set(network, prompts, spec.text, latent_shape, geneval_sampling(cfg, c, steps, shift),
                                    device)
        out[(steps, shift)] = geneval_summary(to_uint8(decoder(latents.to(device))), prompts)
    return out


def trial(config: dict) -> None:
    """One Tune trial: train (or find the finished run), evaluate, report, and refresh the sweep's results."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.geneval.credit import overall_credit

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
    if summary.get("geneval") is not None:  # the run's own last score (validation.geneval_every); a sweep's wins
        row["geneval"] = summary["geneval"]
        row |= overall_credit(summary)
    if "knobs" in params:
        row |= recipe.finished_row(cfg, params, c, summary)
    settings = studies.eval_settings(cfg, float(params["train_shift"]))
    geneval_at = studies.geneval_settings(cfg, float(params["train_shift"]))
    if settings or geneval_at:
        # outside the trial's placement group (it only holds the trial's own CPU share), like the Train workers
        task = ray.remote(evaluate).options(num_cpus=c.trainer.cpus_per_worker, num_gpus=int(c.trainer.use_gpu),
                                            scheduling_strategy="DEFAULT")
        row.update(ray.get(task.remote(cfg, c, settings, geneval_at)))
    results_location(cfg).write_bytes(f"trials/{c.run.name}.json", json.dumps(row).encode())
    write_results(cfg)
    LOG.info(f"trial {c.run.name} done: depth {params['depth']}, validation loss {row['val_loss']:.4f}, "
             f"{row['params']:,} parameters")
    ray.tune.report(row)


def results_location(cfg: SweepConf) -> Location:
    """`<storage>/<name>/`: the sweep's trial rows, results tables, report and plots."""
    return Location.of(join(cfg.storage, sweep_name(cfg)), cfg.endpoint_url)


def read_rows(cfg: SweepConf) -> pd.DataFrame:
    results = results_location(cfg).refreshed()
    folder = results.path("trials")
    files = sorted(results.fs.glob(join(folder, "*.json"))) if results.fs.exists(folder) else []
    rows = [json.loads(results.fs.cat_file(f)) for f in files]
    if cfg.study == "recipe":  # its trials by name: a study's runs keep their names when the code keying them changes
        wanted = {p["trial"] for p in studies.trial_params(cfg)}
        return pd.DataFrame(recipe.latest_rows([r for r in rows if r.get("trial") in wanted]))
    wanted = {trial_train_conf(cfg, p).run.name for p in studies.trial_params(cfg)}
    return pd.DataFrame([r for r in rows if r["run"] in wanted])


def write_results(cfg: SweepConf) -> pd.DataFrame:
    """results.parquet/.csv, report.md and plots from the trials finished so far."""
    results = read_rows(cfg)
    out = results_location(cfg)
    if results.empty:
        return results
    buffer = io.BytesIO()
    results.to_parquet(buffer, index=False)
    out.write_bytes("results.parquet", buffer.getvalue())
    out.write_bytes("results.csv", results.to_csv(index=False).encode())
    analysis = studies.analyze(cfg, results)
    for name, png in analysis.plots.items():
        out.write_bytes(name, png)
    total = len(studies.trial_params(cfg))
    report = [f"# {cfg.study} study ({cfg.preset} preset)", "",
              f"{len(results)} of {total} trials finished; data `{cfg.data or join(cfg.storage, 'data')}`; trial runs "
              "under "
              f"`{join(cfg.storage, 'runs')}`.", "", analysis.markdown, ""]
    report += [f"![{name}]({name})" for name in analysis.plots]
    out.write_bytes("report.md", ("\n".join(report) + "\n").encode())
    return results


def check(cfg: SweepConf, with_data: bool = True) -> list[TrainConf]:
    """Every trial's training config checked (and, `with_data`, the data against each data set's largest model)
    before Ray starts. The recipe study checks its data after it has made it."""
    validate(cfg)
    confs = [trial_train_conf(cfg, p) for p in studies.trial_params(cfg)]
    if not confs:
        raise ValueError(f"the {cfg.study} study has no trials: check depths / training_shifts / formulations")
    for c in confs:
        train.check(c)
        cfg.check_skip_layers_fit(c.model.build().depth, f", in trial {c.run.name}")
    if with_data:
        for data in sorted({c.data for c in confs}):
            train.plan(max((c for c in confs if c.data == data), key=lambda c: c.model.depth))
    return confs


def trial_cpus(t: TrainerConf) -> float:
    """The CPUs one trial holds while it trains: its own process, its Train workers and a reader of their data."""
    return TRIAL_DRIVER_CPUS + t.num_workers * t.cpus_per_worker + 1


def concurrency(cfg: SweepConf) -> int:
    """Trials that fit the cluster at once (its CPUs, and GPUs when trials use them), or the configured cap."""
    import ray

    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    resources = ray.cluster_resources()
    t = cfg.train.trainer
    fits = resources.get("CPU", 1) / trial_cpus(t)
    if t.use_gpu:
        fits = min(fits, resources.get("GPU", 0) / t.num_workers)
    return max(1, math.floor(fits))


def run(cfg: SweepConf) -> pd.DataFrame:
    import ray.tune

    check(cfg, with_data=cfg.study != "recipe")
    # room for `max_concurrent_trials` trials at once (logical CPUs: the OS shares the cores between them)
    t = cfg.train.trainer
    ensure_ray(min_cpus=max(t.num_workers * t.cpus_per_worker + 2, (cfg.max_concurrent_trials or 1) * trial_cpus(t)))
    if cfg.study == "recipe":
        recipe.prepare_data(cfg)
        check(cfg)
    from workloads.train.streaming import ray_storage

    pafs, storage = ray_storage(Location.of(cfg.storage, cfg.endpoint_url))
    trainable = ray.tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPUS})
    experiment = join(storage, sweep_name(cfg))
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=pafs):
        LOG.info(f"resuming {experiment}: finished trials are kept, failed ones retried")
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=pafs,
                                       param_space=param_space(cfg))
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency(cfg), scheduler=scheduler(cfg)),
            # verbose=0: no status table every few seconds; each trial logs one line when it finishes instead
            run_config=ray.tune.RunConfig(name=sweep_name(cfg), storage_path=storage, storage_filesystem=pafs,
                                          verbose=0,
                                          failure_config=ray.tune.FailureConfig(max_failures=cfg.max_failures)))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if cfg.study == "recipe":
        recipe.record_stopped(cfg, grid)
        recipe.try_sampling(cfg, read_rows(cfg))
    results = write_results(cfg)
    LOG.info(f"{len(results)} trials finished, {len(errors)} failed; report "
          f"{join(cfg.storage, sweep_name(cfg), 'report.md')}")
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed; run the same command again to retry them: {errors[0]}")
    return results


def scheduler(cfg: SweepConf):
    """The recipe study's successive halving (ASHA) on its GenEval metric; None (run every trial out) otherwise."""
    if cfg.study != "recipe":
        return None
    from ray.tune.schedulers import ASHAScheduler

    r = cfg.recipe
    # Time is Tune's count of a trial's reports: every trial reports after equal shares of the same FLOPs budget.
    # The rungs stop before the last report (max_t), and a trial that reaches it is never stopped: a trial stopped
    # there would be killed while it writes its export and summary, with nothing left to save.
    return ASHAScheduler(time_attr="training_iteration", metric=r.metric, mode="max", max_t=r.reports - 1,
                         grace_period=r.grace, reduction_factor=r.reduction_factor, stop_last_trials=False)


def param_space(cfg: SweepConf) -> dict:
    import ray.tune

    # deepest first: with trials side by side, the longest run starts at once rather than last
    params = sorted(studies.trial_params(cfg), key=lambda p: -int(p["depth"]))
    return {"sweep": cfg, "params": ray.tune.grid_search(params)}


register()


def main() -> None:
    cli("sweep", run, doc=__doc__)


if __name__ == "__main__":
    main()
