"""Power-law fits recover known exponents from synthetic data."""

import numpy as np
import pytest

from workloads.sweep.scaling import fit_power_law


def test_recovers_a_pure_power_law():
    compute = np.logspace(15, 20, 6)
    fit = fit_power_law(compute, 3.0 * compute**-0.05)
    assert fit.b == pytest.approx(0.05, rel=1e-6) and fit.a == pytest.approx(3.0, rel=1e-4)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(1e21) == pytest.approx(3.0 * 1e21**-0.05)


def test_recovers_the_exponent_with_noise():
    rng = np.random.default_rng(0)
    params = np.array([0.4e9, 0.8e9, 1.3e9, 2.0e9, 4.0e9, 8.0e9])
    loss = 12.0 * params**-0.12 * np.exp(rng.normal(0, 0.002, len(params)))
    fit = fit_power_law(params, loss)
    assert fit.b == pytest.approx(0.12, abs=0.005) and fit.r2 > 0.99


def test_recovers_an_irreducible_term():
    compute = np.logspace(10, 16, 8)
    loss = 0.3 + 40.0 * compute**-0.2
    fit = fit_power_law(compute, loss, offset=True)
    assert fit.l_inf == pytest.approx(0.3, rel=1e-3)
    assert fit.b == pytest.approx(0.2, rel=1e-2)
    assert "0.3 +" in fit.formula()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2], [1, -1])
    with pytest.raises(ValueError, match="3\\+ points"):
        fit_power_law([1, 2], [2, 1], offset=True)
