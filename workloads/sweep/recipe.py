"""The recipe study (`study=recipe`): what makes the toy learn to draw what it is asked per unit of compute.

Trials are the base recipe and one knob changed at a time (`conf.recipe`); each trains at the same training FLOPs,
scores GenEval-shapes and its partial credits `reports` times on the way, and ASHA stops the trials that trail. The
data variants the trials need (the shapes generator's style, resolution, autoencoder) are made before Ray Tune
starts, once each, under `<storage>/data/<variant>/`. After the trials, the sampling knobs are tried on the best
finished network. The report ranks the knobs by their effect on the score against the base, and the trials by score
per CPU-minute.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

import pandas as pd

from conf.recipe import KNOBS, RecipeConf
from conf.shapes import AUTOENCODER_DOWNSAMPLE
from conf.sweep import SweepConf
from conf.train import TrainConf
from pipelines.storage import Location, join

BASE = "base"


def knob_value(value: Any) -> Any:
    """A knob's value as plain Python (Hydra hands a list as a ListConfig)."""
    if isinstance(value, str | int | float):
        return value
    return [float(v) for v in value]


def trials(r: RecipeConf) -> list[dict]:
    """{"trial": name, "knobs": every knob's value}: the base, then each value of a data or train axis that differs
    from the base (the sampling axes are tried on trained networks: `sampling_trials`)."""
    base = {k: knob_value(v) for k, v in r.base.items()}
    out = [{"trial": BASE, "knobs": base}]
    for name, values in r.axes.items():
        if KNOBS[name][0] == "sampling":
            continue
        for value in map(knob_value, values):
            if value != base[name]:
                out.append({"trial": f"{name}={_label(value)}", "knobs": base | {name: value}})
    return out


def _label(value: Any) -> str:
    return "-".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}" if isinstance(
        value, float) else str(value)


def data_variant(knobs: dict) -> dict:
    """The data knobs of a trial: what the shapes data and its preprocessing are made with."""
    low, high = knobs["object_size"]
    return {"min_side": float(low), "max_side": float(high), "max_objects": int(knobs["max_objects"]),
            "background_low": int(knobs["background_low"]), "resolution": int(knobs["resolution"]),
            "latent_channels": int(knobs["latent_channels"])}


def variant_key(variant: dict, images: int) -> str:
    digest = hashlib.sha1(json.dumps(variant | {"images": images}, sort_keys=True).encode()).hexdigest()[:8]
    return f"r{variant['resolution']}-c{variant['latent_channels']}-{digest}"


def variant_path(cfg: SweepConf, variant: dict) -> str:
    """The preprocessed data of a variant: `<storage>/data/<key>/data`."""
    return join(cfg.storage, "data", variant_key(variant, cfg.recipe.images), "data")


def prepare_data(cfg: SweepConf) -> dict[str, str]:
    """Make every data variant the trials need (shapes, then Ray Data preprocessing with the tiny models and the
    variant's autoencoder) unless it is already there; returns variant key -> data path."""
    from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
    from pipelines import make_shapes, preprocess
    from pipelines.make_shapes import MakeShapesConf
    from workloads.runtime import logger

    log = logger("sweep")
    variants = {variant_key(v, cfg.recipe.images): v for v in (data_variant(t["knobs"]) for t in trials(cfg.recipe))}
    out = {}
    for key, v in variants.items():
        root = join(cfg.storage, "data", key)
        data = join(root, "data")
        out[key] = data
        if Location.of(data, cfg.endpoint_url).exists("_manifest.json"):
            continue
        log.info(f"making data variant {key}: {cfg.recipe.images} images, {v}")
        shapes = join(root, "shapes")
        make_shapes.run(MakeShapesConf(out=shapes, n=cfg.recipe.images, seed=cfg.train.trainer.seed,
                                       size=v["resolution"], shard_size=100, formats=["folder"],
                                       endpoint_url=cfg.endpoint_url, min_side=v["min_side"],
                                       max_side=v["max_side"], max_objects=v["max_objects"],
                                       background_low=v["background_low"]))
        stage = StageConf(batch_size=16, num_cpus=0.5)
        preprocess.run(PreprocessConf(
            input=join(shapes, "folder"), output=data, input_format="folder", endpoint_url=cfg.endpoint_url,
            resolution=v["resolution"], folder_shard_size=100,
            models=ModelsConf(kind="tiny", caption_max_new_tokens=8, latent_channels=v["latent_channels"]),
            compute=ComputeConf(use_gpu=cfg.train.trainer.use_gpu, decode_num_cpus=0.25, decode_batch_size=16,
                                write_batch_size=16, vae=stage, caption=stage, text=stage)))
    return out


