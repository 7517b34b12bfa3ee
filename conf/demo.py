"""Hydra schema of `python -m workloads.demo` (`make demo`): the main job end to end on the embedded default."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.checks import at_least
from conf.optim import OptimConf
from conf.shapes import Style
from conf.train import CheckpointConf, EMAConf, ObjectiveConf, TrainConf, TrainerConf, ValidationConf


def demo_train() -> TrainConf:
    """Every demo run's training settings: 2 Ray Train workers, 200 steps, GenEval-shapes every 100 (the score
    against training compute); the paper's 1e-4 / 1000 warm-up steps are for billion-parameter models. Only the
    original captions: the tiny captioner is random, so its captions say nothing of the image (the paper's 50% mix
    assumes a real captioner)."""
    return TrainConf(
        objective=ObjectiveConf(synthetic_caption_prob=0.0),
        trainer=TrainerConf(num_workers=2, max_steps=200, batch_size=16),
        optim=OptimConf(lr=1e-3, warmup_steps=30),
        ema=EMAConf(decay=0.99),
        validation=ValidationConf(every=100, samples=16, grid_prompts=4, grid_per_prompt=4, sample_steps=20,
                                  guidance=4.0, geneval_every=100, geneval_prompts_per_task=4),
        checkpoint=CheckpointConf(every=100, keep=2))


@dataclass
class DemoConf:
    SECTION = "demo"
    out_dir: str = "demo_output"  # the report folder (always local)
    # where the data, runs and sweep live: a local folder or s3://bucket/prefix; None: <out_dir>/work
    storage: str | None = None
    endpoint_url: str | None = None  # an S3-compatible store; else AWS_ENDPOINT_URL(_S3) or AWS itself
    images: int = 96  # shapes images generated
    image_size: int = 96
    resolution: int = 64  # preprocessing's square bucket (latents 8x8 with the 8x VAE)
    shard_size: int = 16  # images per preprocessing shard
    seed: int = 0
    # How the shapes are drawn (`make_shapes`' style fields) and which shipped shapes autoencoder encodes them
    # (`models.latent_channels`); the main run's network reads the autoencoder's channels (`train.model.in_channels`).
    min_side: float = Style.min_side
    max_side: float = Style.max_side
    max_objects: int = Style.max_objects
    background_low: int = Style.background_low
    latent_channels: int = 16
    # The toy depth sweep (the `train.model.flavor` at each depth, width 64*depth); the main run is its `main_depth`
    # trial, which at depth 2 is the debug flavor. The sweep finds that run finished and reuses it, like any study
    # whose runs already exist.
    depths: list[int] = field(default_factory=lambda: [1, 2, 3])
    main_depth: int = 2
    # Every run's training config (the training job's own schema: `train.trainer.num_workers=1`, `train.optim.lr=...`).
    train: TrainConf = field(default_factory=demo_train)
    # GenEval on shapes (`workloads.evaluate`) of the main run, beside the ground truth's score and an untrained
    # network's: `geneval_prompts_per_task` prompts of each task (None: GenEval's 553), `geneval_images_per_prompt`
    # images each (0 skips it), Euler sampling. 20 x 2 keeps the demo within its 10 minutes with the DPO stage.
    geneval_images_per_prompt: int = 2
    geneval_prompts_per_task: int | None = 20
    geneval_steps: int = 20
    geneval_guidance: float = 4.0
    # Preference tuning of the main run (the paper's last stage): `workloads.make_pairs` samples
    # `pairs_images_per_prompt` images of up to `pairs_prompts_per_task` training prompts per task (none of them in the
    # held-out GenEval set of `train.validation.geneval_prompts_per_task`), pairs correct with incorrect ones, and
    # `objective=dpo` trains LoRA adapters of rank `dpo_rank` for `dpo_steps` steps (0 skips the stage), scoring
    # GenEval-shapes on the held-out prompts before and after (`dpo_geneval_images_per_prompt` images each).
    dpo_steps: int = 40
    dpo_rank: int = 16
    dpo_geneval_images_per_prompt: int = 4
    pairs_prompts_per_task: int = 16
    pairs_images_per_prompt: int = 8
    pairs_sample_steps: int = 10  # Euler steps of the pairs' samples (half the evaluation's: 528 images to judge)
    # The shipped shapes reference model (`pipelines/synthetic/weights/shapes-reference`, a network that already follows
    # prompts sometimes): evaluated and preference-tuned beside the main run, at its own resolution, autoencoder and
    # guidance, with `reference_images` shapes images of its kind preprocessed for its text encoders and autoencoder.
    reference: bool = True
    reference_images: int = 32

    def __post_init__(self) -> None:
        at_least(self, 1, "images", "image_size", "resolution", "shard_size", "geneval_steps", "dpo_rank",
                 "dpo_geneval_images_per_prompt", "pairs_prompts_per_task", "pairs_sample_steps",
                 "reference_images")
        at_least(self, 0, "geneval_images_per_prompt", "dpo_steps", "geneval_guidance")
        at_least(self, 1, "geneval_prompts_per_task", optional=True)
        if min(self.depths, default=0) < 1:
            raise ValueError(f"demo.depths must be positive depths, got {list(self.depths)}")
        if self.pairs_images_per_prompt < 2:
            raise ValueError(f"pairs_images_per_prompt must be >= 2 to make a pair, got {self.pairs_images_per_prompt}")
        if len(set(self.depths)) < 2 or self.main_depth not in self.depths:
            raise ValueError(f"depths needs at least 2 distinct values (a scaling fit) including main_depth="
                             f"{self.main_depth}, got {list(self.depths)}")


def register() -> None:
    ConfigStore.instance().store(name="demo", node=DemoConf)
