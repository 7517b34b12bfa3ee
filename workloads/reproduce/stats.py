"""The few statistics the verdicts need beyond GenEval's own (`pipelines.geneval.stats`): a rank correlation with a
permutation p-value, and whether two scores differ beyond their errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

EXACT_UP_TO = 8  # every permutation up to 8 items (40,320); a seeded random sample of them above


def ranks(values) -> np.ndarray:
    return pd.Series(np.asarray(values, dtype=float)).rank().to_numpy()


def spearman_test(x, y, samples: int = 20_000) -> tuple[float, float]:
    """(rho, p): Spearman's rank correlation of x and y, and the one-sided permutation p-value of a correlation at
    least this positive by chance (for a negative claim, test -x). NaN for fewer than 2 points or a constant."""
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan, math.nan
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if len(rx) <= EXACT_UP_TO:
        perms = np.array(list(itertools.permutations(ry)))
    else:
        rng = np.random.default_rng(0)
        perms = np.array([rng.permutation(ry) for _ in range(samples)])
    centred = (perms - ry.mean()) @ (rx - rx.mean()) / (len(rx) * rx.std() * ry.std())
    return rho, float((centred >= rho - 1e-12).mean())


def differs(a: float, b: float, se_a: float, se_b: float, z: float = 2.0) -> int:
    """+1 when b exceeds a by more than z standard errors of the difference, -1 when it falls below, else 0."""
    margin = z * math.hypot(se_a, se_b)
    return 1 if b - a > margin else -1 if a - b > margin else 0
