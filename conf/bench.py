"""Hydra schema of `python -m workloads.bench.model`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.checks import CompileBackend, Device, Dtype, at_least, one_of, positive
from conf.model import ModelConf


@dataclass
class BenchModelConf:
    """Forward+backward step time of our MM-DiT against diffusers' SD3Transformer2DModel."""

    SECTION = "bench_model"
    models: list[ModelConf] = field(default_factory=lambda: [ModelConf("debug"), ModelConf("d15")])
    batch_size: int = 2
    latent_size: int = 32  # 256 px at the VAE's 8x downsampling
    text_tokens: int = 154
    steps: int = 6  # timed steps per model, alternating ours and diffusers
    warmup: int = 2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    peak_tflops: float | None = None  # accelerator peak for MFU; None: looked up from the device name
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("bench_model.models is empty: give at least one model (e.g. [{flavor: debug}])")
        at_least(self, 1, "batch_size", "latent_size", "text_tokens", "steps")
        at_least(self, 0, "warmup")
        one_of(self, "device", Device)
        one_of(self, "dtype", Dtype)
        positive(self, "peak_tflops", optional=True)


def register() -> None:
    ConfigStore.instance().store(name="bench_model", node=BenchModelConf)


@dataclass
class BenchTrainConf:
    """Training-step overhead of streaming input, and per-rank ZeRO state bytes (`workloads.bench.train`)."""

    SECTION = "bench_train"
    data: str | None = None  # a preprocessed dataset; None: random rows in the same layout, in a temp folder
    rows: int = 2048  # random rows when `data` is None
    latent_size: int = 32  # of the random rows (256 px)
    model: ModelConf = field(default_factory=ModelConf)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 16  # global
    stage: int = 2  # ZeRO stage of the timing part
    warmup: int = 3
    steps: int = 20  # timed steps per phase; two rounds of streaming then in-memory
    memory_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    activation_checkpointing: bool = False
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs by name

    def __post_init__(self) -> None:
        at_least(self, 1, "rows", "latent_size", "num_workers", "batch_size", "steps")
        at_least(self, 0, "warmup")
        positive(self, "cpus_per_worker")
        positive(self, "peak_tflops", optional=True)
        if self.batch_size % self.num_workers:
            raise ValueError(f"bench_train.batch_size={self.batch_size} (global) must be divisible by "
                             f"bench_train.num_workers={self.num_workers}")
        for stage in (self.stage, *self.memory_stages):
            if stage not in range(4):
                raise ValueError(f"bench_train.stage and bench_train.memory_stages are ZeRO stages in [0, 1, 2, 3], "
                                 f"got {stage}")


def register_train() -> None:
    ConfigStore.instance().store(name="bench_train", node=BenchTrainConf)


COMPILE_MODES = {"auto": None, "dynamic": True, "static": False}  # mode -> trainer.compile_dynamic


@dataclass
class BenchCompileConf:
    """Per-block torch.compile against eager across resolution buckets (`workloads.bench.compile`)."""

    SECTION = "bench_compile"
    model: ModelConf = field(default_factory=ModelConf)
    batch_size: int = 4
    latent_sizes: list[int] = field(default_factory=lambda: [32, 48, 64, 32])  # buckets in the order they arrive
    steps: int = 4  # timed steps per bucket after its first (compiling) step
    modes: list[str] = field(default_factory=lambda: ["auto", "dynamic", "static"])  # compile_dynamic None/True/False
    backend: str = "inductor"
    activation_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(COMPILE_MODES)
        if unknown:
            raise ValueError(f"modes must be among {list(COMPILE_MODES)}, got {sorted(unknown)}")
        at_least(self, 1, "batch_size", "steps")
        if not self.latent_sizes or min(self.latent_sizes) < 1:
            raise ValueError(f"bench_compile.latent_sizes must be positive latent sides, got {list(self.latent_sizes)}")
        one_of(self, "backend", CompileBackend)
        one_of(self, "device", Device)
        one_of(self, "dtype", Dtype)


def register_compile() -> None:
    ConfigStore.instance().store(name="bench_compile", node=BenchCompileConf)
