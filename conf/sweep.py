"""Hydra schema of `python -m workloads.sweep study=depth|shift|formulation|steps preset=toy|paper`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore

from conf.checks import Sampler, SkipLayerFields, at_least
from conf.optim import OptimConf
from conf.recipe import RecipeConf, recipe_presets
from conf.train import CheckpointConf, EMAConf, TrainConf, TrainerConf, ValidationConf
from model.config import PARAMETRIZATIONS


class Study(StrEnum):
    depth = "depth"  # validation loss against training compute over depths (the scaling study)
    shift = "shift"  # sampling shift x training shift at one depth
    formulation = "formulation"  # the paper's Table 1 formulations at one depth
    steps = "steps"  # sample quality at fewer sampling steps, per depth
    recipe = "recipe"  # the toy's and the recipe's knobs at equal training compute, with ASHA (`conf.recipe`)
    transfer = "transfer"  # learning rate x width under SP and muP: does the best learning rate move with width


def toy_train() -> TrainConf:
    """Every trial's training run in the toy preset (minutes on a 2-core laptop); each trial sets only its axis."""
    return TrainConf(
        trainer=TrainerConf(num_workers=1, max_steps=300, batch_size=16),
        optim=OptimConf(lr=1e-3, warmup_steps=30),  # the paper's 1e-4 / 1000 are for billion-parameter models
        ema=EMAConf(decay=0.99),
        validation=ValidationConf(every=100, samples=64, grid_prompts=2, grid_per_prompt=2, sample_steps=20),
        checkpoint=CheckpointConf(every=100, keep=2))


