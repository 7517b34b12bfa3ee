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


def test_formulations_are_also_ranked_by_geneval():
    geneval = {"v/cos": 0.5, "rf/mode(9.99)": 0.2, "edm(-1.20,1.20)": 0.1, "eps/linear": 0.3,
               "rf/cosmap": 0.4, "rf/lognorm(0.00,1.00)": 0.6}
    results = pd.DataFrame({"run": [f"trial-{i}" for i in range(6)], "depth": 1, "formulation": list(VAL_LOSS),
                            "val_loss": list(VAL_LOSS.values()), "geneval": [geneval[f] for f in VAL_LOSS]})
    analysis = analyze(SweepConf(study="formulation", data="unused"), results)
    by_name = analysis.table.set_index("formulation")
    assert by_name.loc["rf/lognorm(0.00,1.00)", "geneval_rank"] == 1 and by_name.loc["edm(-1.20,1.20)",
                                                                                       "geneval_rank"] == 6
    # GenEval ranks of the five the paper ranks: lognorm 1, v/cos 2, cosmap 3, eps 4, edm 5; the paper's lognorm 1,
    # eps 2, cosmap 3, v/cos 4, edm 5: differences 0, 2, 0, -2, 0, rho = 1 - 6 * 8 / (5 * 24) = 0.6
    assert "ranked by GenEval-shapes: Spearman correlation with the paper's global ranking (Table 1) over 5 " \
           "formulations: 0.600" in analysis.markdown
    assert "ranked by validation loss: Spearman correlation" in analysis.markdown


def test_depth_study_correlates_validation_loss_with_geneval():
    results = pd.DataFrame({"run": ["a", "b", "c"], "depth": [1, 2, 3], "params": [1e4, 3e4, 9e4],
                            "flops_per_sample": [1e6, 3e6, 9e6], "train_flops": [1e9, 3e9, 9e9],
                            "val_loss": [0.50, 0.40, 0.45], "geneval": [0.1, 0.3, 0.2], "samples_per_s": 10.0})
    analysis = analyze(SweepConf(study="depth", data="unused", depths=[1, 2, 3]), results)
    assert "geneval" in analysis.table.columns
    # losses 0.5, 0.4, 0.45 against scores 0.1, 0.3, 0.2: exactly linear, slope -2, so Pearson and Spearman are -1
    assert "over 3 depths: Pearson -1.000, Spearman -1.000" in analysis.markdown
    older = analyze(SweepConf(study="depth", data="unused", depths=[1, 2, 3]), results.drop(columns="geneval"))
    assert "geneval" not in older.table.columns and "GenEval" not in older.markdown


def test_shift_study_reports_geneval_beside_the_latent_metric():
    results = pd.DataFrame({"run": ["a", "b"], "train_shift": [1.0, 3.0],
                            "lfd@shift=1": [2.0, 3.0], "lfd@shift=3": [1.0, 4.0],
                            "geneval@shift=1": [0.2, 0.5], "geneval@shift=3": [0.4, 0.1]})
    analysis = analyze(SweepConf(study="shift", data="unused"), results)
    assert list(analysis.table.columns) == ["sampling_shift", "LFD, trained at shift 1", "LFD, trained at shift 3",
                                            "GenEval, trained at shift 1", "GenEval, trained at shift 3"]
    assert "best sampling shift for 'GenEval, trained at shift 1': 3" in analysis.markdown
    assert "best sampling shift for 'GenEval, trained at shift 3': 1" in analysis.markdown
    assert "best sampling shift for 'LFD, trained at shift 3': 1" in analysis.markdown
