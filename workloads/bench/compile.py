"""`python -m workloads.bench.compile`: per-block torch.compile (the training job's `trainer.compile`) against eager,
bucket by bucket, in one process on the same weights and inputs.

For each `compile_dynamic` mode (auto: PyTorch's automatic dynamic shapes; dynamic: from the start; static: one
compile per shape) it prints each bucket's first step (with its compile, if any), the graphs compiled so far, and the
steady step time as a ratio to eager's at that bucket. Buckets arrive in the order given, the first one again last.
"""

from __future__ import annotations

import torch

from conf.bench import COMPILE_MODES, BenchCompileConf, register_compile
from model import MMDiT, train_flops
from model.precision import resolve_device, resolve_dtype
from workloads.bench.model import median_time, time_step
from workloads.runtime import cli
from workloads.train.distribute import apply_activation_checkpointing, apply_compile
from workloads.train.mfu import mfu, peak_tflops


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def build(cfg: BenchCompileConf, device: torch.device, dtype: torch.dtype) -> MMDiT:
    torch.manual_seed(0)
    with device:
        net = MMDiT(cfg.model.build()).to(dtype)
    with torch.no_grad():  # adaLN-Zero leaves outputs at zero; give every weight a live value
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(net)
    return net


def step_times(net: MMDiT, side: int, cfg: BenchCompileConf, device: torch.device,
               dtype: torch.dtype) -> tuple[float, float]:
    """(first step's seconds, median of the next `cfg.steps`) of forward+backward at `side`x`side` latents."""
    c = net.config
    gen = torch.Generator(device=device).manual_seed(side)
    inputs = (torch.randn(cfg.batch_size, c.in_channels, side, side, generator=gen, device=device, dtype=dtype),
              torch.rand(cfg.batch_size, generator=gen, device=device),
              torch.randn(cfg.batch_size, 154, c.context_dim, generator=gen, device=device, dtype=dtype),
              torch.randn(cfg.batch_size, c.pooled_dim, generator=gen, device=device, dtype=dtype))

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(*inputs).float().square().mean().backward()

    first = time_step(step, device)
    return first, median_time(step, device, cfg.steps, warmup=0)


def run(cfg: BenchCompileConf) -> dict:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, gpu_default=torch.bfloat16)
    config, peak = cfg.model.build(), peak_tflops(device)
    print(f"bench_compile: {cfg.model.flavor} depth {config.depth}, batch {cfg.batch_size}, {dtype} on {device}, "
          f"backend {cfg.backend}, buckets {cfg.latent_sizes} (latent sides)", flush=True)
    eager_net = build(cfg, device, dtype)
    eager = {side: step_times(eager_net, side, cfg, device, dtype)[1] for side in dict.fromkeys(cfg.latent_sizes)}
    del eager_net
    figures: dict = {"eager_s": eager, "modes": {}}
    for mode in cfg.modes:
        torch._dynamo.reset()
        net = build(cfg, device, dtype)
        apply_compile(net, cfg.backend, COMPILE_MODES[mode])
        start, rows = graphs(), []
        for side in cfg.latent_sizes:
            first, steady = step_times(net, side, cfg, device, dtype)
            rows.append({"side": side, "first_s": first, "steady_s": steady, "graphs": graphs() - start,
                         "vs_eager": steady / eager[side]})
            line = (f"  {mode:>7} latent {side:3d}: first step {first:7.2f} s, {graphs() - start} graphs so far, "
                    f"step {steady * 1e3:8.1f} ms = {steady / eager[side]:.3f}x eager")
            if peak:
                rate = cfg.batch_size / steady
                line += f", MFU {mfu(train_flops(config, side, side), rate, peak):.1%}"
            print(line, flush=True)
        figures["modes"][mode] = rows
        del net
    return figures


register_compile()


def main() -> None:
    cli("bench_compile", run, doc=__doc__)


if __name__ == "__main__":
    main()
