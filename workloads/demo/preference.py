"""The paper's last stage as the demo and `make reproduce` run it: preference pairs sampled from a base network and
judged by GenEval-shapes (`workloads.make_pairs`), then Diffusion-DPO on LoRA adapters of that base
(`workloads.train objective=dpo`), with GenEval-shapes of held-out prompts before the first step and after the last."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Protocol

from conf.checks import Objective, validate
from conf.pairs import MakePairsConf
from conf.reference import ReferenceConf
from conf.train import LoraConf, TrainConf
from pipelines.storage import Location, join
from workloads.demo import report as demo_report
from workloads.reference import driver as reference_job
from workloads.reference import shipped
from workloads.runtime import logger
from workloads.sweep import driver as sweep_job
from workloads.train import driver as train_job

LOG = logger("demo")


class PreferenceSettings(Protocol):
    """The preference stage's settings, as `DemoConf` and `ReproduceConf` (which tunes its best run) both carry them."""

    endpoint_url: str | None
    pairs_prompts_per_task: int
    pairs_images_per_prompt: int
    pairs_sample_steps: int
    dpo_steps: int
    dpo_rank: int
    dpo_geneval_images_per_prompt: int


@dataclass(frozen=True)
class Base:
    """A network the stage tunes. `weights`: a run folder (its export/) or a diffusers transformer folder; `data`: a
    dataset whose manifest names the text encoders and autoencoder the network was trained with; `train`: its training
    settings, which DPO keeps (network, optimizer, workers, held-out prompts); `guidance`: the CFG scale its pairs are
    sampled with; `pairs`: the folder under the storage the pairs go to."""

    weights: str
    data: str
    train: TrainConf
    guidance: float
    pairs: str = "pairs"

    @classmethod
    def of_run(cls, train: TrainConf, data: str, guidance: float) -> Base:
        """A run the same job trained: its folder under `train.run`."""
        return cls(join(train.run.storage, train.run.name), data, train, guidance)


def shipped_reference(storage: str, endpoint_url: str | None, images: int, shard_size: int,
                      seed: int) -> ReferenceConf:
    """The shipped reference model's recipe (its card) on `images` images of its kind under `<storage>/reference`:
    its image size, resolution and autoencoder, so that their manifest names the text encoders and autoencoder the
    model reads and draws with (`prepare_reference_data` makes them)."""
    r = shipped.recipe()
    r.storage, r.endpoint_url, r.ship_to = join(storage, "reference"), endpoint_url, None
    r.images, r.shard_size, r.seed = images, shard_size, seed
    return r


def check_reference_data(r: ReferenceConf) -> None:
    """The configs of `prepare_reference_data`, checked before any work."""
    from pipelines.make_shapes import check as check_shapes

    check_shapes(reference_job.shapes_conf(r))
    validate(reference_job.preprocess_conf(r))


def prepare_reference_data(r: ReferenceConf) -> None:
    """The images of `shipped_reference` drawn and preprocessed (each kept when an earlier invocation finished it)."""
    from pipelines import make_shapes, preprocess

    make_shapes.run(reference_job.shapes_conf(r))
    preprocess.run(reference_job.preprocess_conf(r))


def reference_base(r: ReferenceConf, settings: TrainConf, run_storage: str) -> Base:
    """The shipped reference model as a base, tuned with `settings`' training settings (workers, batch, optimizer,
    held-out prompts) on its own network, data (`r`'s) and sampling guidance; its DPO run goes under `run_storage`."""
    train = copy.deepcopy(settings)
    train.model = copy.deepcopy(reference_job.train_conf(r).model)
    train.data = join(r.storage, "data")
    train.run.storage, train.run.name = run_storage, shipped.SHIPPED.name
    return Base(str(shipped.folder()), train.data, train, r.train.validation.guidance, pairs="pairs-reference")


def pairs_conf(cfg: PreferenceSettings, storage: str, base: Base) -> MakePairsConf:
    """Preference pairs from the base: training prompts (none held out) judged by GenEval-shapes."""
    return MakePairsConf(run=base.weights, data=base.data, out=join(storage, base.pairs),
                         endpoint_url=cfg.endpoint_url, prompts_per_task=cfg.pairs_prompts_per_task,
                         held_out_prompts_per_task=base.train.validation.geneval_prompts_per_task,
                         images_per_prompt=cfg.pairs_images_per_prompt, steps=cfg.pairs_sample_steps,
                         guidance=base.guidance)


def dpo_conf(cfg: PreferenceSettings, storage: str, base: Base) -> TrainConf:
    """The base's training settings turned into `objective=dpo` on its pairs: LoRA adapters on its weights,
    GenEval-shapes of the held-out prompts before the first step and after the last."""
    c = copy.deepcopy(base.train)
    c.data, c.val_data, c.init_from = pairs_conf(cfg, storage, base).out, None, base.weights
    o, v = c.objective, c.validation
    o.kind, o.synthetic_caption_prob, o.text_drop_prob = Objective.dpo, 0.0, 0.0
    c.lora = LoraConf(rank=cfg.dpo_rank)
    c.trainer.max_steps = c.checkpoint.every = v.every = v.geneval_every = cfg.dpo_steps
    v.geneval_before, v.geneval_images_per_prompt, v.guidance = True, cfg.dpo_geneval_images_per_prompt, base.guidance
    c.run.name = f"dpo-{base.train.run.name}"
    validate(c)
    return c


def preference_tune(cfg: PreferenceSettings, storage: str, base: Base) -> demo_report.Preference:
    """Pairs, then DPO (each kept when an earlier invocation finished it). A base that drew no correct image of any
    training prompt gives no pairs: the stage is then skipped, and the report says why."""
    from pipelines import schema
    from workloads.make_pairs import driver as make_pairs

    pairs, dpo = pairs_conf(cfg, storage, base), dpo_conf(cfg, storage, base)
    out = Location.of(pairs.out, cfg.endpoint_url)
    if out.exists(schema.MANIFEST):
        manifest = json.loads(out.read_bytes(schema.MANIFEST))
        LOG.info(f"{pairs.out} already holds {manifest['counts']['written']} pairs: kept")
    else:
        try:
            manifest = make_pairs.run(pairs)
        except make_pairs.NoPairs as error:
            LOG.warning(f"DPO of {base.weights} skipped: {error}")
            return demo_report.Preference(None, None, dpo, skipped=str(error))
    needed = dpo.trainer.batch_size + dpo.trainer.num_workers  # a global batch, and a held-out pair per worker
    if manifest["counts"]["written"] < needed:
        reason = (f"{manifest['counts']['written']} pairs from {manifest['counts']['read']} samples, fewer than the "
                  f"{needed} a DPO step and its validation need (global batch {dpo.trainer.batch_size})")
        LOG.warning(f"DPO of {base.weights} skipped: {reason}")
        return demo_report.Preference(manifest, None, dpo, skipped=reason)
    summary = sweep_job.finished(dpo)
    if summary is None:
        train_job.run(dpo)
        summary = sweep_job.finished(dpo)
    return demo_report.Preference(manifest, summary, dpo)
