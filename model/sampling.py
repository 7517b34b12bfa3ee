"""Sampling: integrate the rectified-flow ODE from noise (t = 1) to data (t = 0) on the shifted schedule,
with classifier-free guidance. Models trained with any formulation sample through the velocity they imply."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.conditioning import unconditional_like
from model.flow import shift_timesteps
from model.formulations import Formulation, get_formulation
from model.objective import Network

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (B, C, H, W), t (B,)) -> velocity
SAMPLERS = ("euler", "heun")


def sampling_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0, evenly spaced and then shifted: (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)


def guided_velocity(network: Network, context: torch.Tensor, pooled: torch.Tensor, guidance: float = 1.0,
                    formulation: str | Formulation = "rf") -> VelocityFn:
    """Velocity field with classifier-free guidance v_u + w (v_c - v_u), both branches in one batch."""
    form = get_formulation(formulation) if isinstance(formulation, str) else formulation
    if guidance != 1.0:
        null_context, null_pooled = unconditional_like(context, pooled)
        context, pooled = torch.cat([context, null_context]), torch.cat([pooled, null_pooled])

    def velocity(z_rf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        copies = 1 if guidance == 1.0 else 2
        tau = form.clamp(t.repeat(copies))  # (copies * B,)
        z = form.state(z_rf.repeat(copies, 1, 1, 1), tau)  # (copies * B, C, H, W)
        v = form.velocity(network(form.network_input(z, tau), tau, context, pooled), z, tau)
        if copies == 1:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """First-order ODE integration along `timesteps` (decreasing from 1 to 0)."""
    z = noise
    for t, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist(), strict=True):
        t_batch = torch.full((z.shape[0],), t, device=z.device)
        z = z + (t_next - t) * velocity(z, t_batch)
    return z


@torch.no_grad()
def heun_sample(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (two network calls a step; the step into t = 0 stays Euler)."""
    z = noise
    for t, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist(), strict=True):
        t_batch = torch.full((z.shape[0],), t, device=z.device)
        v = velocity(z, t_batch)
        z_euler = z + (t_next - t) * v
        if t_next == 0.0:
            z = z_euler
            continue
        v_next = velocity(z_euler, torch.full_like(t_batch, t_next))
        z = z + (t_next - t) * 0.5 * (v + v_next)
    return z


def sample(network: Network, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, steps: int = 28,
           guidance: float = 1.0, shift: float = 1.0, method: str = "euler",
           formulation: str | Formulation = "rf") -> torch.Tensor:
    """Latents from noise (B, C, H, W) with `steps` steps of `method` on the schedule shifted by `shift`."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler method must be one of {SAMPLERS}, got {method!r}")
    integrate = euler_sample if method == "euler" else heun_sample
    velocity = guided_velocity(network, context, pooled, guidance, formulation)
    return integrate(velocity, noise, sampling_schedule(steps, shift).to(noise.device))