def flops_per_sample(c: TrainConf, knobs: dict) -> float:
    """Training FLOPs a sample of the trial's network at its resolution, with the tiny encoders' text tokens (the
    study's data is always encoded by them)."""
    from model import train_flops
    from model.conditioning import TINY_TEXT

    side = int(knobs["resolution"]) // AUTOENCODER_DOWNSAMPLE
    return train_flops(c.model.build(), side, side, text_tokens=TINY_TEXT.text_tokens)


def trial_conf(cfg: SweepConf, knobs: dict) -> TrainConf:
    """The trial's training run: the sweep's `train` section with the trial's train knobs, its data variant, and
    `max_steps` from the FLOPs budget (a whole number of reports, each with GenEval-shapes and a checkpoint)."""
    c = copy.deepcopy(cfg.train)
    r = cfg.recipe
    c.data = variant_path(cfg, data_variant(knobs))
    c.model = c.model.with_depth(int(knobs["depth"]))
    c.model.patch_size = int(knobs["patch_size"])
    c.model.in_channels = int(knobs["latent_channels"])
    c.model.sample_size = max(c.model.build().sample_size, int(knobs["resolution"]) // AUTOENCODER_DOWNSAMPLE)
    c.optim.lr, c.optim.warmup_steps = float(knobs["lr"]), int(knobs["warmup_steps"])
    c.trainer.batch_size, c.ema.decay = int(knobs["batch_size"]), float(knobs["ema_decay"])
    per_report = max(1, math.floor(r.budget_flops / (flops_per_sample(c, knobs) * c.trainer.batch_size * r.reports)))
    c.trainer.max_steps = per_report * r.reports
    v = c.validation
    v.every = v.geneval_every = c.checkpoint.every = per_report
    v.guidance, v.sample_steps = float(knobs["guidance"]), int(knobs["sample_steps"])
    v.shift = float(knobs["sampling_shift"])
    c.checkpoint.keep = 1
    return c


def sampling_trials(r: RecipeConf) -> list[tuple[str, dict]]:
    """(name, sampling knobs) tried on the best networks: the base's, then each sampling axis value."""
    names = [k for k, (home, _) in KNOBS.items() if home == "sampling"]
    base = {k: knob_value(r.base[k]) for k in names}
    out = [(BASE, base)]
    for name in names:
        for value in map(knob_value, r.axes.get(name, [])):
            if value != base[name]:
                out.append((f"{name}={_label(value)}", base | {name: value}))
    return out


def knob_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in ("trial", "stopped_at", "train_flops", "cpu_minutes", "val_loss", "geneval", "credit_count",
                        "chance_count", "credit_colors", "chance_colors", "credit_shapes", "credit_relation",
                        "credit_empty", "geneval_per_cpu_minute") if c in results]


