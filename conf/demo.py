"""Hydra schema of `python -m workloads.demo` (`make demo`): the main job end to end on the embedded default."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.sweep import SweepTrainConf


@dataclass
class DemoConf:
    out_dir: str = "demo_output"  # the report folder (always local)
    # where the data, runs and sweep live: a local folder or s3://bucket/prefix; None: <out_dir>/work
    storage: str | None = None
    endpoint_url: str | None = None  # an S3-compatible store; else AWS_ENDPOINT_URL(_S3) or AWS itself
    images: int = 96  # shapes images generated
    image_size: int = 96
    resolution: int = 64  # preprocessing's square bucket (latents 8x8 with the 8x VAE)
    shard_size: int = 16  # images per preprocessing shard (and data file: validation holds out whole files)
    seed: int = 0
    workers: int = 2  # Ray Train workers of every run
    # The toy depth sweep (width 64*depth, depth heads); the main run is its `main_depth` trial, which at depth 2 is
    # the debug flavor. The sweep finds that run finished and reuses it, like any study whose runs already exist.
    depths: list[int] = field(default_factory=lambda: [1, 2, 3])
    main_depth: int = 2
    # every run's training settings; the paper's 1e-4 / 1000 warm-up steps are for billion-parameter models
    train: SweepTrainConf = field(default_factory=lambda: SweepTrainConf(
        steps=200, batch_size=16, lr=1e-3, warmup_steps=30, ema_decay=0.99, val_every=100, checkpoint_every=100,
        val_samples=16, grid_prompts=4, grid_per_prompt=4))


def register() -> None:
    ConfigStore.instance().store(name="demo", node=DemoConf)