@dataclass
class SweepConf(SkipLayerFields):
    SECTION = "sweep"
    study: Study = Study.depth
    preset: str = "toy"  # set by the preset group; part of the default sweep name
    data: str | None = None  # a preprocessing output (local or s3://), for every trial; the recipe study makes its own
    val_data: str | None = None
    endpoint_url: str | None = None
    storage: str = "sweeps"  # local folder or s3:// URI: <storage>/<name>/ holds results; <storage>/runs/ the trials
    # default <study>-<preset>, then -<sampler> unless euler and -slg with skip_layers; the same storage and name
    # resume the sweep
    name: str | None = None
    # The trial axes. Depth trials take `train.model.flavor`'s text widths, patch size and QK-norm at each depth with
    # the paper's width rule (hidden 64*d, d heads).
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    study_depth: int = 2  # the depth of the shift and formulation studies
    training_shifts: list[float] = field(default_factory=lambda: [1.0, 3.0])  # shift study: trial axis
    sampling_shifts: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    sampling_steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50])  # steps study; the last is the reference
    # The transfer study: every depth of `depths` (widths 64*d) at every learning rate, under each parametrization
    # (`train.model.parametrization`; muP's base width is `train.model.mup_base_width`), scored by the final EMA
    # validation loss at equal steps.
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parametrizations: list[str] = field(default_factory=lambda: list(PARAMETRIZATIONS))
    formulations: list[str] = field(default_factory=lambda: [
        "rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/cos", "edm(-1.20,1.20)"])
    eval_samples: int = 64  # validation rows the sample metrics compare against
    eval_sample_steps: int = 28  # sampling steps of the shift study (and of the depth and formulation GenEval)
    # GenEval on shapes of every trial's EMA export (`workloads.evaluate`): `geneval_prompts_per_task` prompts of
    # each of its six tasks (0: off), beside the latent metric of the shift and steps studies, per depth in the
    # depth study (against validation loss) and per formulation. Needs the data's text encoders and VAE.
    geneval_prompts_per_task: int = 4
    geneval_images_per_prompt: int = 1
    geneval_guidance: float = 4.0
    # The studies' sampler (latent metric and GenEval; the trial runs' own validation samples with
    # train.validation's). The `skip_layer*` fields (`SkipLayerFields`) guide the GenEval samples only.
    sampler: Sampler = Sampler.euler
    # The training schema itself: every trial's run is this config with the trial's axis set (depth and width,
    # training shift or formulation), `data`/`val_data`/`endpoint_url` from above and `run` from the trial's key.
    train: TrainConf = field(default_factory=toy_train)
    # The recipe study's knobs, budget and successive halving (`conf.recipe`); its trials make their own data
    # (`data` is not read) under <storage>/data/.
    recipe: RecipeConf = field(default_factory=RecipeConf)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    max_failures: int = 2  # a failed trial is retried this often (its training resumes from its checkpoints)

    def __post_init__(self) -> None:
        at_least(self, 1, "study_depth", "eval_samples", "eval_sample_steps", "geneval_images_per_prompt")
        at_least(self, 0, "geneval_prompts_per_task", "geneval_guidance")
        at_least(self, -1, "max_failures")  # -1: retried forever (Tune's)
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"sweep.max_concurrent_trials must be >= 1 or null (as many as fit), got "
                             f"{self.max_concurrent_trials}")
        for name in ("training_shifts", "sampling_shifts", "sampling_steps"):
            if not all(v > 0 for v in getattr(self, name)):
                raise ValueError(f"sweep.{name} must all be > 0, got {list(getattr(self, name))}")
        if not all(lr > 0 for lr in self.lrs):
            raise ValueError(f"sweep.lrs must all be > 0, got {list(self.lrs)}")
        if self.study == Study.transfer:
            self._check_transfer()
        if self.study in (Study.depth, Study.steps, Study.transfer) and (not self.depths or min(self.depths) < 1):
            raise ValueError(f"sweep.depths must be positive depths, got {list(self.depths)}")
        if self.study == Study.steps and len(self.sampling_steps) < 2:
            raise ValueError("the steps study needs at least two sampling_steps (the largest is the reference)")
        if not self.data and self.study != Study.recipe:
            raise ValueError(f"sweep.data is required: the preprocessed data every {self.study} trial trains on")
        if self.train.data or self.train.val_data:
            raise ValueError("set data= and val_data= at the sweep level (they feed every trial), not in train")
        self.check_skip_layer_fields()

    def _check_transfer(self) -> None:
        if len(set(self.lrs)) < 3:
            raise ValueError(f"the transfer study needs at least three distinct lrs (an optimum between two), got "
                             f"{list(self.lrs)}")
        if len(set(self.depths)) < 2:
            raise ValueError(f"the transfer study needs at least two depths (widths to compare), got "
                             f"{list(self.depths)}")
        kinds = list(self.parametrizations)
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(PARAMETRIZATIONS):
            raise ValueError(f"sweep.parametrizations must be distinct values of {list(PARAMETRIZATIONS)}, got {kinds}")


PRESETS: dict[str, dict] = {
    # minutes on a 2-core laptop: the debug flavor's widths at depths 1-4, a few hundred steps on the shapes data
    "toy": {"preset": "toy", "depths": [1, 2, 3, 4], "study_depth": 2},
    # the paper's scaling study: depths 15-38 at 256^2, batch 4096, 500k steps, lr 1e-4, on a real cluster
    "paper": {"preset": "paper", "depths": [15, 18, 21, 24, 30, 38], "study_depth": 24, "eval_samples": 10000,
              "train": {"model": {"flavor": "d24"},
                        "trainer": {"num_workers": 64, "use_gpu": True, "cpus_per_worker": 8, "max_steps": 500_000,
                                    "batch_size": 4096},
                        "optim": {"lr": 1e-4, "warmup_steps": 1000}, "ema": {"decay": 0.9999},
                        "validation": {"every": 10_000, "sample_steps": 28}, "checkpoint": {"every": 2000},
                        "deepspeed": {"stage": 2}}},
}


PRESETS |= recipe_presets()


def register() -> None:
    store = ConfigStore.instance()
    for name, node in PRESETS.items():
        store.store(group="preset", name=name, node=node, package="_global_")
    store.store(name="sweep", node=SweepJob)


@dataclass
class SweepJob(SweepConf):
    """`python -m workloads.sweep`'s primary config: the schema plus Hydra's `preset` group."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"preset": "toy"}])
