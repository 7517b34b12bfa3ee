"""The transfer study's analysis (`python -m workloads.sweep study=transfer`): for each parametrization (SP, muP) and
width, the learning rate with the lowest final EMA validation loss, and how far that optimum moves across widths.

The optimum on a grid of learning rates is refined by a parabola through the best grid point and its two neighbours
in log2(lr) (an optimum at the grid's edge stays there and is flagged: the grid does not bracket it). Its drift is
log2(largest optimum / smallest optimum) over the widths: octaves, 0 when the optimum transfers exactly. The claim
(muP's, and the muP diffusion-transformer paper's for MM-DiT): under muP the optimum moves less than under SP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from conf.sweep import SweepConf
from workloads.plots import pyplot


@dataclass(frozen=True)
class Optimum:
    lr: float  # the refined optimum
    grid_lr: float  # the grid point with the lowest loss
    loss: float  # that point's loss
    interior: bool  # False: the best grid point is the smallest or largest learning rate tried


def optimum(lrs: list[float], losses: list[float]) -> Optimum:
    """The learning rate of least loss; a diverged trial (NaN or infinite loss) counts as the worst."""
    order = np.argsort(lrs)
    grid = np.asarray(lrs, dtype=float)[order]
    x = np.log2(grid)
    y = np.asarray(losses, dtype=float)[order]
    y = np.where(np.isfinite(y), y, np.inf)
    i = int(np.argmin(y))
    best = Optimum(float(grid[i]), float(grid[i]), float(y[i]), 0 < i < len(x) - 1)
    if not best.interior or not np.isfinite(y[i - 1 : i + 2]).all():
        return best
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    if a <= 0:  # three collinear or concave points: no minimum between them
        return best
    vertex = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return Optimum(float(2**vertex), best.grid_lr, best.loss, True)


def optima(results: pd.DataFrame, widths: dict[int, int]) -> pd.DataFrame:
    """One row per (parametrization, depth): the width (`widths` by depth), its optimum, and the loss there."""
    rows = []
    for (kind, depth), trials in results.groupby(["parametrization", "depth"]):
        best = optimum(trials["lr"].tolist(), trials["val_loss"].tolist())
        rows.append({"parametrization": kind, "depth": int(depth), "width": widths[int(depth)], "best_grid_lr":
                     best.grid_lr, "optimum_lr": best.lr, "interior": best.interior, "val_loss": best.loss})
    return pd.DataFrame(rows).sort_values(["parametrization", "depth"]).reset_index(drop=True)


def drift(table: pd.DataFrame, kind: str) -> float:
    """Octaves between the largest and the smallest optimum of one parametrization over its widths."""
    lrs = table.loc[table["parametrization"] == kind, "optimum_lr"]
    return float(math.log2(lrs.max() / lrs.min())) if len(lrs) else math.nan


def verdict(table: pd.DataFrame) -> tuple[str, str]:
    """(status, reason): `reproduced` when muP's optimum drifts less than SP's over the same widths, `not
    reproduced` when it does not, `inconclusive` when an optimum sits at the grid's edge or a side is missing."""
    kinds = set(table["parametrization"])
    if kinds != {"sp", "mup"} or table.groupby("parametrization")["width"].nunique().min() < 2:
        return "inconclusive", "needs SP and muP each at two widths or more"
    edge = table.loc[~table["interior"]]
    if len(edge):
        where = ", ".join(f"{r.parametrization} width {r.width}" for r in edge.itertuples())
        return "inconclusive", f"the best learning rate is at the grid's edge for {where}: widen `lrs`"
    sp, mup = drift(table, "sp"), drift(table, "mup")
    said = f"muP's optimum moves {mup:.2f} octaves across widths, SP's {sp:.2f}"
    return ("reproduced", said) if mup < sp else ("not reproduced", said)


def widths(cfg: SweepConf, depths) -> dict[int, int]:
    """Each depth's hidden width, by the trials' own rule (`ModelConf.with_depth`)."""
    return {int(d): cfg.train.model.with_depth(int(d)).build().hidden_size for d in depths}


def analyze(cfg: SweepConf, results: pd.DataFrame):
    """The optima table, the drifts, the verdict and `transfer.png` (loss against learning rate per width)."""
    from workloads.sweep.studies import Analysis, _png, markdown_table

    width = widths(cfg, results["depth"].unique())
    table = optima(results, width)
    status, reason = verdict(table)
    lines = [markdown_table(table), ""]
    lines += [f"- {kind}: the optimum moves {drift(table, kind):.2f} octaves (x{2 ** drift(table, kind):.2f}) across "
              f"widths {sorted(table.loc[table['parametrization'] == kind, 'width'])}"
              for kind in sorted(set(table["parametrization"]))]
    lines += ["", f"**Verdict: {status}** ({reason}). The claim: under muP the best learning rate found at one width "
              "holds at the others; under SP it moves."]
    kinds = sorted(set(results["parametrization"]))
    fig, axes = pyplot().subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for depth, trials in results[results["parametrization"] == kind].groupby("depth"):
            trials = trials.sort_values("lr")
            ax.plot(trials["lr"], trials["val_loss"], "o-", label=f"width {width[int(depth)]}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final EMA validation loss (equal steps)")
    return Analysis(table, "\n".join(lines), {"transfer.png": _png(fig)})
