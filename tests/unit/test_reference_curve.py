"""The shipped reference model's curve, drawn from its card's rows."""

from __future__ import annotations

from workloads.plots import plot_score_curve


def test_the_curve_draws_the_score_and_credits_beside_their_chance(tmp_path):
    rows = [{"train_flops": 1e13 * i, "geneval": 0.1 * i, "chance_geneval": 0.08, "credit_count": 0.3 + 0.05 * i,
             "chance_count": 0.3, "credit_colors": 0.2 * i, "chance_colors": 0.2, "credit_shapes": 0.4,
             "chance_shapes": 0.3} for i in (1, 2, 3)]
    rows[1].pop("chance_colors")  # a missing value leaves a gap, not an error
    plot_score_curve(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
