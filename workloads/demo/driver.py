"""`make demo` (`python -m workloads.demo [storage=s3://...]`): the main job, end to end, on the embedded default.

On a local Ray cluster (or the one in RAY_ADDRESS): generate the shapes dataset, preprocess it with Ray Data
(the shapes autoencoder and tiny random text encoders), train the debug MM-DiT with Ray Train + DeepSpeed, run a toy
depth sweep with Ray Tune (the main run is its depth-2 trial, reused), score the main run with GenEval on shapes,
preference-tune it (pairs judged by GenEval-shapes, Diffusion-DPO on LoRA adapters, GenEval before and after), and
write a report folder: sample grid, loss curve, scaling plot and a Markdown summary with the figures.
Data, runs and the sweep live under `storage` (local or s3://); the report is always written locally. Running it
again resumes each job where it stopped, and a finished job is not redone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conf.checks import validate
from conf.demo import DemoConf, register
from conf.evaluate import EvaluateConf
from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from conf.reference import ReferenceConf
from conf.sweep import Study, SweepConf
from conf.train import TrainConf
from pipelines.make_shapes import MakeShapesConf
from pipelines.storage import Location, join, require_bucket
from workloads.demo import report as demo_report
from workloads.demo.preference import (
    Base,
    check_reference_data,
    dpo_conf,
    preference_tune,
    reference_base,
    shipped_reference,
)
from workloads.reference import driver as reference_job
from workloads.runtime import cli, ensure_ray, logger
from workloads.sweep import driver as sweep_job
from workloads.sweep import studies
from workloads.train import driver as train_job

LOG = logger("demo")

STAGES = ("shapes", "preprocess", "train", "sweep", "evaluate", "dpo", "report")


@dataclass(frozen=True)
class Layout:
    """Where each job of the demo reads and writes: `<storage>/shapes`, `data`, `runs/<key>` and `demo-depth`."""

    storage: str
    shapes: str
    data: str

    @classmethod
    def under(cls, storage: str) -> Layout:
        return cls(storage, join(storage, "shapes"), join(storage, "data"))


def storage_of(cfg: DemoConf) -> str:
    return cfg.storage or str(Path(cfg.out_dir).resolve() / "work")


def shapes_conf(cfg: DemoConf, at: Layout) -> MakeShapesConf:
    return MakeShapesConf(out=at.shapes, n=cfg.images, seed=cfg.seed, size=cfg.image_size,
                          shard_size=cfg.shard_size, formats=["folder"], endpoint_url=cfg.endpoint_url,
                          min_side=cfg.min_side, max_side=cfg.max_side, max_objects=cfg.max_objects,
                          background_low=cfg.background_low)


def preprocess_conf(cfg: DemoConf, at: Layout) -> PreprocessConf:
    stage = StageConf(batch_size=16, num_cpus=0.5)  # fractional: all stages fit beside each other on 2 cores
    return PreprocessConf(
        input=join(at.shapes, "folder"), output=at.data, input_format="folder", endpoint_url=cfg.endpoint_url,
        resolution=cfg.resolution, folder_shard_size=cfg.shard_size,
        models=ModelsConf(kind="tiny", caption_max_new_tokens=8, latent_channels=cfg.latent_channels),
        compute=ComputeConf(use_gpu=False, decode_num_cpus=0.25, decode_batch_size=16, write_batch_size=16,
                            vae=stage, caption=stage, text=stage))


def sweep_conf(cfg: DemoConf, at: Layout) -> SweepConf:
    """The toy depth sweep. Each trial's GenEval-shapes is the one its run logged at its last step
    (`validation.geneval_every`) when training scores itself, else the sweep samples the same prompt set after."""
    v = cfg.train.validation
    return SweepConf(study=Study.depth, preset="toy", data=at.data, endpoint_url=cfg.endpoint_url,
                     storage=at.storage, name="demo-depth", depths=list(cfg.depths), train=cfg.train, eval_samples=16,
                     eval_sample_steps=cfg.geneval_steps, geneval_guidance=cfg.geneval_guidance,
                     geneval_prompts_per_task=0 if v.geneval_every else v.geneval_prompts_per_task)


def main_run_conf(cfg: DemoConf, at: Layout) -> TrainConf:
    """The demo's main training run: the sweep's trial at `main_depth`, so the sweep reuses it."""
    sweep = sweep_conf(cfg, at)
    (params,) = [p for p in studies.trial_params(sweep) if p["depth"] == cfg.main_depth]
    return sweep_job.trial_train_conf(sweep, params)


def main_base(cfg: DemoConf, at: Layout) -> Base:
    """The preference stage's first base: the main run, on the demo's data."""
    return Base.of_run(main_run_conf(cfg, at), at.data, cfg.geneval_guidance)


def reference_conf(cfg: DemoConf, at: Layout) -> ReferenceConf:
    """The shipped reference model's recipe on `reference_images` images of its kind under `<storage>/reference`."""
    return shipped_reference(at.storage, cfg.endpoint_url, cfg.reference_images, cfg.shard_size, cfg.seed)


