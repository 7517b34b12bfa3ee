"""Hydra schema of `python -m workloads.reference`: the shapes reference model's whole recipe in one place (its data,
its training run, and where its EMA export ships), so the model the repository ships can be made again by one
command, and resumed by the same command."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.checks import at_least
from conf.model import ModelConf
from conf.optim import OptimConf
from conf.shapes import AUTOENCODER_CHANNELS, AUTOENCODER_DOWNSAMPLE
from conf.train import (
    CheckpointConf,
    EMAConf,
    MetricsConf,
    ObjectiveConf,
    RunConf,
    TrainConf,
    TrainerConf,
    ValidationConf,
)

RUN_NAME = "shapes-reference"  # the run's folder under <storage>/runs: the resume key


def reference_train() -> TrainConf:
    """The reference run: depth 3 (width 192) of the debug flavor at 128 px on 4-channel latents (8x8 patches of 2),
    one Ray Train worker with both cores, AdamW 1e-3 after 300 warm-up steps, EMA 0.999, only the original captions
    (the tiny captioner is random), GenEval-shapes of 96 images every 500 steps with guidance 2 (guidance 4 empties
    one-object images at this scale). The shipped model's schedule: 19,690 steps, the learning rate decaying linearly
    over the last 6,000 (the score rose from about 0.28 to 0.36 with the decay); the run can be stopped and resumed
    at any step, and a longer one raises both (`train.trainer.max_steps=`, `train.optim.decay_steps=`)."""
    return TrainConf(
        model=ModelConf("debug", depth=3, hidden_size=192, num_heads=3, patch_size=2, in_channels=4),
        trainer=TrainerConf(num_workers=1, cpus_per_worker=2.0, batch_size=32, max_steps=19690),
        optim=OptimConf(lr=1e-3, warmup_steps=300, decay_steps=6000),
        ema=EMAConf(decay=0.999),
        objective=ObjectiveConf(synthetic_caption_prob=0.0, text_drop_prob=0.1),
        validation=ValidationConf(every=500, geneval_every=500, geneval_prompts_per_task=8,
                                  geneval_images_per_prompt=2, guidance=2.0, sample_steps=20),
        checkpoint=CheckpointConf(every=500, keep=3),
        metrics=MetricsConf(print_every=200),
        run=RunConf(name=RUN_NAME))


@dataclass
class ReferenceConf:
    SECTION = "reference"
    # <storage>/shapes (the generated images), <storage>/data (their latents and text embeddings),
    # <storage>/runs/<train.run.name> (the run); local or s3://
    storage: str = "reference"
    endpoint_url: str | None = None
    images: int = 12000  # shapes images generated (the default style, seed `seed`)
    image_size: int = 128
    resolution: int = 128  # preprocessing's square bucket: latents 16x16 with the 8x autoencoder
    latent_channels: int = 4  # the shipped shapes autoencoder it encodes with (`train.model.in_channels` matches)
    shard_size: int = 250
    seed: int = 0
    # When the run has an export: copy it (fp16 weights), its card and its figures into this folder (the repository's
    # `pipelines/synthetic/weights/shapes-reference` is where `make demo` and the tests find it). None: don't.
    ship_to: str | None = None
    train: TrainConf = field(default_factory=reference_train)

    def __post_init__(self) -> None:
        at_least(self, 1, "images", "image_size", "resolution", "shard_size")
        if self.latent_channels not in AUTOENCODER_CHANNELS:
            raise ValueError(f"reference.latent_channels must be one of {list(AUTOENCODER_CHANNELS)} (the shipped "
                             f"shapes autoencoders), got {self.latent_channels}")
        if self.resolution % AUTOENCODER_DOWNSAMPLE:
            raise ValueError(f"reference.resolution must be a multiple of {AUTOENCODER_DOWNSAMPLE}, got "
                             f"{self.resolution}")
        if self.train.model.in_channels not in (None, self.latent_channels):
            raise ValueError(f"reference.train.model.in_channels ({self.train.model.in_channels}) must equal "
                             f"reference.latent_channels ({self.latent_channels})")


def register() -> None:
    ConfigStore.instance().store(name="reference", node=ReferenceConf)