def effects(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each trained knob's effect on `metric` against the base (trials compared at the last report both reached,
    so a trial ASHA stopped early is compared at its stop): knob, value, score, base score, difference; sorted by
    the largest absolute difference per knob."""
    if BASE not in set(results["trial"]):
        return pd.DataFrame(columns=["knob", "value", metric, "base", "difference"])
    base = results.set_index("trial").loc[BASE]
    rows = []
    for _, row in results[results["trial"] != BASE].iterrows():
        knob, _, value = str(row["trial"]).partition("=")
        reached = min(int(row["reports"]), int(base["reports"]))
        score, base_score = row["curve"][reached - 1], base["curve"][reached - 1]
        rows.append({"knob": knob, "value": value, "at_report": reached, metric: score, "base": base_score,
                     "difference": score - base_score})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["size"] = table.groupby("knob")["difference"].transform(lambda d: d.abs().max())
    return table.sort_values(["size", "difference"], ascending=False).drop(columns="size").reset_index(drop=True)


def analyze(cfg: SweepConf, results: pd.DataFrame):
    """The recipe report: every trial, knobs ranked by effect, the best per CPU-minute, and score against compute."""
    from workloads.plots import pyplot
    from workloads.sweep.studies import Analysis, _png, markdown_table

    r = cfg.recipe
    metric = r.metric
    results = results.copy()
    results["cpu_minutes"] = results["train_seconds"] * results["cpus"] / 60
    results["geneval_per_cpu_minute"] = results["geneval"] / results["cpu_minutes"]
    table = results.sort_values("geneval", ascending=False)[knob_columns(results)].reset_index(drop=True)
    table["stopped_at"] = [f"{int(v)} of {r.reports}" if v == v and v is not None else "" for v in table["stopped_at"]]
    lines = [f"Every trial trains {r.budget_flops:.3g} FLOPs unless stopped early (ASHA on `{metric}`, "
             f"{r.reports} reports, stopping from report {r.grace} on, the best 1/{r.reduction_factor} going on); "
             "`stopped_at` is the report it stopped at; partial credits beside their chance levels (the same "
             "images against shuffled prompts).", "", markdown_table(table), ""]
    effect = effects(results, metric)
    if not effect.empty:
        lines += ["Knobs ranked by their effect on the score against the base (at the last report both reached):",
                  "", markdown_table(effect), ""]
    # a trial ASHA stopped spent less, so per CPU-minute is compared among the trials that spent their budget
    whole = results[results["stopped_at"].isna()] if results["stopped_at"].isna().any() else results
    best = whole.sort_values("geneval_per_cpu_minute", ascending=False).iloc[0]
    lines.append(f"Highest GenEval-shapes per CPU-minute among the trials that trained their whole budget: "
                 f"`{best['trial']}` ({best['geneval']:.3f} in {best['cpu_minutes']:.1f} CPU-minutes; CPU-minutes "
                 "from the median training rate, on a machine shared with other work).")
    lines += sampling_lines(cfg)
    fig, ax = pyplot().subplots(1, 1, figsize=(7, 4.5))
    for _, row in results.iterrows():
        flops = [row["train_flops"] * (k + 1) / row["reports"] for k in range(len(row["curve"]))]
        ax.plot(flops, row["curve"], "o-", label=row["trial"], lw=2.5 if row["trial"] == BASE else 1)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.legend(fontsize=6, ncol=2)
    return Analysis(table, "\n".join(lines), {"recipe.png": _png(fig)})


def sampling_lines(cfg: SweepConf) -> list[str]:
    """The sampling trials' table (`sampling.json`, written by `try_sampling`), if any."""
    from workloads.sweep.driver import results_location
    from workloads.sweep.studies import markdown_table

    out = results_location(cfg).refreshed()
    if not out.exists("sampling.json"):
        return []
    lines = []
    for trial, summaries in json.loads(out.read_bytes("sampling.json")).items():
        rows = [{"sampling": name, "geneval": s["overall"],
                 **{f: s.get("credit", {}).get("overall", {}).get(f) for f in ("count", "colors", "shapes", "empty")}}
                for name, s in summaries.items()]
        lines += ["", f"Sampling knobs on the trained network of `{trial}` ({cfg.geneval_prompts_per_task} prompts per "
                  f"task x {cfg.geneval_images_per_prompt} images each):", "", markdown_table(pd.DataFrame(rows))]
    return lines


def curve(run: Location, metric: str) -> list[float]:
    """The run's `metric` at each GenEval report (its metrics.jsonl), in step order."""
    from workloads.train.runlog import METRICS, read_records

    return [float(rec[metric]) for rec in read_records(run.refreshed(), METRICS) if metric in rec]


def _timing(c: TrainConf, steps: int, samples_per_s: float | None) -> dict:
    seconds = steps * c.trainer.batch_size / samples_per_s if samples_per_s else float("nan")
    return {"train_seconds": seconds, "cpus": c.trainer.num_workers * c.trainer.cpus_per_worker}


def finished_row(cfg: SweepConf, params: dict, c: TrainConf, summary: dict) -> dict:
    """A finished trial's recipe columns: its name, the metric at each report (`curve`) and its training time."""
    from workloads.train.driver import run_location

    scores = curve(run_location(c), cfg.recipe.metric)
    return {"trial": params["trial"], "knobs": json.dumps(params["knobs"]), "reports": len(scores),
            "stopped_at": None, "curve": scores, **_timing(c, summary["step"], summary.get("samples_per_s"))}


def record_stopped(cfg: SweepConf, grid) -> None:
    """Write the row of each trial ASHA stopped (it never reached the end that writes one), from what it reported to
    Tune: its scores at each report and its last report's figures. A trial that finished reported its row last
    (it has a `run`), and wrote it itself."""
    from pipelines.geneval.credit import overall_credit
    from workloads.sweep.driver import results_location, trial_train_conf

    out = results_location(cfg)
    metric = cfg.recipe.metric
    for result in grid:
        m = result.metrics or {}
        if result.error is not None or "run" in m or "step" not in m:
            continue
        params = result.config["params"]
        c = trial_train_conf(cfg, params)
        history = result.metrics_dataframe
        scores = [float(v) for v in history[metric].dropna()] if history is not None and metric in history else []
        row = {**{k: params[k] for k in ("depth", "train_shift", "formulation")}, "run": c.run.name,
               "trial": params["trial"], "knobs": json.dumps(params["knobs"]), "reports": len(scores),
               "stopped_at": len(scores), "curve": scores, "val_loss": m.get("val_loss"), "geneval": m.get("geneval"),
               "train_flops": m["step"] * c.trainer.batch_size * flops_per_sample(c, params["knobs"]),
               **overall_credit(m), **_timing(c, m["step"], m.get("samples_per_s"))}
        out.write_bytes(f"trials/{trial_file(params['trial'])}", json.dumps(row).encode())


