"""Sampling: integrate the rectified-flow ODE from noise (t = 1) to data (t = 0) on the shifted schedule,
with classifier-free guidance and optionally SD3.5's skip-layer guidance. Models trained with any formulation
sample through the velocity they imply."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from model.conditioning import unconditional_like
from model.flow import shift_timesteps
from model.formulations import Formulation, get_formulation
from model.objective import Network


@dataclass(frozen=True)
class Step:
    """Step `index` (from 0) of `count`: where an integrator is, for guidance scheduled by step index. Every network
    call of one step (Heun makes two) sees the same step."""

    index: int
    count: int


VelocityFn = Callable[[torch.Tensor, torch.Tensor, Step], torch.Tensor]  # (z (B, C, H, W), t (B,), step) -> velocity


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (SLG) of SD3.5 Medium: v += scale (v_cond - v_skip), where v_skip is the conditional
    branch with the blocks `layers` skipped, at the steps i with start * n < i < stop * n of n steps (both bounds
    strict: diffusers' `StableDiffusion3Pipeline` rule and the reference code's `SkipLayerCFGDenoiser`)."""

    layers: tuple[int, ...]
    scale: float
    start: float  # fractions of the step count
    stop: float

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"SkipLayerGuidance.layers must be block indices >= 0, at least one, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"SkipLayerGuidance.layers must not repeat a block, got {self.layers}")
        if self.scale < 0:
            raise ValueError(f"SkipLayerGuidance.scale must be >= 0, got {self.scale}")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"SkipLayerGuidance needs 0 <= start < stop <= 1, got start={self.start}, "
                             f"stop={self.stop}")

    def applies(self, step: Step) -> bool:
        """Whether this step adds the skip branch (never at scale 0, which is plain CFG at no extra cost)."""
        return self.scale > 0 and self.start * step.count < step.index < self.stop * step.count


# SD3.5 Medium's setting in its reference code (`sd3_infer.py`): blocks 7-9 at scale 2.5, from 1% to 20% of the steps.
SD35_MEDIUM_SLG = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2)


def sampling_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0, evenly spaced and then shifted: (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)


