"""AdamW with linear warm-up, shared by every training job (defaults: the paper's)."""

from __future__ import annotations

from dataclasses import dataclass

from conf.checks import at_least, positive


@dataclass
class OptimConf:
    SECTION = "optim"
    lr: float = 1e-4  # the paper's learning rate for all model sizes
    warmup_steps: int = 1000  # the paper's linear warm-up
    # Linear decay over the last `decay_steps` of trainer.max_steps (warm-up, stable, decay), down to 1/decay_steps of
    # lr at the last step; 0: constant after the warm-up (the paper's). Raising max_steps on resume moves the decay.
    decay_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the gradient norm is clipped to this; 0: no clipping (DeepSpeed's convention)

    def __post_init__(self) -> None:
        positive(self, "lr", "eps")
        at_least(self, 0, "warmup_steps", "decay_steps", "weight_decay", "grad_clip")
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas must be two values in [0, 1) (AdamW's moment decays), got {betas}")
