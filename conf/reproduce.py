"""Hydra schema of `python -m workloads.reproduce preset=quick|default|cluster` (`make reproduce`): the paper's
findings run as studies on the shapes data, each set beside the paper's figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore

from conf.checks import at_least
from conf.optim import OptimConf
from conf.shapes import AUTOENCODER_CHANNELS
from conf.train import CheckpointConf, EMAConf, ObjectiveConf, TrainConf, TrainerConf, ValidationConf


class DPOBase(StrEnum):
    study = "study"  # the formulation study's best run by GenEval-shapes (else the study-depth run)
    reference = "reference"  # the shipped shapes reference model, which follows prompts (pipelines/synthetic/weights)


class Finding(StrEnum):
    formulation = "formulation"  # Table 1: the formulations ranked at equal training compute
    depth = "depth"  # Fig. 8: validation loss is a power law in compute and predicts GenEval
    shift = "shift"  # the resolution-dependent timestep shift alpha = sqrt(m/n)
    steps = "steps"  # Table 6: larger models lose less when sampled with fewer steps
    captions = "captions"  # Table 4: the 50/50 mix with synthetic captions raises GenEval
    dpo = "dpo"  # Table 5: preference tuning raises GenEval
    autoencoder = "autoencoder"  # Table 3 and Fig. 10: reconstruction and generation against latent channels


TABLE_1 = ["rf/lognorm(0.00,1.00)", "rf/lognorm(1.00,0.60)", "rf/mode(1.29)", "rf/cosmap", "rf/uniform",
           "eps/linear", "v/cos", "edm(-1.20,1.20)"]  # the eight, spelled as `PAPER_GLOBAL_RANK` does


def reproduce_train() -> TrainConf:
    """Every run's training settings (each study sets only its axis): one Ray Train worker, so the 2-core default
    spends its CPU on training rather than on a second rank's processes; the original captions only (the caption
    study's mix run sets `objective.synthetic_caption_prob`); scored by the studies after training, not during it."""
    return TrainConf(
        objective=ObjectiveConf(synthetic_caption_prob=0.0),
        trainer=TrainerConf(num_workers=1, max_steps=500, batch_size=32),
        optim=OptimConf(lr=1e-3, warmup_steps=100),  # the paper's 1e-4 / 1000 are for billion-parameter models
        ema=EMAConf(decay=0.999),
        validation=ValidationConf(every=250, samples=64, grid_prompts=2, grid_per_prompt=2, sample_steps=20,
                                  guidance=4.0, text_gap=False),
        checkpoint=CheckpointConf(every=250, keep=1))