def reference_tuned(cfg: DemoConf, at: Layout) -> Base:
    """The preference stage's second base: the shipped reference model, tuned with the demo's training settings."""
    return reference_base(reference_conf(cfg, at), cfg.train, main_run_conf(cfg, at).run.storage)


def reference_eval_out(at: Layout) -> str:
    """Where the evaluation job writes the reference model's GenEval-shapes (its summary, results and grid.png)."""
    return join(at.storage, "geneval", "reference")


def geneval_confs(cfg: DemoConf, at: Layout, main: TrainConf, untrained: str) -> dict[str, EvaluateConf]:
    """GenEval-shapes of the main run, of the ground truth (the shapes folder itself), of an untrained network of the
    same shape (`untrained`: its diffusers export) and, with `reference`, of the shipped reference model (at its own
    resolution and guidance)."""
    sampled = {"images_per_prompt": cfg.geneval_images_per_prompt, "steps": cfg.geneval_steps,
               "prompts_per_task": cfg.geneval_prompts_per_task, "endpoint_url": cfg.endpoint_url}
    ours = {"data": at.data, "guidance": cfg.geneval_guidance, "resolution": cfg.resolution, **sampled}
    confs = {
        "main run": EvaluateConf(run=join(main.run.storage, main.run.name), out=join(at.storage, "geneval", "main"),
                                 **ours),
        "ground truth": EvaluateConf(images=join(at.shapes, "folder"), out=join(at.storage, "geneval", "truth"),
                                     endpoint_url=cfg.endpoint_url),
        "untrained": EvaluateConf(run=untrained, out=join(at.storage, "geneval", "untrained"), **ours),
    }
    if cfg.reference:
        ref = reference_tuned(cfg, at)
        confs["reference model"] = EvaluateConf(run=ref.weights, data=ref.data, guidance=ref.guidance,
                                                resolution=reference_conf(cfg, at).resolution,
                                                out=reference_eval_out(at), **sampled)
    return confs


def evaluate_geneval(cfg: DemoConf, at: Layout, main: TrainConf) -> dict[str, dict]:
    """The GenEval-shapes summaries, by label."""
    import tempfile

    import torch

    from model import MMDiT
    from model.interop import export_diffusers
    from workloads.evaluate import driver as evaluate_job

    with tempfile.TemporaryDirectory(prefix="untrained-") as untrained:
        torch.manual_seed(main.trainer.seed)
        export_diffusers(MMDiT(main.model.build()), untrained)
        return {label: evaluate_job.run(conf) for label, conf in geneval_confs(cfg, at, main, untrained).items()}


def bases(cfg: DemoConf, at: Layout) -> dict[str, Base]:
    """What the preference stage tunes, by label: the main run and, with `reference`, the shipped reference model."""
    return {"main run": main_base(cfg, at), **({"reference model": reference_tuned(cfg, at)} if cfg.reference else {})}


def check(cfg: DemoConf) -> None:
    """Everything that can be wrong before any work: numbers, each job's config, a missing bucket."""
    validate(cfg)
    at = Layout.under(storage_of(cfg))
    from pipelines.make_shapes import check as check_shapes

    check_shapes(shapes_conf(cfg, at))
    sweep = sweep_conf(cfg, at)
    for params in studies.trial_params(sweep):
        train_job.check(sweep_job.trial_train_conf(sweep, params))
    if cfg.reference:
        r = reference_conf(cfg, at)
        check_reference_data(r)
    if cfg.dpo_steps:
        for base in bases(cfg, at).values():
            dpo_conf(cfg, at.storage, base)  # its own checks (the main run it adapts does not exist yet)
    require_bucket(at.storage, "storage", cfg.endpoint_url)


