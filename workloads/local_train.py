"""A single-process training loop on synthetic latents (the demo's trainer until Ray Train lands)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from conf.demo import DemoConf
from conf.optim import OptimConf
from model import MMDiT
from model.conditioning import sample_encoder_keep
from model.formulations import get_formulation
from model.objective import training_loss, validation_loss
from workloads.synthetic import SyntheticLatents


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base learning rate, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def make_optimizer(network: MMDiT, cfg: OptimConf) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.warmup_steps))


def validate(network: MMDiT, data: SyntheticLatents, cfg: DemoConf) -> torch.Tensor:
    """Fixed-grid validation loss per timestep on a fixed held-out set: (n_timesteps,)."""
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)  # disjoint from the training stream's seed
    labels, x0 = data.batch(cfg.val_samples, gen)
    context, pooled = data.conditioning(labels)
    network.eval()
    losses = validation_loss(network, x0, context, pooled, formulation=cfg.formulation, seed=cfg.seed)
    network.train()
    return losses.mean(dim=0)


def train(network: MMDiT, data: SyntheticLatents, cfg: DemoConf,
          log: Callable[[dict], None]) -> list[dict]:
    """Train for cfg.steps; returns the per-step metrics (also passed to `log`)."""
    formulation = get_formulation(cfg.formulation)
    optimizer, scheduler = make_optimizer(network, cfg.optim)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        labels, x0 = data.batch(cfg.batch_size, gen)
        keep = sample_encoder_keep(cfg.batch_size, cfg.text_drop_prob, gen)
        context, pooled = data.conditioning(labels, keep)
        out = training_loss(network, x0, context, pooled, formulation, cfg.shift, gen)
        loss = out.per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                  "lr": scheduler.get_last_lr()[0], "step_s": time.perf_counter() - start}
        if step % cfg.val_every == 0 or step == cfg.steps:
            record["val_loss"] = validate(network, data, cfg).mean().item()
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss {record['loss']} at step {step}")
        history.append(record)
        log(record)
    return history