def trial_file(trial: str) -> str:
    """The row file of a trial ASHA stopped, by its name (stable however the code that keys runs changes)."""
    return "stopped-" + "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in trial) + ".json"


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per trial: the one that got furthest (a trial's finished row over an earlier stopped one)."""
    best: dict[str, dict] = {}
    for row in rows:
        kept = best.get(row["trial"])
        if kept is None or row.get("reports", 0) > kept.get("reports", 0):
            best[row["trial"]] = row
    return list(best.values())


def sampling_setting(cfg: SweepConf, c: TrainConf, knobs: dict):
    """The stored-score key and the sampler settings of one sampling trial."""
    from workloads.evaluate.inline import Sampling
    from workloads.sweep.scores import GenEvalSetting

    how = Sampling(int(knobs["sample_steps"]), float(knobs["guidance"]), float(knobs["sampling_shift"]),
                   str(cfg.sampler), c.objective.formulation, c.trainer.seed,
                   guidance_below=float(knobs["guidance_below"]))
    key = GenEvalSetting(how.steps, how.shift, how.guidance, cfg.geneval_prompts_per_task,
                         cfg.geneval_images_per_prompt, how.seed, how.method, None, how.guidance_below)
    return key, how


def sampling_scores(cfg: SweepConf, c: TrainConf, settings: list[tuple[str, dict]]) -> dict[str, dict]:
    """GenEval-shapes of a finished trial's EMA export at each sampling trial (a Ray task); scores the run already
    has at a setting are read from its folder."""
    import tempfile

    from model.interop import load_diffusers
    from model.precision import resolve_device
    from workloads.evaluate.inline import encode_prompt_set, geneval_summary, sample_prompt_set, to_uint8
    from workloads.sweep import scores
    from workloads.train.data import read_spec
    from workloads.train.driver import run_location
    from workloads.train.validation import LatentDecoder

    run = run_location(c)
    keyed = {name: sampling_setting(cfg, c, knobs) for name, knobs in settings}
    out = {name: scores.read(run, key) for name, (key, _) in keyed.items()}
    missing = [name for name, summary in out.items() if summary is None]
    if not missing:
        return out
    device = resolve_device("cuda" if c.trainer.use_gpu else "cpu")
    spec = read_spec(Location.of(c.data, c.endpoint_url))
    prompts = encode_prompt_set(spec.vae, cfg.geneval_prompts_per_task, cfg.geneval_images_per_prompt,
                                device=device.type)
    decoder = LatentDecoder(spec.vae)
    decoder.for_scoring("the recipe study's sampling trials").to(device)
    export = run.child("export")
    with tempfile.TemporaryDirectory() as tmp:
        export.fs.get(export.root + "/", tmp + "/", recursive=True)
        network = load_diffusers(tmp).to(device).eval()
    latent_shape = latent_shape_of(spec)
    for name in missing:
        key, how = keyed[name]
        latents = sample_prompt_set(network, prompts, spec.text, latent_shape, how, device)
        out[name] = geneval_summary(to_uint8(decoder(latents.to(device))), prompts)
        scores.write(run, key, out[name])
    return out


def latent_shape_of(spec) -> tuple[int, ...]:
    """(C, h, w) of the data's latents (its first file)."""
    from workloads.train.data import latent_shape

    _, files = sorted(spec.files_by_bucket.items())[0]
    return tuple(latent_shape(spec.location, files[0]))


def try_sampling(cfg: SweepConf, results: pd.DataFrame) -> None:
    """The sampling knobs on the best `sampling_top` finished trials: `sampling.json` in the results folder."""
    import ray

    from workloads.sweep.driver import results_location, trial_train_conf
    from workloads.sweep.studies import trial_params

    r = cfg.recipe
    settings = sampling_trials(r)
    done = results[results["stopped_at"].isna()] if "stopped_at" in results else results
    if r.sampling_top == 0 or len(settings) < 2 or done.empty or "geneval" not in done:
        return
    table = {}
    for _, row in done.sort_values(r.metric, ascending=False).head(r.sampling_top).iterrows():
        c = trial_train_conf(cfg, next(p for p in trial_params(cfg) if p["trial"] == row["trial"]))
        c.run.name = row["run"]  # the run the trial trained, as it named it
        task = ray.remote(sampling_scores).options(num_cpus=c.trainer.cpus_per_worker,
                                                   num_gpus=int(c.trainer.use_gpu))
        table[row["trial"]] = ray.get(task.remote(cfg, c, settings))
    results_location(cfg).write_bytes("sampling.json", json.dumps(table, indent=1).encode())
