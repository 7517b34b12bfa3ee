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
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from conf.checks import Objective, validate
from conf.demo import DemoConf, register
from conf.evaluate import EvaluateConf
from conf.pairs import MakePairsConf
from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from conf.sweep import Study, SweepConf
from conf.train import LoraConf, TrainConf
from pipelines.make_shapes import MakeShapesConf
from pipelines.storage import Location, join, require_bucket
from workloads.demo import report as demo_report
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


class PreferenceSettings(Protocol):
    """The preference stage's settings, as `DemoConf` and `ReproduceConf` (which tunes its best run) both carry them."""

    endpoint_url: str | None
    geneval_guidance: float
    pairs_prompts_per_task: int
    pairs_images_per_prompt: int
    pairs_sample_steps: int
    dpo_steps: int
    dpo_rank: int
    dpo_geneval_images_per_prompt: int


def pairs_conf(cfg: PreferenceSettings, at: Layout, main: TrainConf) -> MakePairsConf:
    """Preference pairs from the main run: its training prompts judged by GenEval-shapes, the demo's sampling."""
    return MakePairsConf(run=join(main.run.storage, main.run.name), data=at.data, out=join(at.storage, "pairs"),
                         endpoint_url=cfg.endpoint_url, prompts_per_task=cfg.pairs_prompts_per_task,
                         held_out_prompts_per_task=main.validation.geneval_prompts_per_task,
                         images_per_prompt=cfg.pairs_images_per_prompt, steps=cfg.pairs_sample_steps,
                         guidance=cfg.geneval_guidance)


def dpo_conf(cfg: PreferenceSettings, at: Layout, main: TrainConf) -> TrainConf:
    """The main run's training settings turned into `objective=dpo` on the pairs: LoRA adapters on the main run's
    weights, GenEval-shapes of the held-out prompts before the first step and after the last."""
    c = copy.deepcopy(main)
    c.data, c.val_data, c.init_from = pairs_conf(cfg, at, main).out, None, join(main.run.storage, main.run.name)
    o, v = c.objective, c.validation
    o.kind, o.synthetic_caption_prob, o.text_drop_prob = Objective.dpo, 0.0, 0.0
    c.lora = LoraConf(rank=cfg.dpo_rank)
    c.trainer.max_steps = c.checkpoint.every = v.every = v.geneval_every = cfg.dpo_steps
    v.geneval_before, v.geneval_images_per_prompt = True, cfg.dpo_geneval_images_per_prompt
    c.run.name = f"dpo-{main.run.name}"
    validate(c)
    return c


def preference_tune(cfg: PreferenceSettings, at: Layout, main: TrainConf) -> demo_report.Preference:
    """Pairs, then DPO (each kept when an earlier invocation finished it). A main run that drew no correct image of
    any training prompt gives no pairs: the stage is then skipped, and the report says why."""
    import json

    from pipelines import schema
    from workloads.make_pairs import driver as make_pairs

    pairs, dpo = pairs_conf(cfg, at, main), dpo_conf(cfg, at, main)
    out = Location.of(pairs.out, cfg.endpoint_url)
    if out.exists(schema.MANIFEST):
        manifest = json.loads(out.read_bytes(schema.MANIFEST))
        LOG.info(f"{pairs.out} already holds {manifest['counts']['written']} pairs: kept")
    else:
        try:
            manifest = make_pairs.run(pairs)
        except make_pairs.NoPairs as error:
            LOG.warning(f"DPO skipped: {error}")
            return demo_report.Preference(None, None, dpo, skipped=str(error))
    needed = dpo.trainer.batch_size + dpo.trainer.num_workers  # a global batch, and a held-out pair per worker
    if manifest["counts"]["written"] < needed:
        reason = (f"{manifest['counts']['written']} pairs from {manifest['counts']['read']} samples, fewer than the "
                  f"{needed} a DPO step and its validation need (global batch {dpo.trainer.batch_size})")
        LOG.warning(f"DPO skipped: {reason}")
        return demo_report.Preference(manifest, None, dpo, skipped=reason)
    summary = sweep_job.finished(dpo)
    if summary is None:
        train_job.run(dpo)
        summary = sweep_job.finished(dpo)
    return demo_report.Preference(manifest, summary, dpo)


