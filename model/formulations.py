"""The training formulations of the paper's study, behind one interface so one loop trains any of them.

Every formulation is a path z = a x0 + b eps plus a network parameterisation. All of them share one noise
coordinate, the rectified-flow time tau = sigma / (1 + sigma) with sigma = b / a the noise-to-signal ratio:
the network always receives tau as its timestep, the resolution shift acts on it (it scales sigma), and every
prediction converts to (x0, eps) and hence to the rectified-flow velocity eps - x0. That conversion lets one
validation metric and one sampler serve all formulations.

Paths: `linear` (a = 1 - tau, b = tau), `vp` (a^2 + b^2 = 1), `ve` (a = 1, b = sigma; EDM).
Predictions: `velocity` (eps - x0), `eps`, `v` (a eps - b x0) and `edm` (Karras et al.'s preconditioned F).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from model.flow import TimestepDensity, per_sample, sample_timesteps, shift_timesteps, velocity_target

Path = Literal["linear", "vp", "ve"]
Prediction = Literal["velocity", "eps", "v", "edm"]
LDM_STEPS, LDM_BETA_START, LDM_BETA_END = 1000, 0.00085, 0.012  # the LDM "scaled linear" discrete schedule
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0

# Global rank over 24 settings (lower is better), the paper's Table 1.
PAPER_GLOBAL_RANK: dict[str, float] = {
    "rf/lognorm(0.00,1.00)": 1.54, "rf/lognorm(1.00,0.60)": 2.08, "rf/lognorm(0.50,0.60)": 2.71,
    "rf/mode(1.29)": 2.75, "rf/lognorm(0.50,1.00)": 2.83, "eps/linear": 2.88, "rf/mode(1.75)": 3.33,
    "rf/cosmap": 4.13, "edm(0.00,0.60)": 5.63, "rf": 5.67, "v/linear": 6.83, "edm(0.60,1.20)": 9.00,
    "v/cos": 9.17, "edm/cos": 11.04, "edm/rf": 13.04, "edm(-1.20,1.20)": 15.58,
}


def canonical_name(name: str) -> str:
    """The one spelling of a formulation, as `PAPER_GLOBAL_RANK` writes it: `rf/uniform` is the paper's `rf`,
    `rf/lognorm(0,1)` is `rf/lognorm(0.00,1.00)`, `edm(-1.2,1.2)` is `edm(-1.20,1.20)`."""
    form = get_formulation(name)
    if form.path == "linear":
        density = str(form.noise.density)
        return "rf" if density == "uniform" else f"rf/{density}"
    if form.path == "ve" and form.name.startswith("edm("):
        d = form.noise.density
        return f"edm({d.loc:.2f},{d.scale:.2f})"
    return form.name


def paper_global_rank(name: str) -> float | None:
    """The formulation's global rank in the paper's Table 1 (lower is better), whatever its spelling; None for a
    formulation the paper did not rank, or a name that is no formulation."""
    try:
        return PAPER_GLOBAL_RANK.get(canonical_name(name))
    except ValueError:
        return None


@functools.cache
def _ldm_tau() -> torch.Tensor:
    """tau of each of the LDM schedule's 1000 discrete steps (cached; do not modify the result)."""
    betas = torch.linspace(LDM_BETA_START**0.5, LDM_BETA_END**0.5, LDM_STEPS, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return (alpha_bar.rsqrt() * (1 - alpha_bar).sqrt() / (1 + alpha_bar.rsqrt() * (1 - alpha_bar).sqrt())).float()


@dataclass(frozen=True)
class NoiseLevels:
    """How training draws tau: a timestep density on tau itself, the cosine schedule at uniform t
    (sigma = tan(pi t / 2)), or the LDM discrete schedule at a uniform step."""

    kind: Literal["density", "cos", "ldm"]
    density: TimestepDensity = field(default_factory=lambda: TimestepDensity("uniform"))

    def sample(self, n: int, generator: torch.Generator | None, shift: float,
               device: torch.device | str) -> torch.Tensor:
        """n noise levels tau, shifted (sigma scaled by `shift`)."""
        if self.kind == "density":
            return sample_timesteps(self.density, n, generator, shift, device)
        if self.kind == "cos":
            t = torch.rand(n, generator=generator, device=device) * (math.pi / 2)
            tau = torch.sin(t) / (torch.sin(t) + torch.cos(t))
        else:
            steps = torch.randint(0, LDM_STEPS, (n,), generator=generator, device=device)
            tau = _ldm_tau().to(device)[steps]
        return shift_timesteps(tau, shift)


@dataclass(frozen=True)
class Formulation:
    """A path, a network parameterisation and a training noise distribution; see the module docstring."""

    name: str
    path: Path
    prediction: Prediction
    noise: NoiseLevels
    sigma_data: float = 0.5  # EDM's data standard deviation (the paper's weighting uses 0.5)

    @property
    def tau_range(self) -> tuple[float, float]:
        """The noise levels the formulation is defined on; evaluation clamps to them."""
        if self.path == "ve":
            return EDM_SIGMA_MIN / (1 + EDM_SIGMA_MIN), EDM_SIGMA_MAX / (1 + EDM_SIGMA_MAX)
        if self.noise.kind == "ldm":
            tau = _ldm_tau()
            return float(tau[0]), float(tau[-1])
        return 0.0, 1.0

    def sample_tau(self, n: int, generator: torch.Generator | None = None, shift: float = 1.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Training noise levels, shifted (sigma scaled by `shift`) and clamped to the formulation's range."""
        return self.clamp(self.noise.sample(n, generator, shift, device))

    def clamp(self, tau: torch.Tensor) -> torch.Tensor:
        lo, hi = self.tau_range
        return tau.clamp(lo, hi)

    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with z = a x0 + b eps at noise level tau (B,)."""
        if self.path == "linear":
            return 1 - tau, tau
        if self.path == "vp":
            norm = torch.sqrt((1 - tau) ** 2 + tau**2)
            return (1 - tau) / norm, tau / norm
        return torch.ones_like(tau), tau / (1 - tau)

    def _edm_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM's c_in, c_skip, c_out."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return total.rsqrt(), sd2 / total, sigma * self.sigma_data * total.rsqrt()

    def network_input(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """What the network sees for state z (EDM scales it by c_in; the others pass it through)."""
        if self.prediction != "edm":
            return z
        c_in, _, _ = self._edm_scalings(self.coefficients(tau)[1])
        return per_sample(c_in, z) * z

    def target(self, x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The regression target of the network output."""
        a, b = (per_sample(c, x0) for c in self.coefficients(tau))
        if self.prediction == "velocity":
            return velocity_target(x0, eps)
        if self.prediction == "eps":
            return eps
        if self.prediction == "v":
            return a * eps - b * x0
        _, c_skip, c_out = (per_sample(s, x0) for s in self._edm_scalings(self.coefficients(tau)[1]))
        return (x0 - c_skip * z) / c_out

    def predictions(self, out: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from a network output at state z."""
        a, b = (per_sample(c, z) for c in self.coefficients(tau))
        if self.prediction == "velocity":
            return z - b * out, z + a * out
        if self.prediction == "eps":
            return (z - b * out) / a, out
        if self.prediction == "v":
            return a * z - b * out, b * z + a * out
        _, c_skip, c_out = (per_sample(s, z) for s in self._edm_scalings(self.coefficients(tau)[1]))
        x0 = c_skip * z + c_out * out
        return x0, (z - x0) / b

    def velocity(self, out: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The rectified-flow velocity eps_hat - x0_hat implied by a network output."""
        x0, eps = self.predictions(out, z, tau)
        return velocity_target(x0, eps)

    def state(self, z_rf: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """This formulation's state for a rectified-flow state (1 - tau) x0 + tau eps: z = (a + b) z_rf."""
        a, b = self.coefficients(tau)
        return per_sample(a + b, z_rf) * z_rf


_RF = re.compile(r"rf(?:/(.+))?")
_EDM = re.compile(r"edm\(([^,]+),([^)]+)\)")


def get_formulation(name: str, sigma_data: float = 0.5) -> Formulation:
    """Parse a formulation name: rf, rf/<density> (uniform, lognorm(m,s), mode(s), cosmap), eps/linear,
    v/linear, v/cos, edm(P_m,P_s), edm/rf, edm/cos."""
    key = name.replace(" ", "")
    fixed = {
        "eps/linear": ("vp", "eps", NoiseLevels("ldm")),
        "v/linear": ("vp", "v", NoiseLevels("ldm")),
        "v/cos": ("vp", "v", NoiseLevels("cos")),
        "edm/rf": ("ve", "edm", NoiseLevels("density")),
        "edm/cos": ("ve", "edm", NoiseLevels("cos")),
    }
    if key in fixed:
        path, prediction, noise = fixed[key]
        return Formulation(key, path, prediction, noise, sigma_data)
    if match := _RF.fullmatch(key):
        density = TimestepDensity.parse(match.group(1) or "uniform")
        return Formulation(key, "linear", "velocity", NoiseLevels("density", density), sigma_data)
    if match := _EDM.fullmatch(key):
        # log sigma ~ N(P_m, P_s^2) is tau = sigmoid(P_m + P_s n): a logit-normal density on tau.
        density = TimestepDensity("lognorm", float(match.group(1)), float(match.group(2)))
        return Formulation(key, "ve", "edm", NoiseLevels("density", density), sigma_data)
    raise ValueError(
        f"unknown formulation {name!r}; expected rf, rf/uniform, rf/lognorm(m,s), rf/mode(s), rf/cosmap, "
        "eps/linear, v/linear, v/cos, edm(P_m,P_s), edm/rf or edm/cos"
    )
