"""The demo's report folder: `samples.png`, `reference.png`, `loss.png`, `scaling.png`, `reference_model.png`,
`summary.md`, `summary.json` and `dpo/`, gathered from the finished jobs' own outputs (local or s3://)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from math import nan
from pathlib import Path

import pandas as pd
import torch

from conf.sweep import SweepConf
from conf.train import TrainConf
from pipelines import schema
from pipelines.geneval.credit import overall_credit
from pipelines.geneval.stats import PAIRED, PairedChange, geneval_se
from pipelines.storage import Location
from workloads.plots import plot_loss
from workloads.sweep import studies
from workloads.train.driver import plan, run_location
from workloads.train.runlog import METRICS, SUMMARY, read_records
from workloads.train.validation import LatentDecoder, write_grid


@dataclass
class Preference:
    """The preference-tuning stage's outputs: the pairs' manifest, the DPO run's summary and its config (the first
    two None when the stage was `skipped`, with the reason)."""

    pairs: dict | None
    summary: dict | None
    train: TrainConf
    skipped: str | None = None


@dataclass
class Sources:
    """The finished jobs the report reads."""

    manifest: dict  # the preprocessing manifest
    train: TrainConf
    sweep: SweepConf
    results: pd.DataFrame  # the sweep's trial rows
    geneval: dict[str, dict] = field(default_factory=dict)  # GenEval-shapes summaries by label (main run, ...)
    preference: dict[str, Preference] = field(default_factory=dict)  # by the tuned base's label
    reference_eval: Location | None = None  # the evaluation folder of the shipped reference model (its grid.png)

    @property
    def run(self) -> Location:
        return run_location(self.train)


def copy_latest_grid(src: Sources, path: Path) -> str:
    """The run's last sample grid (CFG samples of validation captions) to `path`; returns its source."""
    run = src.run.refreshed()
    grids = sorted(run.fs.glob(run.path("samples", "step_*.png")))
    if not grids:
        raise FileNotFoundError(f"the run {run} wrote no sample grid")
    path.write_bytes(run.fs.cat_file(grids[-1]))
    return grids[-1].rsplit("/", 1)[-1]


def write_reference(src: Sources, path: Path) -> str | None:
    """The held-out latents whose captions prompt the sample grid's rows, through the same decoder, to compare
    the samples with; returns the decoder's note when it fell back to a latent preview."""
    p = plan(src.train)
    group = p.val[0]  # the group the run samples its grid from
    rows = min(len(group), src.train.validation.grid_prompts)
    decoder = LatentDecoder(p.vae)
    latents = torch.from_numpy(group.columns[schema.LATENT][:rows].copy()).float()
    write_grid(decoder, latents, group.captions[:rows], path)
    return decoder.note


def figures(src: Sources, timings: dict[str, float], seconds: float) -> tuple[dict, list[dict]]:
    """The report's figures, and the run's metric records."""
    records = read_records(src.run, METRICS)
    validations = [r for r in records if "val_loss" in r]
    run_summary = json.loads(src.run.read_bytes(SUMMARY))
    counts = src.manifest["counts"]
    return {
        "seconds": seconds, "seconds_by_stage": timings,
        "data": {"read": counts["read"], "written": counts["written"], "rejected": counts["rejected"],
                 "buckets": src.manifest["buckets"], "output": src.manifest["output"]},
        "train": {"run": src.run.uri, "flavor": src.train.model.flavor, "params": run_summary["params"],
                  "workers": src.train.trainer.num_workers, "zero_stage": src.train.deepspeed.stage,
                  "steps": run_summary["step"], "batch_size": src.train.trainer.batch_size,
                  "samples_per_s": run_summary["samples_per_s"], "train_loss_first": records[0]["loss"],
                  "train_loss_last": records[-1]["loss"],
                  "val_loss": [(r["step"], r["val_loss"]) for r in validations],
                  "text_gap": [(r["step"], r["text_gap"]) for r in validations if "text_gap" in r],
                  "flops_per_sample": run_summary["train_flops_per_sample"],
                  "geneval": [(r["step"], r["geneval"]) for r in records if "geneval" in r],
                  "credit": [(r["step"], overall_credit(r)) for r in records if "credit_count" in r]},
        "sweep": src.results.sort_values("depth")[[c for c in ("depth", "params", "train_flops", "val_loss", "geneval")
                                                   if c in src.results]].to_dict(orient="records"),
        "geneval": src.geneval,
        "dpo": {label: dpo_figures(p) for label, p in src.preference.items() if p.summary is not None},
    }, records


def dpo_figures(p: Preference) -> dict:
    s = p.summary
    return {"run": run_location(p.train).uri, "steps": s["step"], "lora_rank": s["lora_rank"],
            "trained_params": s["trained_params"], "checkpoint_bytes": s["checkpoint_bytes"],
            "samples_per_s": s["samples_per_s"], "pairs": p.pairs["pairs"], "prompts": p.pairs["prompts"],
            "correct": p.pairs["correct"], "images": p.pairs["counts"]["read"],
            "geneval_before": s.get("geneval_before"), "geneval_after": s.get("geneval_after"),
            "geneval_tasks_before": s.get("geneval_tasks_before"), "geneval_tasks_after": s.get("geneval_tasks_after"),
            **{k: s.get(k) for k in PAIRED}}


