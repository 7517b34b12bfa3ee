"""Model FLOPs utilisation: achieved training FLOP/s (from `model.train_flops`) over the accelerator's peak."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0, "A10G": 125.0}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The configured peak, else a known GPU's bf16 peak by name, else None (MFU not reported, e.g. on CPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def mfu(flops_per_sample: float, samples_per_s: float, peak_tflops_value: float) -> float:
    """Fraction of peak achieved: flops_per_sample * samples_per_s / peak."""
    return flops_per_sample * samples_per_s / (peak_tflops_value * 1e12)
