"""`make reproduce` (`python -m workloads.reproduce preset=quick|default|cluster`): the paper's findings as studies.

On a local Ray cluster (or the one in RAY_ADDRESS): draw the shapes dataset with terse GenEval captions and rich
synthetic captions from its ground truth, preprocess it at two resolutions, then run the studies as Ray Tune
sweeps of `workloads.sweep` on the same storage — formulations (Table 1), depths (Fig. 8), a depth series per
autoencoder latent width (Fig. 10), sampling steps (Table 6), sampling shift at both resolutions (the sqrt(m/n) rule),
original against mixed captions (Table 4) — and Diffusion-DPO (Table 5) of the shipped shapes reference model
(`dpo_base=reference`, the default: it follows prompts) or of the studies' best run; the shipped shapes
autoencoders' reconstruction (Table 3) is measured in the driver. Runs are keyed by their training config, so the
studies share them (the study-depth run is trained once). `<out_dir>/report.md` sets each result beside the paper's
figures with a verdict per finding. Running the same command again resumes: finished data, runs and trials are kept.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from conf.checks import SyntheticCaptions, validate
from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from conf.reference import ReferenceConf
from conf.reproduce import DPOBase, Finding, ReproduceConf, register
from conf.sweep import Study, SweepConf
from conf.train import TrainConf
from pipelines.make_shapes import MakeShapesConf
from pipelines.storage import Location, is_remote, join, require_bucket
from workloads.demo import preference
from workloads.reproduce import autoencoder, report
from workloads.reproduce import findings as analysis
from workloads.runtime import cli, ensure_ray, logger
from workloads.sweep import driver as sweep_job
from workloads.sweep import studies
from workloads.train import driver as train_job

LOG = logger("reproduce")
DATA_CHANNELS = ModelsConf().latent_channels  # the studies' data: the default shipped shapes autoencoder's latents


@dataclass(frozen=True)
class Layout:
    """`<storage>/shapes`, the two preprocessed datasets, `runs/` (every study's trials) and one folder per study."""

    storage: str
    shapes: str
    data: str  # at `resolution`: every study
    data_high: str  # at `high_resolution`: the shift study's second resolution

    @classmethod
    def of(cls, cfg: ReproduceConf) -> Layout:
        storage = cfg.storage or str(Path(cfg.out_dir).resolve() / "work")
        return cls(storage, join(storage, "shapes"), join(storage, f"data-{cfg.resolution}"),
                   join(storage, f"data-{cfg.high_resolution}"))

    def latent_data(self, channels: int) -> str:
        """The data at `resolution` in the latents of the shipped autoencoder with `channels` (the autoencoder
        finding's depth series): the studies' own data for the default autoencoder, else `<data>-c<channels>`."""
        return self.data if channels == DATA_CHANNELS else f"{self.data}-c{channels}"


def shapes_conf(cfg: ReproduceConf, at: Layout) -> MakeShapesConf:
    return MakeShapesConf(out=at.shapes, n=cfg.images, seed=cfg.seed, size=cfg.image_size,
                          shard_size=cfg.shard_size, formats=["folder"], endpoint_url=cfg.endpoint_url)


def preprocess_conf(cfg: ReproduceConf, at: Layout, resolution: int,
                    latent_channels: int = DATA_CHANNELS) -> PreprocessConf:
    """The shapes at one resolution in the latents of the shipped autoencoder with `latent_channels`, the synthetic
    captions read from the input (no captioner model)."""
    stage = StageConf(batch_size=32, num_cpus=0.5)
    return PreprocessConf(
        input=join(at.shapes, "folder"),
        output=at.latent_data(latent_channels) if resolution == cfg.resolution else at.data_high,
        input_format="folder", endpoint_url=cfg.endpoint_url, resolution=resolution,
        folder_shard_size=cfg.shard_size,
        models=ModelsConf(kind="tiny", synthetic_captions=SyntheticCaptions.input, latent_channels=latent_channels),
        compute=ComputeConf(use_gpu=cfg.train.trainer.use_gpu or None, decode_num_cpus=0.25, decode_batch_size=32,
                            write_batch_size=32, vae=stage, caption=stage, text=stage))


def study_train(cfg: ReproduceConf, caption_mix: float = 0.0) -> TrainConf:
    """The training settings every study's runs share; DPO's held-out GenEval prompts are the studies' own."""
    c = copy.deepcopy(cfg.train)
    c.objective.synthetic_caption_prob = caption_mix
    c.validation.geneval_prompts_per_task = cfg.geneval_prompts_per_task
    return c


def channel_train(cfg: ReproduceConf, channels: int) -> TrainConf:
    """The studies' training settings on latents with `channels`: the network's input width follows them. A width
    equal to the flavor's stays unset, so that series' runs are keyed as the depth study's and shared with it."""
    c = study_train(cfg)
    if channels != c.model.build().in_channels:
        c.model.in_channels = channels
    return c


def channel_variants(cfg: ReproduceConf) -> list[int]:
    """The latent widths whose data the autoencoder finding's depth series need beyond the studies' own data."""
    if Finding.autoencoder not in cfg.findings or not cfg.channel_depths:
        return []
    return sorted(set(cfg.channels) - {DATA_CHANNELS})


def sweep_conf(cfg: ReproduceConf, at: Layout, name: str, study: Study, **axes) -> SweepConf:
    """One study as a `workloads.sweep` config on the reproduction's storage (its runs under `<storage>/runs`)."""
    fields = {"depths": list(cfg.depths), "study_depth": cfg.study_depth, "formulations": list(cfg.formulations),
              "training_shifts": [cfg.train.objective.shift], "sampling_shifts": list(cfg.sampling_shifts),
              "sampling_steps": list(cfg.sampling_steps), "data": at.data, "train": study_train(cfg)} | axes
    return SweepConf(study=study, preset=cfg.preset, name=name, storage=at.storage, endpoint_url=cfg.endpoint_url,
                     eval_samples=cfg.eval_samples, eval_sample_steps=cfg.geneval_steps,
                     geneval_prompts_per_task=cfg.geneval_prompts_per_task,
                     geneval_images_per_prompt=cfg.geneval_images_per_prompt, geneval_guidance=cfg.geneval_guidance,
                     max_concurrent_trials=cfg.concurrent_trials, **fields)


def sweeps(cfg: ReproduceConf, at: Layout) -> dict[str, SweepConf]:
    """Every sweep of the chosen findings, by name (each name is also its folder under `storage`)."""
    wanted, out = set(cfg.findings), {}
    if Finding.formulation in wanted:
        out["formulation"] = sweep_conf(cfg, at, "formulation", Study.formulation)
    if Finding.depth in wanted:
        out["depth"] = sweep_conf(cfg, at, "depth", Study.depth)
    if Finding.autoencoder in wanted and cfg.channel_depths:  # after the depth study, whose runs it may share
        for n in sorted(set(cfg.channels)):
            out[f"channels-c{n}"] = sweep_conf(cfg, at, f"channels-c{n}", Study.depth, depths=list(cfg.channel_depths),
                                               data=at.latent_data(n), train=channel_train(cfg, n))
    if Finding.steps in wanted:
        out["steps"] = sweep_conf(cfg, at, "steps", Study.steps)
    if Finding.shift in wanted:
        out[f"shift-{cfg.resolution}"] = sweep_conf(cfg, at, f"shift-{cfg.resolution}", Study.shift)
        out[f"shift-{cfg.high_resolution}"] = sweep_conf(cfg, at, f"shift-{cfg.high_resolution}", Study.shift,
                                                         data=at.data_high)
    if Finding.captions in wanted or Finding.dpo in wanted:  # the original-captions run is DPO's fallback base
        out["captions-original"] = sweep_conf(cfg, at, "captions-original", Study.depth, depths=[cfg.study_depth])
    if Finding.captions in wanted:
        out["captions-mix"] = sweep_conf(cfg, at, "captions-mix", Study.depth, depths=[cfg.study_depth],
                                         train=study_train(cfg, cfg.caption_mix))
    return out


def dpo_base(cfg: ReproduceConf, at: Layout, results: dict[str, pd.DataFrame]) -> TrainConf:
    """The run DPO tunes: the formulation study's best by GenEval-shapes when it ran, else the study-depth run."""
    table = results.get("formulation")
    name = "formulation" if table is not None and not table.empty else "captions-original"
    table = results[name]
    best = table.sort_values(["geneval", "val_loss"], ascending=[False, True]).iloc[0]
    sweep = sweeps(cfg, at)[name]
    (params,) = [p for p in studies.trial_params(sweep) if p["formulation"] == best["formulation"]
                 and p["depth"] == best["depth"]]
    return sweep_job.trial_train_conf(sweep, params)


def tuned_base(cfg: ReproduceConf, at: Layout, run: TrainConf) -> preference.Base:
    """A study run as DPO's base: pairs sampled with the study data at the studies' guidance."""
    return preference.Base.of_run(run, at.data, cfg.geneval_guidance)


def reference_data(cfg: ReproduceConf, at: Layout) -> ReferenceConf:
    """`reference_images` images of the shipped reference model's kind, for its encoders (`dpo_base=reference`)."""
    return preference.shipped_reference(at.storage, cfg.endpoint_url, cfg.reference_images, cfg.shard_size, cfg.seed)


def reference_tuned(cfg: ReproduceConf, at: Layout) -> preference.Base:
    """The shipped reference model as DPO's base, with the studies' training settings; its run beside theirs."""
    return preference.reference_base(reference_data(cfg, at), cfg.train, join(at.storage, "runs"))


def check(cfg: ReproduceConf) -> None:
    """Every job's config checked before any work: numbers, the shapes, each study's trials, DPO, the bucket."""
    validate(cfg)
    at = Layout.of(cfg)
    from pipelines.make_shapes import check as check_shapes

    check_shapes(shapes_conf(cfg, at))
    for resolution in (cfg.resolution, cfg.high_resolution):
        validate(preprocess_conf(cfg, at, resolution))
    for channels in channel_variants(cfg):
        validate(preprocess_conf(cfg, at, cfg.resolution, channels))
    every = sweeps(cfg, at)
    for sweep in every.values():
        validate(sweep)
        for params in studies.trial_params(sweep):
            train_job.check(sweep_job.trial_train_conf(sweep, params))
    if Finding.dpo in cfg.findings and cfg.dpo_steps and cfg.dpo_base == DPOBase.reference:
        r = reference_data(cfg, at)
        preference.check_reference_data(r)
        preference.dpo_conf(cfg, at.storage, reference_tuned(cfg, at))
    elif Finding.dpo in cfg.findings and cfg.dpo_steps:
        original = every["captions-original"]
        first = sweep_job.trial_train_conf(original, studies.trial_params(original)[0])
        preference.dpo_conf(cfg, at.storage, tuned_base(cfg, at, first))
    require_bucket(at.storage, "storage", cfg.endpoint_url)


@contextlib.contextmanager
def step(what: str, timings: dict[str, float], name: str) -> Iterator[None]:
    LOG.info(what)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    LOG.info(f"{name} done in {timings[name]:.0f} s")


def run(cfg: ReproduceConf) -> Path:
    check(cfg)
    start, at, timings = time.perf_counter(), Layout.of(cfg), {}
    # room for `concurrent_trials` trials at once (logical CPUs: the OS shares the cores between them)
    ensure_ray(min_cpus=(cfg.concurrent_trials or 1) * sweep_job.trial_cpus(cfg.train.trainer))
    from pipelines import make_shapes, preprocess

    with step(f"shapes: {cfg.images} images ({cfg.image_size} px) in {at.shapes}", timings, "shapes"):
        make_shapes.run(shapes_conf(cfg, at))
    needed = [cfg.resolution] + ([cfg.high_resolution] if Finding.shift in cfg.findings else [])
    variants = "".join(f", {cfg.resolution} px in {n} latent channels" for n in channel_variants(cfg))
    with step(f"preprocessing at {' and '.join(f'{r} px' for r in needed)}{variants}", timings, "preprocess"):
        for resolution in needed:
            preprocess.run(preprocess_conf(cfg, at, resolution))
        for channels in channel_variants(cfg):
            preprocess.run(preprocess_conf(cfg, at, cfg.resolution, channels))
    reconstructed = None
    if Finding.autoencoder in cfg.findings:
        with step(f"reconstruction of {cfg.reconstruction_images} held-out images by the shapes autoencoders with "
                  f"{sorted(set(cfg.channels))} latent channels", timings, "reconstruction"):
            reconstructed = autoencoder.reconstruction(cfg)
    results: dict[str, pd.DataFrame] = {}
    for name, sweep in sweeps(cfg, at).items():
        with step(f"study {name}: {len(studies.trial_params(sweep))} trial(s)", timings, name):
            results[name] = sweep_job.run(sweep)
    tuned = None
    if Finding.dpo in cfg.findings and cfg.dpo_steps and cfg.dpo_base == DPOBase.reference:
        r = reference_data(cfg, at)
        with step(f"DPO of the shipped shapes reference model (on {r.images} images of its kind)", timings, "dpo"):
            preference.prepare_reference_data(r)
            tuned = preference.preference_tune(cfg, at.storage, reference_tuned(cfg, at))
    elif Finding.dpo in cfg.findings and cfg.dpo_steps:
        base = dpo_base(cfg, at, results)
        with step(f"DPO of {base.run.name}", timings, "dpo"):
            tuned = preference.preference_tune(cfg, at.storage, tuned_base(cfg, at, base))
    out = Path(cfg.out_dir).resolve()
    sections = analysis.analyze(cfg, results, tuned, sweeps(cfg, at), reconstructed)
    text = report.write(out, cfg, at.storage, sections, timings, time.perf_counter() - start)
    LOG.info("report.md:\n" + text)
    if is_remote(at.storage):
        published = Location.of(join(at.storage, "report"), cfg.endpoint_url)
        report.publish(out, published)
        LOG.info(f"report also in {published}")
    LOG.info(f"finished in {time.perf_counter() - start:.0f} s; report {out / 'report.md'}")
    return out


register()


def main() -> None:
    cli("reproduce", run, doc=__doc__)


if __name__ == "__main__":
    main()
