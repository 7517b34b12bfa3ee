"""Forward+backward step time of our MM-DiT against diffusers' SD3Transformer2DModel.

Same configuration, weights, inputs and dtype; the two are timed alternately in one process and the
ratio ours / diffusers is printed with, on a GPU, TFLOP/s and MFU from `model.train_flops`.
Run: `python -m workloads.bench.model` (Hydra overrides, e.g. `'models=[{flavor: d24}]' batch_size=8`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel

from conf.bench import BenchModelConf, register
from model import MMDiT, MMDiTConfig, train_flops
from model.interop import diffusers_config, to_diffusers
from model.precision import resolve_device, resolve_dtype
from workloads.runtime import cli
from workloads.train.mfu import mfu, peak_tflops


@dataclass
class BenchResult:
    flavor: str
    ours_times: list[float]  # seconds per step
    theirs_times: list[float]
    flops_per_step: float
    peak: float | None

    @property
    def ours_s(self) -> float:
        return statistics.median(self.ours_times)

    @property
    def theirs_s(self) -> float:
        return statistics.median(self.theirs_times)

    def line(self) -> str:
        # The fastest step is the least disturbed by other load on shared machines; report its ratio too.
        best = min(self.ours_times) / min(self.theirs_times)
        text = (f"{self.flavor:>12}  ours {self.ours_s * 1e3:9.2f} ms  diffusers {self.theirs_s * 1e3:9.2f} ms  "
                f"ratio ours/diffusers {self.ours_s / self.theirs_s:5.3f} (fastest steps {best:5.3f})  "
                f"ours {self.flops_per_step / self.ours_s / 1e12:7.2f} TFLOP/s")
        if self.peak:  # flops_per_step covers the batch, so the rate is steps per second
            text += (f"  MFU ours {mfu(self.flops_per_step, 1 / self.ours_s, self.peak):6.1%}"
                     f"  diffusers {mfu(self.flops_per_step, 1 / self.theirs_s, self.peak):6.1%}")
        return text


def build_pair(config: MMDiTConfig, device: torch.device, dtype: torch.dtype) -> tuple[MMDiT, SD3Transformer2DModel]:
    """Our network and diffusers' with the same weights (ours initialised, then converted), built on `device`."""
    with device:
        ours = MMDiT(config)
        with torch.no_grad():  # adaLN-Zero leaves outputs at zero; give every weight a live value
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        theirs = SD3Transformer2DModel(**diffusers_config(config))
    theirs.load_state_dict(to_diffusers(ours.state_dict(), config))
    return ours.to(dtype).train(), theirs.to(dtype).train()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def median_time(step: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `repeats` timed calls after `warmup` untimed ones (compilation, autotuning, caches)."""
    return statistics.median([time_step(step, device) for _ in range(warmup + repeats)][warmup:])


def bench_one(cfg: BenchModelConf, index: int, device: torch.device, dtype: torch.dtype) -> BenchResult:
    config = cfg.models[index].build()
    torch.manual_seed(cfg.seed)
    ours, theirs = build_pair(config, device, dtype)
    b, s = cfg.batch_size, cfg.latent_size
    x = torch.randn(b, config.in_channels, s, s, device=device, dtype=dtype)
    t = torch.rand(b, device=device)  # fp32: bf16 would round t*1000 by up to 2 units
    context = torch.randn(b, cfg.text_tokens, config.context_dim, device=device, dtype=dtype)
    pooled = torch.randn(b, config.pooled_dim, device=device, dtype=dtype)

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours(x, t, context, pooled).float().square().mean().backward()

    def theirs_step() -> None:
        theirs.zero_grad(set_to_none=True)
        out = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled)
        out.sample.float().square().mean().backward()

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for i in range(cfg.warmup + cfg.steps):
        order = [("ours", ours_step), ("theirs", theirs_step)]
        for name, step in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            elapsed = time_step(step, device)
            if i >= cfg.warmup:
                times[name].append(elapsed)
    flops = train_flops(config, s, s, cfg.text_tokens) * b
    return BenchResult(cfg.models[index].flavor, times["ours"], times["theirs"], flops,
                       peak_tflops(device, cfg.peak_tflops))


def run(cfg: BenchModelConf) -> list[BenchResult]:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench_model: device {label}, dtype {dtype}, batch {cfg.batch_size}, latent {cfg.latent_size}^2, "
          f"text tokens {cfg.text_tokens}, {cfg.steps} timed steps after {cfg.warmup} warm-up, medians")
    results = []
    for i in range(len(cfg.models)):
        results.append(bench_one(cfg, i, device, dtype))
        print(results[-1].line(), flush=True)
    return results


register()


def main() -> None:
    cli("bench_model", run, doc=__doc__)


if __name__ == "__main__":
    main()
