"""Training loss and the fixed-grid validation loss, for any formulation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.flow import interpolate, velocity_target
from model.formulations import Formulation, get_formulation

# (x, t, context, pooled) -> network output; an MMDiT or anything with its call signature.
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_VALIDATION_TIMESTEPS = 8


@dataclass
class LossOutput:
    per_sample: torch.Tensor  # (B,) loss of each sample
    tau: torch.Tensor  # (B,) noise level each sample was trained at


def _resolve(formulation: str | Formulation) -> Formulation:
    return get_formulation(formulation) if isinstance(formulation, str) else formulation


def _mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)  # (B,)


def training_loss(network: Network, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                  formulation: str | Formulation = "rf/lognorm(0.00,1.00)", shift: float = 1.0,
                  generator: torch.Generator | None = None) -> LossOutput:
    """Per-sample loss of one batch: draw noise levels and noise, regress the formulation's target."""
    form = _resolve(formulation)
    tau = form.sample_tau(x0.shape[0], generator, shift, device=x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
    return LossOutput(loss_at(network, form, x0, eps, tau, context, pooled), tau)


def loss_at(network: Network, formulation: Formulation, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor,
            context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The formulation's per-sample loss for given noise and noise levels: (B,)."""
    z = formulation.state(interpolate(x0, eps, tau), tau)  # a x0 + b eps
    out = network(formulation.network_input(z, tau), tau, context, pooled)  # tau stays fp32 (see layers)
    return _mse_per_sample(out, formulation.target(x0, eps, z, tau))


def validation_timesteps(n: int = DEFAULT_VALIDATION_TIMESTEPS) -> torch.Tensor:
    """n evenly spaced noise levels excluding t = 1: 0, 1/n, ..., (n-1)/n."""
    return torch.arange(n, dtype=torch.float32) / n


def fixed_noise(shape: tuple[int, ...], sample_ids: torch.Tensor, n_timesteps: int, seed: int) -> torch.Tensor:
    """Noise that depends only on (seed, sample id, timestep index): (n_timesteps, B, *shape)."""
    draws = []
    for sample_id in sample_ids.tolist():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(sample_id))
        draws.append(torch.randn((n_timesteps, *shape), generator=gen))
    return torch.stack(draws, dim=1)


@torch.no_grad()
def validation_loss(network: Network, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                    sample_ids: torch.Tensor | None = None, formulation: str | Formulation = "rf",
                    n_timesteps: int = DEFAULT_VALIDATION_TIMESTEPS, seed: int = 0) -> torch.Tensor:
    """Rectified-flow velocity MSE at a fixed timestep grid with fixed noise: (B, n_timesteps).

    The same metric for every formulation (predictions convert to the velocity eps - x0), so runs compare
    number for number; average over samples and timesteps for the scalar, over samples for the per-t curve.
    `sample_ids` (default 0..B-1) key the noise, so a sample gets the same noise in any batch.
    """
    form = _resolve(formulation)
    batch = x0.shape[0]
    ids = torch.arange(batch) if sample_ids is None else sample_ids.cpu()
    noise = fixed_noise(tuple(x0.shape[1:]), ids, n_timesteps, seed).to(x0.device, x0.dtype)
    losses = []
    for i, t in enumerate(validation_timesteps(n_timesteps).tolist()):
        # Formulations defined on a narrower range are evaluated at its edge; the target is unchanged since
        # the velocity eps - x0 is constant along the path.
        tau = form.clamp(torch.full((batch,), t, device=x0.device))
        z = form.state(interpolate(x0, noise[i], tau), tau)
        out = network(form.network_input(z, tau), tau, context, pooled)
        losses.append(_mse_per_sample(form.velocity(out, z, tau), velocity_target(x0, noise[i])))
    return torch.stack(losses, dim=1)  # (B, n_timesteps)


# Diffusion-DPO (Wallace et al. 2023) used beta = 5000 on the per-pixel mean epsilon error of SD 1.5 and SDXL.
DIFFUSION_DPO_BETA_EPS = 5000.0


def default_dpo_beta(formulation: str | Formulation = "rf/lognorm(0.00,1.00)", shift: float = 1.0,
                     draws: int = 65536) -> float:
    """Diffusion-DPO's beta carried over to the velocity error: on the rectified-flow path an error in the
    velocity is (1 - t) times smaller in epsilon (eps_hat - eps = (1 - t)(v_hat - v)), so the squared errors the
    loss compares are 1 / (1 - t)^2 larger. Scaling beta by E[(1 - t)^2] under the training density keeps the
    sigmoid's argument on the scale the paper tuned (about 1470 for logit-normal(0, 1))."""
    form = _resolve(formulation)
    tau = form.sample_tau(draws, torch.Generator().manual_seed(0), shift, device="cpu")
    return DIFFUSION_DPO_BETA_EPS * float(((1 - tau.double()) ** 2).mean())


@dataclass
class DPOOutput:
    loss: torch.Tensor  # (B,) -log sigmoid(inside) per preference pair
    inside: torch.Tensor  # (B,) -beta/2 * (policy's winner-minus-loser error - the reference's): > 0 prefers the winner
    policy_error: torch.Tensor  # (2, B) the policy's winner and loser errors
    reference_error: torch.Tensor  # (2, B) the reference's
    tau: torch.Tensor  # (B,) the noise level of each pair (winner and loser share it)

    @property
    def accuracy(self) -> torch.Tensor:
        """(B,) 1 where the policy's implicit reward ranks the winner above the loser."""
        return (self.inside > 0).float()

    @property
    def reward_margin(self) -> torch.Tensor:
        """(B,) implicit reward of the winner minus the loser's (beta times the log-likelihood ratio margin)."""
        return self.inside * 2


def dpo_loss(policy: Network, reference: Network, winner: torch.Tensor, loser: torch.Tensor, context: torch.Tensor,
             pooled: torch.Tensor, beta: float, formulation: str | Formulation = "rf/lognorm(0.00,1.00)",
             shift: float = 1.0, generator: torch.Generator | None = None) -> DPOOutput:
    """Diffusion-DPO in the rectified-flow velocity form, per preference pair: winner and loser latents of the same
    caption are noised with the same t and the same noise; the errors are the formulation's per-sample losses of
    the policy and of the frozen reference (no gradient), and

        loss = -log sigmoid(-beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref))).
    """
    form = _resolve(formulation)
    n = winner.shape[0]
    tau = form.sample_tau(n, generator, shift, device=winner.device)  # (B,)
    eps = torch.randn(winner.shape, generator=generator, device=winner.device, dtype=winner.dtype)
    x0, noise, taus = torch.cat([winner, loser]), torch.cat([eps, eps]), torch.cat([tau, tau])
    context, pooled = torch.cat([context, context]), torch.cat([pooled, pooled])
    with torch.no_grad():  # first: a reference that switches the policy's adapters off is back on for its pass
        reference_error = loss_at(reference, form, x0, noise, taus, context, pooled).view(2, n)
    policy_error = loss_at(policy, form, x0, noise, taus, context, pooled).view(2, n)
    margin = (policy_error[0] - policy_error[1]) - (reference_error[0] - reference_error[1])
    inside = -0.5 * beta * margin
    return DPOOutput(-torch.nn.functional.logsigmoid(inside), inside, policy_error, reference_error, tau)
