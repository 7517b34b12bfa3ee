"""Rectified-flow math: the forward process, its velocity target, training timestep densities, the shift.

Convention: t = 0 is data, t = 1 is noise; z_t = (1 - t) * x0 + t * eps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

MODE_SCALE_MAX = 2 / (math.pi - 2)  # above this the mode density's map u -> t is no longer monotone


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x0 + t eps, with t of shape (B,) broadcast over the sample dims."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """dz_t/dt = eps - x0, what the network regresses."""
    return eps - x0


def shift_timesteps(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Resolution-dependent shift t_m = alpha t / (1 + (alpha - 1) t); equivalently it scales the
    noise-to-signal ratio t / (1 - t) by alpha. The paper derives alpha = sqrt(m / n) for m target and n base
    pixels, then picks it by preference (3.0 at 1024^2), so configs state alpha itself."""
    if alpha <= 0:
        raise ValueError(f"shift alpha must be positive, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


@dataclass(frozen=True)
class TimestepDensity:
    """A training timestep density on (0, 1): `uniform`, `lognorm(m, s)`, `mode(s)` or `cosmap`."""

    kind: str = "lognorm"
    loc: float = 0.0  # lognorm m
    scale: float = 1.0  # lognorm s, or the mode density's s

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "lognorm", "mode", "cosmap"):
            raise ValueError(f"timestep density kind must be uniform, lognorm, mode or cosmap, got {self.kind!r}")
        if not (math.isfinite(self.loc) and math.isfinite(self.scale)):
            raise ValueError(f"timestep density {self.kind} parameters must be finite, got {self.loc}, {self.scale}")
        if self.kind == "lognorm" and self.scale <= 0:
            raise ValueError(f"lognorm scale s must be positive, got {self.scale}")
        if self.kind == "mode" and not -1 <= self.scale <= MODE_SCALE_MAX:
            raise ValueError(f"mode scale s must be in [-1, {MODE_SCALE_MAX:.4f}] to stay monotone, got {self.scale}")

    @classmethod
    def parse(cls, spec: str) -> TimestepDensity:
        """'uniform', 'lognorm(0.00,1.00)', 'mode(1.29)' or 'cosmap'."""
        match = re.fullmatch(r"\s*(\w+)\s*(?:\(([^)]*)\))?\s*", spec)
        if not match:
            raise ValueError(f"cannot parse timestep density {spec!r}")
        kind = match.group(1)
        try:
            args = [float(a) for a in (match.group(2) or "").split(",") if a.strip()]
        except ValueError:
            raise ValueError(f"timestep density {spec!r}: parameters must be numbers") from None
        arity = {"uniform": 0, "cosmap": 0, "mode": 1, "lognorm": 2}
        if kind not in arity or len(args) != arity[kind]:
            raise ValueError(f"timestep density {spec!r}: expected one of uniform, lognorm(m,s), mode(s), cosmap")
        if kind == "lognorm":
            return cls(kind, loc=args[0], scale=args[1])
        if kind == "mode":
            return cls(kind, scale=args[0])
        return cls(kind)

    def __str__(self) -> str:
        if self.kind == "lognorm":
            return f"lognorm({self.loc:.2f},{self.scale:.2f})"
        if self.kind == "mode":
            return f"mode({self.scale:.2f})"
        return self.kind

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map u ~ U(0, 1) (or normal draws for lognorm, see `sample`) through the density's transform."""
        if self.kind == "mode":
            return 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        if self.kind == "cosmap":
            return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
        return u

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """n timesteps in [0, 1], float32."""
        if self.kind == "lognorm":
            normal = torch.randn(n, generator=generator, device=device)
            return torch.sigmoid(self.loc + self.scale * normal)
        u = torch.rand(n, generator=generator, device=device)
        return self.from_uniform(u).clamp(0.0, 1.0)


def sample_timesteps(density: str | TimestepDensity, n: int, generator: torch.Generator | None = None,
                     shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """n training timesteps from a density (name or object), then the resolution shift."""
    density = TimestepDensity.parse(density) if isinstance(density, str) else density
    return shift_timesteps(density.sample(n, generator, device), shift)


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank and dtype."""
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
