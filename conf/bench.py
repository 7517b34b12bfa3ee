"""Hydra schema of `python -m workloads.bench_model`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from conf.model import ModelConf


@dataclass
class BenchModelConf:
    """Forward+backward step time of our MM-DiT against diffusers' SD3Transformer2DModel."""

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


def register() -> None:
    ConfigStore.instance().store(name="bench_model", node=BenchModelConf)
