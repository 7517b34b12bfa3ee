"""The transfer study: its trials (every parametrization x depth x learning rate, each a distinct run), the optimum
refined between grid points, the drift across widths and the verdict of each kind, and its config checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conf.sweep import register
from workloads.runtime import compose, one_line
from workloads.sweep import driver, studies, transfer

LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


@pytest.fixture(scope="module")
def cfg():
    register()
    return compose("sweep", ["study=transfer", "data=/data", "depths=[1,2,4]"])


def test_every_parametrization_depth_and_lr_is_one_distinct_run(cfg):
    params = studies.trial_params(cfg)
    assert len(params) == 2 * 3 * len(LRS)
    confs = [driver.trial_train_conf(cfg, p) for p in params]
    assert len({c.run.name for c in confs}) == len(confs)
    for p, c in zip(params, confs, strict=True):
        assert c.optim.lr == p["lr"] and c.model.parametrization == p["parametrization"]
        assert c.model.depth == p["depth"] and c.model.build().hidden_size == 64 * p["depth"]
        assert ("-mup-" in c.run.name) == (p["parametrization"] == "mup")


def bowl(centre: float, lrs=LRS, floor: float = 0.5) -> list[float]:
    return [floor + (math.log2(lr) - math.log2(centre)) ** 2 / 10 for lr in lrs]


def test_the_optimum_is_refined_between_grid_points():
    best = transfer.optimum(LRS, bowl(2e-3))
    assert best.interior and best.grid_lr == 3e-3
    assert best.lr == pytest.approx(2e-3, rel=1e-6)  # a parabola in log2(lr) is recovered exactly


def test_an_optimum_at_the_edge_is_flagged_and_a_diverged_trial_is_the_worst():
    edge = transfer.optimum(LRS, [1.0, 0.9, 0.8, 0.7, 0.6])
    assert not edge.interior and edge.lr == 3e-2
    diverged = transfer.optimum(LRS, [0.9, 0.8, 0.7, float("nan"), float("inf")])
    assert diverged.grid_lr == 3e-3 and diverged.interior  # 3e-3 has a grid point on each side
    assert diverged.lr == 3e-3  # no parabola through a diverged neighbour


def results(centres: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for kind, per_depth in centres.items():
        for depth, centre in zip((1, 2, 4), per_depth, strict=True):
            rows += [{"parametrization": kind, "depth": depth, "lr": lr, "val_loss": loss}
                     for lr, loss in zip(LRS, bowl(centre), strict=True)]
    return pd.DataFrame(rows)


WIDTHS = {1: 64, 2: 128, 4: 256}


@pytest.mark.parametrize(("sp", "mup", "status"), [
    ([8e-3, 4e-3, 1e-3], [2e-3, 2e-3, 2.2e-3], "reproduced"),  # SP's optimum falls with width, muP's stays
    ([2e-3, 2e-3, 2.2e-3], [8e-3, 4e-3, 1e-3], "not reproduced"),
    ([8e-3, 4e-3, 1e-3], [2e-3, 2e-3, 5e-2], "inconclusive"),  # an optimum past the grid
])
def test_the_verdict_compares_the_drifts(sp, mup, status):
    table = transfer.optima(results({"sp": sp, "mup": mup}), WIDTHS)
    assert transfer.verdict(table)[0] == status
    if status != "inconclusive":
        assert transfer.drift(table, "sp" if status == "reproduced" else "mup") == pytest.approx(3.0, abs=1e-6)


def test_one_parametrization_alone_is_inconclusive():
    table = transfer.optima(results({"sp": [8e-3, 4e-3, 1e-3]}), WIDTHS)
    assert transfer.verdict(table) == ("inconclusive", "needs SP and muP each at two widths or more")


def test_the_report_has_the_table_the_drifts_the_verdict_and_the_plot(cfg):
    analysis = studies.analyze(cfg, results({"sp": [8e-3, 4e-3, 1e-3], "mup": [2e-3, 2e-3, 2.2e-3]}))
    assert "**Verdict: reproduced**" in analysis.markdown and "octaves" in analysis.markdown
    assert list(analysis.table["width"]) == [64, 128, 256] * 2
    assert analysis.plots["transfer.png"][:4] == b"\x89PNG"
    assert np.allclose(analysis.table.loc[analysis.table["parametrization"] == "mup", "optimum_lr"],
                       [2e-3, 2e-3, 2.2e-3], rtol=1e-6)


@pytest.mark.parametrize(("overrides", "named"), [
    (["lrs=[1e-3,2e-3]"], "at least three distinct lrs"),
    (["depths=[2]"], "at least two depths"),
    (["parametrizations=[sp,xp]"], "sweep.parametrizations must be distinct values of ['sp', 'mup']"),
    (["lrs=[1e-3,-1,2e-3]"], "sweep.lrs must all be > 0"),
])
def test_a_transfer_study_that_cannot_decide_is_refused_at_compose_time(overrides, named):
    register()
    with pytest.raises(Exception) as error:
        compose("sweep", ["study=transfer", "data=/data", *overrides])
    assert named in one_line(error.value)
