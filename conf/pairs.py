"""Hydra schema of `python -m workloads.make_pairs`: preference pairs sampled from a trained run and judged by
GenEval-shapes, written as a preference dataset."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.checks import Sampler, SkipLayerFields, at_least


@dataclass
class MakePairsConf(SkipLayerFields):
    run: str = MISSING  # the run whose EMA weights sample (a run folder with export/, or a diffusers folder)
    out: str = MISSING  # the preference dataset to write (local or s3://)
    data: str = MISSING  # the run's training data: its manifest names the text encoders, the VAE and the resolution
    endpoint_url: str | None = None
    # Training prompts: up to this many distinct prompts of each GenEval task, none of which is in the held-out
    # evaluation set `held_out_prompts_per_task` (the prompts `validation.geneval_prompts_per_task` and
    # `workloads.evaluate prompts_per_task=` score with the same `prompt_seed`).
    prompts_per_task: int = 16
    held_out_prompts_per_task: int = 4
    prompt_seed: int = 0
    images_per_prompt: int = 4  # samples of each prompt, each judged correct or not
    pairs_per_prompt: int = 4  # at most this many (correct, incorrect) pairs of one prompt, no image used twice
    resolution: int | None = None  # None: the data's (preprocessed without buckets)
    steps: int = 28
    guidance: float = 5.0
    shift: float = 1.0
    sampler: Sampler = Sampler.euler
    seed: int = 1  # the samples' noise; the evaluation job's default is 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        at_least(self, 1, "prompts_per_task", "images_per_prompt", "pairs_per_prompt", "steps", "batch_size")
        at_least(self, 0, "held_out_prompts_per_task", "guidance")
        if self.images_per_prompt < 2:
            raise ValueError(f"images_per_prompt must be >= 2 to make a pair, got {self.images_per_prompt}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8 (or null: the data's), got "
                             f"{self.resolution}")
        self.check_skip_layer_fields()


def register() -> None:
    ConfigStore.instance().store(name="make_pairs", node=MakePairsConf)
