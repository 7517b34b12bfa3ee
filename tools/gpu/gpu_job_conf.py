"""Hydra schema of `python -m tools.gpu.gpu_job scale=full|tiny`: preprocessing, training and attention of
the whole job on one machine, each against a baseline measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from conf.checks import ZeroStage, at_least, in_unit_interval
from model import get_flavor


@dataclass
class BenchGPUJobConf:
    """Defaults are `scale=full`: SD3's encoders at full size (random weights, fp16) and d24 at 256^2 (bf16,
    per-block compile, ZeRO-2, one worker), sized to end in a few minutes on one H100 or H200."""

    SECTION = "gpu_job"
    scale: str = "full"  # set by the scale group
    out: str | None = None  # where gpu_job.json goes; None: $OUT when set, else <temporary folder>/gpu-job-out
    # where each run makes its scratch folder (encoder repo, images, preprocessed data, training run); None: the
    # system's temporary folder. Removed at the end unless keep_work: a d24 run leaves ~50 GB there.
    work: str | None = None
    keep_work: bool = False
    tiny_dir: str = "~/.cache/sd3-train/tiny-models"  # the tiny models: their tokenizers always, their configs at tiny
    seed: int = 0
    # the encoders (full: SD3's configs; tiny: the tiny models' configs) and preprocessing
    full_size_encoders: bool = True
    images: int = 512
    resolution: int = 256  # Table 7's
    shard_size: int = 64
    encoder_batch: int = 64  # per call of an encoder: the timings and every preprocessing stage
    encoder_repeats: int = 10
    gpu_share: float = 0.5  # of the GPU for each of the VAE and text actors (both on the one GPU)
    # training: `workloads.train` itself, one worker
    flavor: str = "d24"
    batch_size: int = 32  # global = per GPU
    steps: int = 30
    zero_stage: ZeroStage = ZeroStage["2"]
    compile: bool | None = None  # None: the training job's default (per-block compile on GPU, off on CPU)
    torch_adam: bool | None = None  # None: the job's default (torch's fused AdamW on GPU)
    network_steps: int = 8  # timed steps of the network alone, same flavor, batch and resolution
    # attention at the paper's final resolution
    attention_resolution: int = 1024
    mfu_target: float = 0.5

    def __post_init__(self) -> None:
        at_least(self, 1, "images", "shard_size", "encoder_batch", "encoder_repeats", "batch_size", "steps",
                 "network_steps")
        in_unit_interval(self, "mfu_target")
        for name in ("resolution", "attention_resolution"):
            if getattr(self, name) < 16 or getattr(self, name) % 16:
                raise ValueError(f"{self.SECTION}.{name} must be a positive multiple of 16, got {getattr(self, name)}")
        if not 0 < self.gpu_share <= 1:
            raise ValueError(f"{self.SECTION}.gpu_share must be in (0, 1], got {self.gpu_share}")
        get_flavor(self.flavor)  # an unknown flavor fails here, naming the known ones
        if self.images < 2 * self.batch_size:
            raise ValueError(f"{self.SECTION}.images={self.images} must be at least 2 * batch_size="
                             f"{2 * self.batch_size}: a full training batch after the validation rows are held out")


SCALES: dict[str, dict] = {
    "full": {"scale": "full"},
    # the same code path on a CPU in a few minutes: the tiny models' encoder configs, the debug network
    "tiny": {"scale": "tiny", "full_size_encoders": False, "images": 32, "shard_size": 8, "encoder_batch": 8,
             "encoder_repeats": 2, "flavor": "debug", "batch_size": 4, "steps": 4, "network_steps": 2},
}


@dataclass
class BenchGPUJob(BenchGPUJobConf):
    """`python -m tools.gpu.gpu_job`'s primary config: the schema plus Hydra's `scale` group."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"scale": "full"}])


def register_gpu_job() -> None:
    store = ConfigStore.instance()
    for name, node in SCALES.items():
        store.store(group="scale", name=name, node=node, package="_global_")
    store.store(name="bench_gpu_job", node=BenchGPUJob)
