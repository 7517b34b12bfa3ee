"""Power laws for the depth scaling study: `L = a * C^(-b)` or, with an irreducible term, `L = L_inf + a * C^(-b)`,
fitted with numpy alone (least squares in log-log space; `L_inf` by a refined one-dimensional search)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float  # the exponent: L falls as C^(-b)
    l_inf: float  # 0 without the irreducible term
    r2: float  # coefficient of determination of log(L - l_inf) against log(C)
    points: int

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.l_inf + self.a * np.power(x, -self.b)

    def formula(self, variable: str = "C") -> str:
        offset = f"{self.l_inf:.4g} + " if self.l_inf else ""
        return f"L = {offset}{self.a:.4g} * {variable}^(-{self.b:.4f})"


def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, r2) of log y = log a - b log x."""
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (intercept + slope * lx)
    total = ly - ly.mean()
    r2 = 1.0 - float(residual @ residual) / float(total @ total) if float(total @ total) > 0 else 1.0
    return float(np.exp(intercept)), float(-slope), r2


def fit_power_law(x, y, offset: bool = False) -> PowerLaw:
    """Fit `y = [L_inf +] a * x^(-b)` to positive data; `offset=True` needs at least 3 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    if len(x) < (3 if offset else 2) or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"a power-law fit needs {'3' if offset else '2'}+ points with positive x and y, got "
                         f"{len(x)} points")
    if not offset:
        a, b, r2 = _loglog(x, y)
        return PowerLaw(a, b, 0.0, r2, len(x))
    best = (-np.inf, 0.0)
    low, high = 0.0, float(y.min()) * (1 - 1e-9)
    for _ in range(4):  # coarse-to-fine search of L_inf in [0, min(y))
        for l_inf in np.linspace(low, high, 101)[:-1]:
            r2 = _loglog(x, y - l_inf)[2]
            if r2 > best[0]:
                best = (r2, float(l_inf))
        step = (high - low) / 100
        low, high = max(0.0, best[1] - step), min(float(y.min()) * (1 - 1e-9), best[1] + step)
    a, b, r2 = _loglog(x, y - best[1])
    return PowerLaw(a, b, best[1], r2, len(x))
