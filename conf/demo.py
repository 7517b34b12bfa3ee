"""Hydra schema of `python -m workloads.demo` (`make demo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.model import ModelConf
from conf.optim import OptimConf


@dataclass
class DemoConf:
    """A single-process run on synthetic latents: train the debug MM-DiT, validate, sample, export."""

    out_dir: str = "demo_output"
    model: ModelConf = field(default_factory=ModelConf)
    # the paper's 1e-4 / 1000 warm-up steps are for billion-parameter models; the debug net trains faster
    optim: OptimConf = field(default_factory=lambda: OptimConf(lr=1e-3, warmup_steps=50))
    steps: int = 600
    batch_size: int = 32
    latent_size: int = 16
    formulation: str = "rf/lognorm(0.00,1.00)"
    shift: float = 1.0
    text_drop_prob: float = 0.463
    val_every: int = 150
    val_samples: int = 36
    samples_per_class: int = 4
    sample_steps: int = 20
    sampler: str = "euler"
    guidance: float = 2.0
    seed: int = 0


def register() -> None:
    ConfigStore.instance().store(name="demo", node=DemoConf)