def guided_velocity(network: Network, context: torch.Tensor, pooled: torch.Tensor, guidance: float = 1.0,
                    formulation: str | Formulation = "rf", slg: SkipLayerGuidance | None = None,
                    guidance_below: float = 1.0) -> VelocityFn:
    """Velocity field with classifier-free guidance v_u + w (v_c - v_u), both branches in one batch, plus
    s (v_c - v_skip) at the steps `slg` applies to (one more call, conditional only). SLG works without CFG too,
    as in the reference code (diffusers drops it when guidance <= 1). With `guidance_below` < 1, CFG applies only at
    t <= guidance_below (a guidance interval, Kynkaanniemi et al. 2024): at higher noise the conditional velocity
    alone, so guidance does not push the layout (how many objects, where) away from the data's."""
    if not 0.0 < guidance_below <= 1.0:
        raise ValueError(f"guidance_below must be in (0, 1], got {guidance_below}")
    form = get_formulation(formulation) if isinstance(formulation, str) else formulation
    copies = 1 if guidance == 1.0 else 2
    cond_context, cond_pooled = context, pooled
    if copies == 2:
        null_context, null_pooled = unconditional_like(context, pooled)
        context, pooled = torch.cat([context, null_context]), torch.cat([pooled, null_pooled])

    def branch(z_rf: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
               **network_kwargs: object) -> torch.Tensor:
        """The rf velocity of the network on n = len(context) / B copies of the batch: (n * B, C, H, W)."""
        n = context.shape[0] // z_rf.shape[0]
        tau = form.clamp(t.repeat(n))  # (n * B,)
        z = form.state(z_rf.repeat(n, 1, 1, 1), tau)  # (n * B, C, H, W)
        return form.velocity(network(form.network_input(z, tau), tau, context, pooled, **network_kwargs), z, tau)

    def velocity(z_rf: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        if copies == 2 and float(t.max()) <= guidance_below:
            v_cond, v_uncond = branch(z_rf, t, context, pooled).chunk(2)  # (B, C, H, W) each
            guided = v_uncond + guidance * (v_cond - v_uncond)
        else:
            v_cond = guided = branch(z_rf, t, cond_context, cond_pooled)  # (B, C, H, W)
        if slg is None or not slg.applies(step):
            return guided
        # skip_layers= only here, so networks without it (stand-ins) still sample without SLG
        v_skip = branch(z_rf, t, cond_context, cond_pooled, skip_layers=slg.layers)  # (B, C, H, W)
        return guided + slg.scale * (v_cond - v_skip)

    return velocity


def _steps(timesteps: torch.Tensor) -> Iterator[tuple[Step, float, float]]:
    """(step, t, t_next) of each step along `timesteps`."""
    times = timesteps.tolist()
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        yield Step(i, len(times) - 1), t, t_next


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """First-order ODE integration along `timesteps` (decreasing from 1 to 0)."""
    z = noise
    for step, t, t_next in _steps(timesteps):
        t_batch = torch.full((z.shape[0],), t, device=z.device)
        z = z + (t_next - t) * velocity(z, t_batch, step)
    return z


@torch.no_grad()
def heun_sample(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method (two network calls a step; the step into t = 0 stays Euler)."""
    z = noise
    for step, t, t_next in _steps(timesteps):
        t_batch = torch.full((z.shape[0],), t, device=z.device)
        v = velocity(z, t_batch, step)
        z_euler = z + (t_next - t) * v
        if t_next == 0.0:
            z = z_euler
            continue
        v_next = velocity(z_euler, torch.full_like(t_batch, t_next), step)
        z = z + (t_next - t) * 0.5 * (v + v_next)
    return z


def _log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) of the rectified-flow path z = (1 - t) x0 + t noise: -inf at t = 1."""
    return -math.inf if t >= 1.0 else math.inf if t <= 0.0 else math.log((1.0 - t) / t)


@torch.no_grad()
def dpmpp_2m_sample(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M), the SD3.5 reference code's default sampler, on the rectified-flow ODE: one network call a
    step, on the data prediction x0 = z - t v with alpha = 1 - t, sigma = t. Second order from the second step on
    (the previous step's x0 extrapolated by the ratio of the log-SNR steps), first order on the first step and on
    the step into t = 0, as diffusers' `DPMSolverMultistepScheduler` does with `final_sigmas_type="zero"`."""
    z = noise
    previous: tuple[torch.Tensor, float] | None = None  # (x0 at the previous time, that step's log-SNR step)
    for step, t, t_next in _steps(timesteps):
        x0 = z - t * velocity(z, torch.full((z.shape[0],), t, device=z.device), step)
        if t_next <= 0.0:  # sigma = 0: the data prediction itself
            z = x0
            continue
        h = _log_snr(t_next) - _log_snr(t)
        d = x0
        if previous is not None and math.isfinite(previous[1]):
            half_over_r = 0.5 * h / previous[1]
            d = (1.0 + half_over_r) * x0 - half_over_r * previous[0]
        z = (t_next / t) * z - (1.0 - t_next) * math.expm1(-h) * d
        previous = (x0, h)
    return z


INTEGRATORS: dict[str, Callable[[VelocityFn, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "euler": euler_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample}
# The `sampler=` choices of validation, evaluation, pairs and the studies.
SAMPLERS = tuple(INTEGRATORS)


def sample(network: Network, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, steps: int = 28,
           guidance: float = 1.0, shift: float = 1.0, method: str = "euler",
           formulation: str | Formulation = "rf", slg: SkipLayerGuidance | None = None,
           guidance_below: float = 1.0) -> torch.Tensor:
    """Latents from noise (B, C, H, W) with `steps` steps of `method` on the schedule shifted by `shift`; `slg`
    adds skip-layer guidance (None: off); CFG only at t <= `guidance_below` (1: every step)."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler method must be one of {SAMPLERS}, got {method!r}")
    integrate = INTEGRATORS[method]
    velocity = guided_velocity(network, context, pooled, guidance, formulation, slg, guidance_below)
    return integrate(velocity, noise, sampling_schedule(steps, shift).to(noise.device))