@dataclass
class ReproduceConf:
    SECTION = "reproduce"
    preset: str = "default"  # set by the preset group
    out_dir: str = "reproduce"  # the report folder: report.md and its plots (local; also <storage>/report on s3://)
    # where the data, runs and studies live: a local folder or s3://bucket/prefix; None: <out_dir>/work
    storage: str | None = None
    endpoint_url: str | None = None
    findings: list[Finding] = field(default_factory=lambda: list(Finding))
    # The shapes data: drawn at `image_size`, preprocessed at `resolution` (every study) and `high_resolution` (the
    # shift study's second resolution), each sample with its terse GenEval caption and a rich synthetic one derived
    # from its ground truth (standing in for the paper's VLM captions).
    images: int = 4000
    image_size: int = 128
    shard_size: int = 128
    seed: int = 0
    resolution: int = 64
    high_resolution: int = 128
    # The studies' axes: width 64*depth at each depth of `train.model.flavor`; `study_depth` for the formulation,
    # shift and caption studies (its run is shared with the depth study).
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    study_depth: int = 2
    formulations: list[str] = field(default_factory=lambda: list(TABLE_1))
    sampling_steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50])  # the last is the reference
    sampling_shifts: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    # Trials of a study trained side by side (Tune's max_concurrent_trials); None: as many as the cluster holds when
    # the study starts (an autoscaling cluster at rest has no GPU nodes yet, so that is one). Each
    # Train worker runs one thread per CPU it holds. On 2 cores, two one-thread depth-4 training loops in separate
    # processes ran 2.1x one's steps per second (one loop on two threads: 1.5x); inside the job, with Ray's actors
    # beside them, two at a time made the default's depth study 1.4x faster (README).
    concurrent_trials: int | None = 2
    caption_mix: float = 0.5  # the caption study's `objective.synthetic_caption_prob` (the paper's 50/50)
    # Sample metrics of every run's EMA export: GenEval-shapes over `geneval_prompts_per_task` prompts of each task,
    # `geneval_images_per_prompt` images each (Euler, `geneval_steps`, guidance), and the latent Fréchet distance
    # over `eval_samples` held-out rows (shift and steps studies).
    geneval_prompts_per_task: int = 8
    geneval_images_per_prompt: int = 2
    geneval_steps: int = 20
    geneval_guidance: float = 4.0
    eval_samples: int = 64
    # Preference tuning (the paper's last stage), as `make demo` does it, of `dpo_base`: the shipped shapes reference
    # model (on `reference_images` images of its kind, preprocessed for its encoders), or the studies' best run.
    # The studies' runs follow prompts at chance at this size; Table 5 starts from a base that follows them.
    dpo_base: DPOBase = DPOBase.reference
    reference_images: int = 32
    dpo_steps: int = 60
    dpo_rank: int = 16
    dpo_geneval_images_per_prompt: int = 4
    pairs_prompts_per_task: int = 16
    pairs_images_per_prompt: int = 8
    pairs_sample_steps: int = 10
    # The autoencoder finding: the shipped shapes autoencoders with `channels` latent channels reconstruct
    # `reconstruction_images` held-out images at `resolution` and `high_resolution` (Table 3; FID too with
    # `fid_weights`, the TorchScript Inception file `conf.evaluate.INCEPTION`), and a depth series at
    # `channel_depths` trains on each one's latents (Fig. 10; [] measures the reconstruction only).
    channels: list[int] = field(default_factory=lambda: list(AUTOENCODER_CHANNELS))
    channel_depths: list[int] = field(default_factory=lambda: [1, 2, 3])
    reconstruction_images: int = 256
    fid_weights: str | None = None
    train: TrainConf = field(default_factory=reproduce_train)

    def __post_init__(self) -> None:
        at_least(self, 1, "images", "image_size", "shard_size", "resolution", "high_resolution", "study_depth",
                 "geneval_prompts_per_task", "geneval_images_per_prompt", "geneval_steps", "eval_samples",
                 "dpo_rank", "dpo_geneval_images_per_prompt", "pairs_prompts_per_task", "pairs_sample_steps",
                 "reconstruction_images", "reference_images")
        at_least(self, 0, "dpo_steps", "geneval_guidance")
        if not all(steps >= 1 for steps in self.sampling_steps):
            raise ValueError(f"reproduce.sampling_steps must all be >= 1, got {list(self.sampling_steps)}")
        findings = set(self.findings)
        if not findings:
            raise ValueError(f"findings is empty: choose from {[f.value for f in Finding]}")
        fits = Finding.depth in findings or Finding.steps in findings
        if fits and (len(set(self.depths)) < 2 or min(self.depths) < 1):
            raise ValueError(f"depths needs at least 2 distinct positive depths (a fit), got {list(self.depths)}")
        if self.study_depth not in self.depths:
            raise ValueError(f"study_depth={self.study_depth} must be one of depths {list(self.depths)}: its run is "
                             "shared by the depth, formulation, shift and caption studies")
        if Finding.formulation in findings and len(set(self.formulations)) < 2:
            raise ValueError(f"formulations needs at least 2 to rank, got {list(self.formulations)}")
        if Finding.shift in findings:
            if self.high_resolution <= self.resolution or self.high_resolution > self.image_size:
                raise ValueError(f"high_resolution ({self.high_resolution}) must be above resolution "
                                 f"({self.resolution}) and at most image_size ({self.image_size})")
            if len(self.sampling_shifts) < 2 or min(self.sampling_shifts) <= 0:
                raise ValueError(f"sampling_shifts needs at least 2 positive shifts, got {list(self.sampling_shifts)}")
        if Finding.steps in findings and len(set(self.sampling_steps)) < 2:
            raise ValueError("sampling_steps needs at least two values (the largest is the reference)")
        if Finding.autoencoder in findings:
            self.check_channels()
        if self.concurrent_trials is not None and self.concurrent_trials < 1:
            raise ValueError(f"concurrent_trials must be >= 1 or None (as many as fit), got {self.concurrent_trials}")
        if not 0 < self.caption_mix <= 1:
            raise ValueError(f"caption_mix must be in (0, 1], got {self.caption_mix}")
        if self.pairs_images_per_prompt < 2:
            raise ValueError(f"pairs_images_per_prompt must be >= 2 to make a pair, got {self.pairs_images_per_prompt}")
        if self.train.data or self.train.objective.synthetic_caption_prob:
            raise ValueError("train.data and train.objective.synthetic_caption_prob are set by the studies (the data "
                             "they make; caption_mix for the caption study), not in train")

    def check_channels(self) -> None:
        """The autoencoder finding's fields, checked when it is chosen."""
        if not set(self.channels) <= set(AUTOENCODER_CHANNELS) or len(set(self.channels)) < 2:
            raise ValueError(f"channels needs at least 2 distinct latent widths of the shipped shapes autoencoders "
                             f"{list(AUTOENCODER_CHANNELS)}, got {list(self.channels)}")
        if self.channel_depths and (len(set(self.channel_depths)) < 2 or min(self.channel_depths) < 1):
            raise ValueError(f"channel_depths needs at least 2 distinct positive depths (the gap between channel "
                             f"counts against depth), or [] for the reconstruction only; got "
                             f"{list(self.channel_depths)}")


