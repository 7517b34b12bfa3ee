"""One-shot GPU checks of the MM-DiT (run on an accelerator machine, prints figures for the issue note):
bf16/fp32 agreement with diffusers, flash-attention SDPA, peak memory, step time ratio and MFU.

Run: `python -m workloads.bench.gpu_check`.
"""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conf.bench import BenchModelConf
from conf.model import ModelConf
from model import MMDiT, MMDiTConfig, count_params, get_flavor, train_flops
from workloads.bench.model import build_pair, median_time, run
from workloads.train.distribute import apply_compile
from workloads.train.mfu import mfu, peak_tflops


def _inputs(config: MMDiTConfig, batch: int, latent: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(batch, config.in_channels, latent, latent, generator=gen, device=device, dtype=dtype),
            torch.rand(batch, generator=gen, device=device),  # timesteps stay fp32: bf16 cannot hold t*1000
            torch.randn(batch, 154, config.context_dim, generator=gen, device=device, dtype=dtype),
            torch.randn(batch, config.pooled_dim, generator=gen, device=device, dtype=dtype))


def check_agreement(device: torch.device) -> None:
    """Same weights and inputs through ours and diffusers on the GPU, fp32 (TF32 off) and bf16."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # diffusers' patch conv too
    for qk in ("none", "rms"):
        config = get_flavor("d15", depth=4, qk_norm=qk)
        for dtype in (torch.float32, torch.bfloat16):
            ours, theirs = build_pair(config, device, dtype)
            x, t, ctx, pooled = _inputs(config, 2, 64, dtype, device)
            with torch.no_grad():
                a = ours(x, t, ctx, pooled).float()
                b = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx,
                           pooled_projections=pooled).sample.float()
            rel = ((a - b).norm() / b.norm()).item()
            print(f"agreement qk_norm={qk:4} {dtype!s:15} max|diff| {(a - b).abs().max().item():.3e}  "
                  f"relative L2 {rel:.3e}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def check_flash_and_memory(device: torch.device, flavor: str, batch: int, latent: int) -> None:
    """fwd+bwd with SDPA restricted to the flash kernel (raises if it cannot be used), and peak memory."""
    config = get_flavor(flavor)
    with device:
        net = MMDiT(config).to(torch.bfloat16)
    inputs = _inputs(config, batch, latent, torch.bfloat16, device)
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        net(*inputs).float().square().mean().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    print(f"flash-only SDPA OK: {flavor} batch {batch} latent {latent}^2 bf16 fwd+bwd; weights "
          f"{weights / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB (weights+grads+activations)", flush=True)


def time_ours_only(device: torch.device, flavor: str, batch: int, latent: int, steps: int = 8,
                   compile_blocks: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict[str, float | None]:
    """Step time and MFU of our network alone (sizes where two copies would not fit; optional per-block compile):
    forward and backward, no optimizer. Returns ms_per_step, samples_per_s, tflops and mfu (None without a peak)."""
    config = get_flavor(flavor)
    with device:
        net = MMDiT(config).to(dtype)
    if compile_blocks:
        apply_compile(net)  # as the training job compiles
    inputs = _inputs(config, batch, latent, dtype, device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(*inputs).float().square().mean().backward()

    median = median_time(step, device, steps)
    flops = train_flops(config, latent, latent) * batch
    peak = peak_tflops(device)
    figures = {"ms_per_step": median * 1e3, "samples_per_s": batch / median, "tflops": flops / median / 1e12,
               "mfu": mfu(flops, 1 / median, peak) if peak else None}
    label = f"ours only{' compiled' if compile_blocks else ''} {flavor} ({count_params(config) / 1e9:.2f}B)"
    text = f"{label} batch {batch} latent {latent}^2: " \
           f"{median * 1e3:.1f} ms/step, {figures['tflops']:.1f} TFLOP/s"
    if peak:
        text += f", MFU {figures['mfu']:.1%} of {peak:.0f}"
    print(text, flush=True)
    return figures


def main() -> None:
    start = time.perf_counter()
    device = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"peak bf16 {peak_tflops(device)} TFLOP/s", flush=True)
    check_agreement(device)
    check_flash_and_memory(device, "d24", batch=8, latent=64)
    torch.cuda.empty_cache()
    run(BenchModelConf(models=[ModelConf("d15"), ModelConf("d24")], batch_size=16, latent_size=32,
                       steps=10, warmup=3, device="cuda", dtype="bfloat16"))
    torch.cuda.empty_cache()
    run(BenchModelConf(models=[ModelConf("d24")], batch_size=4, latent_size=128,
                       steps=6, warmup=2, device="cuda", dtype="bfloat16"))
    torch.cuda.empty_cache()
    time_ours_only(device, "sd3.5-large", batch=8, latent=32)
    for flavor, batch in (("d24", 64), ("sd3.5-large", 32)):
        torch.cuda.empty_cache()
        time_ours_only(device, flavor, batch=batch, latent=32)
        torch.cuda.empty_cache()
        time_ours_only(device, flavor, batch=batch, latent=32, compile_blocks=True)
    print(f"gpu_check done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