def dpo_file(label: str) -> str:
    """Where the report keeps a DPO run's `summary.json`."""
    return f"dpo/{label.replace(' ', '-')}.json"


def dpo_lines(f: dict, p: Preference, label: str) -> list[str]:
    """One base's preference-tuning section: the pairs per task, and GenEval-shapes before and after DPO."""
    title = f"## Preference tuning of the {label}: Diffusion-DPO with LoRA (`workloads.make_pairs`, `objective=dpo`)"
    if p.summary is None:
        return ["", title, f"- skipped: {p.skipped}"]
    v = p.train.validation
    last = read_records(run_location(p.train), METRICS)[-1]
    lines = ["", title,
             f"- pairs: {sum(f['pairs'].values())} from {f['images']} samples of {sum(f['prompts'].values())} training "
             f"prompts ({sum(f['correct'].values())} judged correct by GenEval-shapes); per task "
             + ", ".join(f"{t} {n}" for t, n in f["pairs"].items()),
             f"- DPO: {f['steps']} steps on rank-{f['lora_rank']} adapters ({f['trained_params']:,} trained "
             f"parameters, checkpoint {f['checkpoint_bytes'] / 2**20:.1f} MiB), beta from the velocity-error scale, "
             f"{f['samples_per_s']:.1f} pairs/s; last step: implicit accuracy {last['dpo_accuracy']:.2f}, reward "
             f"margin {last['dpo_reward_margin']:.3f}",
             f"- run folder: `{f['run']}` (its `summary.json` is `{dpo_file(label)}` here)"]
    if f["geneval_before"] is None:
        return lines
    tags = list(f["geneval_tasks_before"])
    lines += ["", f"GenEval-shapes on the held-out prompts ({v.geneval_prompts_per_task} per task, "
                  f"{v.geneval_images_per_prompt} images each; none of them made a pair):", "",
              "| | overall | " + " | ".join(tags) + " |", "|---|---|" + "---|" * len(tags)]
    for row, overall, tasks in (("before DPO", f["geneval_before"], f["geneval_tasks_before"]),
                                ("after DPO", f["geneval_after"], f["geneval_tasks_after"])):
        lines.append(f"| {row} | {overall:.3f} | " + " | ".join(f"{tasks[t]:.3f}" for t in tags) + " |")
    images = v.geneval_prompts_per_task * len(tags) * v.geneval_images_per_prompt
    change = PairedChange.of_summary(f, images)
    if change is not None:
        return [*lines, "", f"- {change.line()}"]
    gain, se = f["geneval_after"] - f["geneval_before"], math.hypot(geneval_se(f["geneval_before"], images),
                                                                     geneval_se(f["geneval_after"], images))
    return [*lines, "", f"- change {gain:+.3f}, standard error {se:.3f} ({images} images each, unpaired): "
                        + ("beyond" if abs(gain) > 2 * se else "within") + " twice its standard error"]


def markdown(src: Sources, f: dict, sweep_body: str, decoder_note: str | None, grid: str) -> str:
    d, t = f["data"], f["train"]
    val = t["val_loss"]
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in f["seconds_by_stage"].items())
    lines = [
        "# sd3-train demo",
        "",
        f"{f['seconds']:.0f} s for this invocation ({stages}); what an earlier one finished is kept, not redone.",
        "",
        "## Data (Ray Data)",
        f"- {d['read']} shapes images read, {d['written']} written as latents and text embeddings, "
        f"{d['rejected']} rejected; buckets {', '.join(d['buckets'])}; `{d['output']}`",
        "",
        "## Training (Ray Train + DeepSpeed)",
        f"- `{t['flavor']}` MM-DiT, {t['params']:,} parameters, {t['workers']} workers, ZeRO-{t['zero_stage']}, "
        f"{t['steps']} steps at global batch {t['batch_size']}, {t['samples_per_s']:.1f} samples/s (median)",
        f"- training loss {t['train_loss_first']:.4f} at step 1, {t['train_loss_last']:.4f} at the last step",
        "- EMA validation loss (8 fixed timesteps, fixed noise): "
        + ", ".join(f"{v:.4f} at step {s}" for s, v in val),
        *([("- the same rows with each other's texts (does the network read its prompt? 0% when it does not): "
            + ", ".join(f"{100 * g:+.2f}% at step {s}" for s, g in t["text_gap"]))] if t["text_gap"] else []),
        f"- run folder (metrics, TensorBoard, checkpoints, diffusers export): `{t['run']}`",
        f"- `samples.png`: CFG samples of validation captions ({grid}); `reference.png`: the held-out image of each "
        "row's caption through the same decoder; `loss.png`: the loss curves",
    ]
    lines += geneval_by_compute(src, t)
    if decoder_note:
        lines.append(f"- the grids show latent channels 0-2: {decoder_note}")
    else:
        lines.append("- decoded by the shapes autoencoder (trained by the project, shipped with it): a sample can be "
                     "checked against its caption by eye")
    lines += geneval_lines(f["geneval"])
    lines += credit_lines(f["geneval"])
    if src.reference_eval is not None:
        lines.append("- `reference_model.png`: the shipped reference model's first GenEval-shapes images, each marked "
                     "green (correct) or red")
    for label, p in src.preference.items():
        lines += dpo_lines(f["dpo"].get(label, {}), p, label)
    lines += ["", "## Toy depth sweep (Ray Tune)",
              f"Width 64*depth, {t['steps']} steps each; the depth-{src.train.model.depth} trial is the run above (the "
              "same training config, so the sweep found it finished and reused it).", "", sweep_body, "",
              "![scaling](scaling.png)", ""]
    return "\n".join(lines)