PRESETS: dict[str, dict] = {
    # the machinery end to end in minutes: every finding, too small for its verdicts to mean much
    "quick": {"preset": "quick", "images": 512, "shard_size": 64, "depths": [1, 2, 3],
              "sampling_shifts": [1.0, 2.0, 4.0], "sampling_steps": [5, 20],
              "formulations": ["rf/lognorm(0.00,1.00)", "rf/uniform", "eps/linear"],
              "geneval_prompts_per_task": 3, "geneval_images_per_prompt": 1, "geneval_steps": 10, "eval_samples": 32,
              "dpo_steps": 10, "pairs_prompts_per_task": 4, "pairs_images_per_prompt": 4,
              "dpo_geneval_images_per_prompt": 1, "channel_depths": [1, 2], "reconstruction_images": 64,
              "train": {"trainer": {"max_steps": 150, "batch_size": 16}, "optim": {"warmup_steps": 20},
                        "ema": {"decay": 0.99}, "validation": {"every": 150, "samples": 32},
                        "checkpoint": {"every": 150}}},
    # the 2-core default: 89.9 minutes end to end, two trials at a time (README), before the autoencoder finding,
    # whose channel series add an estimated 20-25 minutes (docs/studies.md)
    "default": {"preset": "default"},
    # a GPU cluster: 8 workers a run, longer runs, GenEval's full prompt set at 4 images; 8 runs at a time fill the
    # project's RayCluster (its GPU group: 8 nodes of 8 GPUs), which the autoscaler starts as the trials ask
    "cluster": {"preset": "cluster", "images": 200_000, "shard_size": 1024, "depths": [2, 4, 6, 8, 10, 12],
                "study_depth": 4, "geneval_prompts_per_task": 100, "geneval_images_per_prompt": 4,
                "geneval_steps": 28, "eval_samples": 1024, "concurrent_trials": 8, "dpo_steps": 1000,
                "pairs_prompts_per_task": 64, "channel_depths": [2, 6, 12], "reconstruction_images": 1024,
                "train": {"trainer": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8, "max_steps": 50_000,
                                      "batch_size": 256},
                          "optim": {"lr": 1e-4, "warmup_steps": 1000}, "ema": {"decay": 0.9999},
                          "validation": {"every": 5000, "samples": 1024}, "checkpoint": {"every": 2000}}},
}


def register() -> None:
    store = ConfigStore.instance()
    for name, node in PRESETS.items():
        store.store(group="preset", name=name, node=node, package="_global_")
    store.store(name="reproduce", node=ReproduceJob)


@dataclass
class ReproduceJob(ReproduceConf):
    """`python -m workloads.reproduce`'s primary config: the schema plus Hydra's `preset` group."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"preset": "default"}])
