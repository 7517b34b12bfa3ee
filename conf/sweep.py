"""Hydra schema of `python -m workloads.sweep study=depth|shift|formulation|steps preset=toy|paper`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

STUDIES = ("depth", "shift", "formulation", "steps")


@dataclass
class SweepTrainConf:
    """What every trial's training run shares (the rest of `workloads.train`'s defaults apply)."""

    base_flavor: str = "debug"  # text widths, patch size, QK-norm; each trial sets depth, hidden 64*d and d heads
    steps: int = 300
    batch_size: int = 16  # global
    lr: float = 1e-3
    warmup_steps: int = 30
    ema_decay: float = 0.99
    formulation: str = "rf/lognorm(0.00,1.00)"
    shift: float = 1.0
    deepspeed_stage: int = 2
    val_samples: int = 64
    val_every: int = 100
    checkpoint_every: int = 100
    grid_prompts: int = 2  # validation captions in each run's sample grid
    grid_per_prompt: int = 2


@dataclass
class TrialResources:
    workers: int = 1  # Ray Train workers per trial
    use_gpu: bool = False  # one GPU per worker, and one for the trial's evaluation
    cpus_per_worker: float = 1.0


@dataclass
class SweepConf:
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"preset": "toy"}])
    study: str = "depth"  # depth | shift | formulation | steps
    preset: str = "toy"  # set by the preset group; part of the default sweep name
    data: str = MISSING  # a preprocessing output (local or s3://)
    val_data: str | None = None
    endpoint_url: str | None = None
    storage: str = "sweeps"  # local folder or s3:// URI: <storage>/<name>/ holds results; <storage>/runs/ the trials
    name: str | None = None  # default <study>-<preset>; the same storage and name resume the sweep
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    study_depth: int = 2  # the depth of the shift and formulation studies
    training_shifts: list[float] = field(default_factory=lambda: [1.0, 3.0])  # shift study: trial axis
    sampling_shifts: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    sampling_steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50])  # steps study; the last is the reference
    formulations: list[str] = field(default_factory=lambda: [
        "rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/cos", "edm(-1.20,1.20)"])
    eval_samples: int = 64  # validation rows the sample metrics compare against
    eval_sample_steps: int = 28  # sampling steps of the shift study
    train: SweepTrainConf = field(default_factory=SweepTrainConf)
    trial: TrialResources = field(default_factory=TrialResources)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    max_failures: int = 2  # a failed trial is retried this often (its training resumes from its checkpoints)


PRESETS: dict[str, dict] = {
    # minutes on a 2-core laptop: the debug flavor's widths at depths 1-4, a few hundred steps on the shapes data
    "toy": {"preset": "toy", "depths": [1, 2, 3, 4], "study_depth": 2,
            "train": {"base_flavor": "debug", "steps": 300, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30,
                      "ema_decay": 0.99, "val_every": 100, "checkpoint_every": 100}},
    # the paper's scaling study: depths 15-38 at 256^2, batch 4096, 500k steps, lr 1e-4, on a real cluster
    "paper": {"preset": "paper", "depths": [15, 18, 21, 24, 30, 38], "study_depth": 24, "eval_samples": 10000,
              "train": {"base_flavor": "d24", "steps": 500_000, "batch_size": 4096, "lr": 1e-4,
                        "warmup_steps": 1000, "ema_decay": 0.9999, "val_every": 10_000,
                        "checkpoint_every": 2000, "deepspeed_stage": 2},
              "trial": {"workers": 64, "use_gpu": True, "cpus_per_worker": 8}},
}


def register() -> None:
    store = ConfigStore.instance()
    for name, node in PRESETS.items():
        store.store(group="preset", name=name, node=node, package="_global_")
    store.store(name="sweep", node=SweepConf)