def geneval_by_compute(src: Sources, t: dict) -> list[str]:
    """The main run's GenEval-shapes as it trained (`validation.geneval_every`): the score against compute."""
    if not t["geneval"]:
        return []
    v = src.train.validation
    flops = t["flops_per_sample"] * t["batch_size"]
    return [f"- GenEval-shapes during training ({v.geneval_prompts_per_task} prompts per task, "
            f"{v.geneval_images_per_prompt} image(s) each, EMA weights): "
            + ", ".join(f"{g:.3f} at step {s} ({s * flops:.2g} FLOPs)" for s, g in t["geneval"]),
            *([("- its partial credits as it trained (chance level in brackets): "
                + "; ".join(f"step {s}: " + ", ".join(f"{n} {c[f'credit_{n}']:.2f} ({c.get(f'chance_{n}', nan):.2f})"
                                                      for n in ("count", "colors", "shapes") if f"credit_{n}" in c)
                            for s, c in t["credit"]))] if t.get("credit") else [])]


def geneval_lines(summaries: dict[str, dict]) -> list[str]:
    """The GenEval-shapes table: overall and per task for each evaluated source."""
    if not summaries:
        return []
    tags = list(next(iter(summaries.values()))["tasks"])
    lines = ["", "## GenEval on shapes (`python -m workloads.evaluate`)",
             "GenEval's six tasks and scoring over the shapes' classes and colours, objects found by the shapes "
             "detector; the ground truth (the dataset's own images) is the detector's ceiling.", "",
             "| | images | overall | " + " | ".join(tags) + " |", "|---|---|---|" + "---|" * len(tags)]
    for label, g in summaries.items():
        cells = " | ".join(f"{g['tasks'].get(t, float('nan')):.3f}" for t in tags)
        lines.append(f"| {label} | {g['images']} | {g['overall']:.3f} | {cells} |")
    return lines


def credit_lines(summaries: dict[str, dict]) -> list[str]:
    """The partial credits of each evaluated source (`pipelines.geneval.credit`), with the main run's images scored
    against shuffled prompts as the chance level of the fields that read the prompt."""
    rows = {label: g["credit"]["overall"] for label, g in summaries.items() if "credit" in g}
    if not rows:
        return []
    for label, g in summaries.items():
        if "chance" in g and label != "ground truth":
            rows[f"{label}, shuffled prompts (chance)"] = g["chance"]["credit"]["overall"]
    names = ("count", "colors", "shapes", "relation", "empty", "objects")
    lines = ["", "Partial credit (what an image gets right before all of it): the object count asked for, each named "
             "colour present, each named shape present, the position prompts' relation, the share of empty images, "
             "and objects an image against the prompts' mean asked for; the shuffled rows score the same images "
             "against other prompts (a network that ignored its prompt).", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, c in rows.items():
        cells = [f"{c[n]:.3f}" if n in c else "" for n in names]
        if "objects" in c:
            cells[-1] = f"{c['objects']:.2f} of {c['asked']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write(out: Path, src: Sources, timings: dict[str, float], seconds: float) -> str:
    """Write the report folder; returns summary.md's text."""
    out.mkdir(parents=True, exist_ok=True)
    grid = copy_latest_grid(src, out / "samples.png")
    note = write_reference(src, out / "reference.png")
    f, records = figures(src, timings, seconds)
    plot_loss(records, out / "loss.png")
    analysis = studies.analyze(src.sweep, src.results)
    for name, png in analysis.plots.items():
        (out / name).write_bytes(png)
    text = markdown(src, f, analysis.markdown, note, grid)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(f, indent=1) + "\n")
    if src.reference_eval is not None:
        (out / "reference_model.png").write_bytes(src.reference_eval.read_bytes("grid.png"))
    for label, p in src.preference.items():
        if p.summary is not None:
            (out / dpo_file(label)).parent.mkdir(exist_ok=True)
            (out / dpo_file(label)).write_text(json.dumps(p.summary, indent=1) + "\n")
    return text