def geneval_confs(cfg: DemoConf, at: Layout, main: TrainConf, untrained: str) -> dict[str, EvaluateConf]:
    """GenEval-shapes of the main run, of the ground truth (the shapes folder itself) and of an untrained network
    of the same shape (`untrained`: its diffusers export)."""
    sampled = {"data": at.data, "images_per_prompt": cfg.geneval_images_per_prompt, "steps": cfg.geneval_steps,
               "prompts_per_task": cfg.geneval_prompts_per_task,
               "guidance": cfg.geneval_guidance, "resolution": cfg.resolution, "endpoint_url": cfg.endpoint_url}
    return {
        "main run": EvaluateConf(run=join(main.run.storage, main.run.name), out=join(at.storage, "geneval", "main"),
                                 **sampled),
        "ground truth": EvaluateConf(images=join(at.shapes, "folder"), out=join(at.storage, "geneval", "truth"),
                                     endpoint_url=cfg.endpoint_url),
        "untrained": EvaluateConf(run=untrained, out=join(at.storage, "geneval", "untrained"), **sampled),
    }


def evaluate_geneval(cfg: DemoConf, at: Layout, main: TrainConf) -> dict[str, dict]:
    """The three GenEval-shapes summaries, by label."""
    import tempfile

    import torch

    from model import MMDiT
    from model.interop import export_diffusers
    from workloads.evaluate import driver as evaluate_job

    with tempfile.TemporaryDirectory(prefix="untrained-") as untrained:
        torch.manual_seed(main.trainer.seed)
        export_diffusers(MMDiT(main.model.build()), untrained)
        return {label: evaluate_job.run(conf) for label, conf in geneval_confs(cfg, at, main, untrained).items()}


def check(cfg: DemoConf) -> None:
    """Everything that can be wrong before any work: numbers, each job's config, a missing bucket."""
    validate(cfg)
    at = Layout.under(storage_of(cfg))
    from pipelines.make_shapes import check as check_shapes

    check_shapes(shapes_conf(cfg, at))
    sweep = sweep_conf(cfg, at)
    for params in studies.trial_params(sweep):
        train_job.check(sweep_job.trial_train_conf(sweep, params))
    if cfg.dpo_steps:
        dpo_conf(cfg, at, main_run_conf(cfg, at))  # its own checks (the base it adapts does not exist yet)
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

    with stage("shapes", f"generating {cfg.images} shapes images ({cfg.image_size} px) in {at.shapes}", timings):
        make_shapes.run(shapes_conf(cfg, at))
    with stage("preprocess", f"preprocessing with Ray Data (the shapes autoencoder, tiny text encoders) into "
                             f"{at.data}", timings):
        manifest = preprocess.run(preprocess_conf(cfg, at))
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
        with stage("evaluate", f"GenEval on shapes of the main run ({cfg.geneval_images_per_prompt} image(s) per "
                               "prompt), the ground truth and an untrained network", timings):
            geneval = evaluate_geneval(cfg, at, train)
    preference = None
    if cfg.dpo_steps:
        with stage("dpo", f"preference tuning: pairs of the main run's samples judged by GenEval-shapes, then "
                          f"{cfg.dpo_steps} Diffusion-DPO steps on rank-{cfg.dpo_rank} LoRA adapters", timings):
            preference = preference_tune(cfg, at, train)
    with stage("report", f"writing the report to {out}", timings):
        sources = demo_report.Sources(manifest, train, sweep, results, geneval, preference)
        summary = demo_report.write(out, sources, timings, time.perf_counter() - start)
    LOG.info("summary.md:\n" + summary)
    LOG.info(f"finished in {time.perf_counter() - start:.0f} s; report folder: {out}")
    return out


register()


def main() -> None:
    cli("demo", run, doc=__doc__)


if __name__ == "__main__":
    main()
