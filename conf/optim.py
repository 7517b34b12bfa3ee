"""AdamW with linear warm-up, shared by every training job (defaults: the paper's)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConf:
    lr: float = 1e-4  # the paper's learning rate for all model sizes
    warmup_steps: int = 1000  # the paper's linear warm-up
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
