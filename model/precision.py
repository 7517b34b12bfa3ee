"""Device and dtype names from configs ("auto", "cuda", "bfloat16", ...) to torch objects."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, gpu_default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """`auto` is `gpu_default` on a GPU and float32 on the CPU (where half-precision kernels are slow or missing)."""
    if name == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
