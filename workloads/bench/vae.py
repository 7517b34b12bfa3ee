"""Images/s of the VAE on the CPU with each forward split as preprocessing, validation and evaluation split it
(`pipelines.encoders.images_per_forward`), against one forward over the whole batch, in the same run: encoding and
decoding at each image side, with the share of CPU time each spent in the kernel.
Run: `python -m workloads.bench.vae [sizes=[64,128,256,512] batch=32 threads=2]`.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from pipelines.encoders import downsample, images_per_forward, vae_forward
from pipelines.synthetic.tiny_models import build_tiny_models
from workloads.runtime import cli


@dataclass
class BenchVAEConf:
    sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # image sides
    batch: int = 32  # images a call (a preprocessing stage's `batch_size`, 16 by default; 32 in the README's runs)
    threads: int = 2  # torch threads
    repeats: int = 2  # timed calls of each kind, after one untimed
    tiny_dir: str = "~/.cache/sd3-train/tiny-models"  # the shapes VAE is built (or reused) here


def _timed(fn: Callable[[], object], images: int, repeats: int) -> tuple[float, float]:
    """(images/s, kernel share of the CPU time) of `repeats` calls of fn after one untimed call."""
    fn()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return images * repeats / seconds, system / max(system + after.ru_utime - before.ru_utime, 1e-9)


def _compare(vae: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, side: int,
             repeats: int) -> dict[str, float]:
    """fn over the whole batch x against `vae_forward`'s split of it: images/s and kernel shares."""
    whole, whole_kernel = _timed(lambda: fn(x), len(x), repeats)
    split, split_kernel = _timed(lambda: vae_forward(vae, fn, x, side, side), len(x), repeats)
    return {"whole": whole, "split": split, "ratio": split / whole, "kernel_whole": whole_kernel,
            "kernel_split": split_kernel}


def run(cfg: BenchVAEConf) -> dict:
    from diffusers import AutoencoderKL

    torch.set_num_threads(cfg.threads)
    repo = build_tiny_models(str(Path(cfg.tiny_dir).expanduser())).repo
    vae = AutoencoderKL.from_pretrained(repo, subfolder="vae").eval()
    generator = torch.Generator().manual_seed(0)
    results = {}
    print(f"the shapes VAE, fp32, {cfg.threads} threads, batch {cfg.batch}: images/s, kernel share of CPU time")
    for side in cfg.sizes:
        cells = side // downsample(vae)
        pixels = torch.rand(cfg.batch, 3, side, side, generator=generator) * 2 - 1
        latents = torch.randn(cfg.batch, vae.config.latent_channels, cells, cells, generator=generator)
        row: dict = {"images_per_forward": images_per_forward(vae, side, side)}
        with torch.inference_mode():
            row["encode"] = _compare(vae, lambda x: vae.encode(x).latent_dist.mean, pixels, side, cfg.repeats)
            row["decode"] = _compare(vae, lambda z: vae.decode(z).sample, latents, side, cfg.repeats)
        for name in ("encode", "decode"):
            r = row[name]
            print(f"{side} px, {row['images_per_forward']} images a forward, {name}: whole batch {r['whole']:.1f} "
                  f"({r['kernel_whole']:.0%} kernel), split {r['split']:.1f} ({r['kernel_split']:.0%}): "
                  f"ratio {r['ratio']:.2f}", flush=True)
        results[side] = row
    return results


ConfigStore.instance().store(name="bench_vae", node=BenchVAEConf)


def main() -> None:
    cli("bench_vae", run, doc=__doc__)


if __name__ == "__main__":
    main()
