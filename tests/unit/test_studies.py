"""The sweep's formulation analysis on made-up trial rows: the ranking by validation loss and the Spearman
correlation with the paper's global ranking, against values computed by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from conf.sweep import SweepConf
from model.formulations import PAPER_GLOBAL_RANK
from workloads.sweep.studies import analyze

# formulation -> made-up final validation loss; "rf/mode(9.99)" is not in the paper's table
VAL_LOSS = {"v/cos": 0.32, "rf/mode(9.99)": 0.29, "edm(-1.20,1.20)": 0.40, "eps/linear": 0.30,
            "rf/cosmap": 0.33, "rf/lognorm(0.00,1.00)": 0.31}


def formulation_study(val_loss: dict[str, float]):
    results = pd.DataFrame({"run": [f"trial-{i}" for i in range(len(val_loss))], "depth": 1,
                            "formulation": list(val_loss), "val_loss": list(val_loss.values())})
    return analyze(SweepConf(study="formulation", data="unused"), results)


def test_formulations_are_ranked_by_validation_loss_next_to_the_paper():
    analysis = formulation_study(VAL_LOSS)
    order = ["rf/mode(9.99)", "eps/linear", "rf/lognorm(0.00,1.00)", "v/cos", "rf/cosmap", "edm(-1.20,1.20)"]
    assert analysis.table["formulation"].tolist() == order
    assert analysis.table["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert analysis.table["val_loss"].tolist() == [VAL_LOSS[f] for f in order]
    assert analysis.table["paper_global_rank"].tolist()[1:] == [PAPER_GLOBAL_RANK[f] for f in order[1:]]
    assert pd.isna(analysis.table["paper_global_rank"].iloc[0])
    assert analysis.markdown.splitlines()[2].startswith("| 1 | rf/mode(9.99) | 0.29 |")
    assert set(analysis.plots) == {"formulations.png"}


def test_spearman_correlation_matches_the_hand_computed_value():
    # Among the five formulations the paper ranks: ours eps 1, lognorm 2, v/cos 3, cosmap 4, edm 5; the paper's
    # lognorm 1 (1.54), eps 2 (2.88), cosmap 3 (4.13), v/cos 4 (9.17), edm 5 (15.58). Rank differences -1, 1, -1, 1, 0:
    # rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8.
    analysis = formulation_study(VAL_LOSS)
    assert "Spearman correlation with the paper's global ranking (Table 1) over 5 formulations: 0.800" in (
        analysis.markdown)


@pytest.mark.parametrize(("val_loss", "rho"), [
    ({"rf/lognorm(0.00,1.00)": 0.1, "eps/linear": 0.2, "v/cos": 0.3}, "1.000"),  # the paper's order
    ({"rf/lognorm(0.00,1.00)": 0.3, "eps/linear": 0.2, "v/cos": 0.1}, "-1.000"),  # reversed
    ({"rf/lognorm(0.00,1.00)": 0.2, "eps/linear": 0.1, "v/cos": 0.3}, "0.500"),  # 1 - 6 * 2 / (3 * 8)
])
def test_spearman_correlation_follows_the_order(val_loss, rho):
    assert f"over 3 formulations: {rho}" in formulation_study(val_loss).markdown


def test_no_correlation_with_fewer_than_two_ranked_formulations():
    analysis = formulation_study({"eps/linear": 0.2, "rf/mode(9.99)": 0.1})
    assert "Spearman" not in analysis.markdown
    assert analysis.table["formulation"].tolist() == ["rf/mode(9.99)", "eps/linear"]