@contextlib.contextmanager
def stage(name: str, what: str, timings: dict[str, float]) -> Iterator[None]:
    """Progress lines around one step of the demo; its seconds go to `timings`."""
    index = STAGES.index(name) + 1
    LOG.info(f"{index}/{len(STAGES)} {what}")
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    LOG.info(f"{index}/{len(STAGES)} {name} done in {timings[name]:.0f} s")


def run(cfg: DemoConf) -> Path:
    check(cfg)
    start = time.perf_counter()
    at, timings = Layout.under(storage_of(cfg)), {}
    out = Path(cfg.out_dir).resolve()
    t = cfg.train.trainer
    ensure_ray(min_cpus=t.num_workers * t.cpus_per_worker + 2)  # training workers plus room for Ray Data's readers
    from pipelines import make_shapes, preprocess

    ref = reference_conf(cfg, at) if cfg.reference else None
    also = f", and {ref.images} ({ref.image_size} px) of the reference model's kind" if ref else ""
    with stage("shapes", f"generating {cfg.images} shapes images ({cfg.image_size} px) in {at.shapes}{also}",
               timings):
        make_shapes.run(shapes_conf(cfg, at))
        if ref:
            make_shapes.run(reference_job.shapes_conf(ref))
    also = f", and the reference model's into {join(ref.storage, 'data')}" if ref else ""
    with stage("preprocess", f"preprocessing with Ray Data (the shapes autoencoder, tiny text encoders) into "
                             f"{at.data}{also}", timings):
        manifest = preprocess.run(preprocess_conf(cfg, at))
        if ref:
            preprocess.run(reference_job.preprocess_conf(ref))
    train = main_run_conf(cfg, at)
    with stage("train", f"training the depth-{cfg.main_depth} ({train.model.flavor} flavor) MM-DiT with Ray Train + "
                        f"DeepSpeed ZeRO-{train.deepspeed.stage} on {t.num_workers} workers, {t.max_steps} steps",
               timings):
        if sweep_job.finished(train) is None:
            train_job.run(train)
        else:
            LOG.info(f"{join(train.run.storage, train.run.name)} already trained to the end: kept")
    sweep = sweep_conf(cfg, at)
    with stage("sweep", f"toy depth sweep with Ray Tune: depths {list(cfg.depths)} (depth {cfg.main_depth} is the "
                        "main run, found finished and reused)", timings):
        results = sweep_job.run(sweep)
    geneval: dict[str, dict] = {}
    if cfg.geneval_images_per_prompt:
        also = " and the shipped reference model" if ref else ""
        with stage("evaluate", f"GenEval on shapes of the main run ({cfg.geneval_images_per_prompt} image(s) per "
                               f"prompt), the ground truth, an untrained network{also}", timings):
            geneval = evaluate_geneval(cfg, at, train)
    preference: dict[str, demo_report.Preference] = {}
    if cfg.dpo_steps:
        tuned = bases(cfg, at)
        with stage("dpo", f"preference tuning of the {' and the '.join(tuned)}: pairs of its samples judged by "
                          f"GenEval-shapes, then {cfg.dpo_steps} Diffusion-DPO steps on rank-{cfg.dpo_rank} LoRA "
                          "adapters", timings):
            preference = {label: preference_tune(cfg, at.storage, base) for label, base in tuned.items()}
    with stage("report", f"writing the report to {out}", timings):
        evaluated = geneval.get("reference model") is not None
        reference_eval = Location.of(reference_eval_out(at), cfg.endpoint_url) if evaluated else None
        sources = demo_report.Sources(manifest, train, sweep, results, geneval, preference, reference_eval)
        summary = demo_report.write(out, sources, timings, time.perf_counter() - start)
    LOG.info("summary.md:\n" + summary)
    LOG.info(f"finished in {time.perf_counter() - start:.0f} s; report folder: {out}")
    return out


register()


def main() -> None:
    cli("demo", run, doc=__doc__)


if __name__ == "__main__":
    main()
