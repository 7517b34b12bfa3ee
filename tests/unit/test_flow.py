"""Rectified-flow math: the forward process, the timestep shift and the training timestep densities."""

from __future__ import annotations

import math

import pytest
import torch

from model.flow import (
    MODE_SCALE_MAX,
    TimestepDensity,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)

N = 200_000
SPECS = ["uniform", "lognorm(0.00,1.00)", "lognorm(-0.50,0.60)", "mode(1.29)", "mode(-1.00)", "cosmap"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draws(spec: str, n: int = N, seed: int = 0) -> torch.Tensor:
    return TimestepDensity.parse(spec).sample(n, _gen(seed)).double()


def _mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    """The paper's f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def _empirical_cdf(samples: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(samples.sort().values, at, right=True).double() / samples.numel()


# --- forward process -----------------------------------------------------------------------------------------


def test_interpolate_endpoints_and_midpoint():
    gen = _gen()
    x0, eps = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    t = torch.tensor([0.0, 1.0, 0.25])
    z = interpolate(x0, eps, t)
    assert z.shape == x0.shape
    torch.testing.assert_close(z[0], x0[0])  # t = 0 is data
    torch.testing.assert_close(z[1], eps[1])  # t = 1 is noise
    torch.testing.assert_close(z[2], 0.75 * x0[2] + 0.25 * eps[2])


def test_interpolate_is_per_sample_and_keeps_dtype():
    x0, eps = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    z = interpolate(x0, eps, torch.tensor([0.1, 0.9]))
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, torch.tensor([[0.1] * 3, [0.9] * 3], dtype=torch.float64))


def test_velocity_target_is_the_time_derivative_of_the_path():
    gen = _gen(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    t, dt = torch.tensor([0.3, 0.6]), 1e-3
    finite_difference = (interpolate(x0, eps, t + dt) - interpolate(x0, eps, t)) / dt
    torch.testing.assert_close(finite_difference, v, atol=1e-3, rtol=1e-3)


# --- shift ---------------------------------------------------------------------------------------------------


def test_shift_alpha_one_is_identity():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 3.0, 4.0])
def test_shift_fixes_endpoints_and_is_monotone(alpha: float):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = shift_timesteps(t, alpha)
    assert shifted[0].item() == 0.0
    assert shifted[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert (shifted.diff() > 0).all()
    # alpha > 1 moves every interior point towards noise, alpha < 1 towards data.
    interior = slice(1, -1)
    assert ((shifted[interior] > t[interior]) if alpha > 1 else (shifted[interior] < t[interior])).all()


@pytest.mark.parametrize("alpha", [0.5, 3.0, 4.0])
def test_shift_scales_noise_to_signal_ratio(alpha: float):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    shifted = shift_timesteps(t, alpha)
    torch.testing.assert_close(shifted / (1 - shifted), alpha * t / (1 - t))


def test_shift_value_and_invalid_alpha():
    assert shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="alpha"):
        shift_timesteps(torch.tensor(0.5), 0.0)


# --- densities: parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["uniform", "lognorm(0.00,1.00)", "lognorm(1.00,0.60)", "mode(1.29)", "cosmap"])
def test_density_parse_str_round_trip(spec: str):
    density = TimestepDensity.parse(spec)
    assert str(density) == spec
    assert TimestepDensity.parse(str(density)) == density


def test_density_parse_fields_and_whitespace():
    assert TimestepDensity.parse(" lognorm( 0.5 , 0.6 ) ") == TimestepDensity("lognorm", 0.5, 0.6)
    assert TimestepDensity.parse("mode(1.29)") == TimestepDensity("mode", scale=1.29)
    assert TimestepDensity.parse("cosmap").kind == "cosmap"
    assert TimestepDensity.parse("mode(1.75)").scale == 1.75  # the paper's steepest setting is still monotone


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gaussian", "expected one of"),
        ("lognorm(0.0)", "expected one of"),  # wrong arity
        ("mode", "expected one of"),
        ("uniform(1.0)", "expected one of"),
        ("lognorm(0,1", "cannot parse"),
        ("lognorm(0.0,0.0)", "lognorm scale"),
        ("lognorm(0.0,-1.0)", "lognorm scale"),
        ("mode(1.80)", "mode scale"),
        ("mode(-1.01)", "mode scale"),
    ],
)
def test_density_invalid_specs_raise(spec: str, message: str):
    with pytest.raises(ValueError, match=message):
        TimestepDensity.parse(spec)


def test_density_constructor_validates_kind():
    with pytest.raises(ValueError, match="kind"):
        TimestepDensity("beta")


def test_mode_scale_max_is_where_the_map_stops_being_monotone():
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    at_max = TimestepDensity("mode", scale=MODE_SCALE_MAX).from_uniform(u)
    assert (at_max.diff() <= 1e-12).all()
    beyond = _mode_map(u, MODE_SCALE_MAX + 0.05)  # a scale the constructor rejects
    assert (beyond.diff() > 0).any()


# --- densities: sample statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_samples_lie_in_unit_interval_and_are_float32(spec: str):
    draws = TimestepDensity.parse(spec).sample(N, _gen(3))
    assert draws.shape == (N,)
    assert draws.dtype == torch.float32
    assert draws.min() >= 0.0 and draws.max() <= 1.0


@pytest.mark.parametrize("spec", SPECS)
def test_samples_are_deterministic_for_a_seed(spec: str):
    assert torch.equal(_draws(spec, 1000, seed=7), _draws(spec, 1000, seed=7))
    assert not torch.equal(_draws(spec, 1000, seed=7), _draws(spec, 1000, seed=8))


def test_lognorm_samples_are_sigmoid_of_normal_draws():
    density = TimestepDensity.parse("lognorm(0.50,0.60)")
    expected = torch.sigmoid(0.5 + 0.6 * torch.randn(1000, generator=_gen(11)))
    torch.testing.assert_close(density.sample(1000, _gen(11)), expected)


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 1.0), (1.0, 0.6)])
def test_lognorm_quantiles_match_logit_normal(loc: float, scale: float):
    draws = _draws(f"lognorm({loc:.2f},{scale:.2f})")
    probs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    analytic = torch.sigmoid(loc + scale * torch.special.ndtri(probs))
    torch.testing.assert_close(torch.quantile(draws, probs), analytic, atol=5e-3, rtol=0)
    if loc == 0.0:
        assert draws.median().item() == pytest.approx(0.5, abs=3e-3)


def test_mode_zero_is_uniform():
    draws = _draws("mode(0.00)")
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    assert (_empirical_cdf(draws, grid) - grid).abs().max() < 0.01


@pytest.mark.parametrize("scale", [1.29, -0.5])
def test_mode_cdf_follows_its_decreasing_map(scale: float):
    # t = f(u) is decreasing in u, so P(T <= f(u)) = 1 - u.
    u = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    f_u = _mode_map(u, scale)
    gap = _empirical_cdf(_draws(f"mode({scale:.2f})"), f_u) - (1 - u)
    assert gap.abs().max() < 0.01


def test_mode_1_29_concentrates_mass_near_one_half():
    draws, uniform = _draws("mode(1.29)"), _draws("uniform", seed=1)
    def near_half(x: torch.Tensor) -> float:
        return ((x - 0.5).abs() < 0.1).double().mean().item()
    assert near_half(uniform) == pytest.approx(0.2, abs=0.01)
    assert near_half(draws) > 0.35
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)  # the mode density is symmetric about 1/2


def test_cosmap_is_symmetric_about_one_half():
    draws = _draws("cosmap")
    assert draws.mean().item() == pytest.approx(0.5, abs=5e-3)
    probs = torch.tensor([0.05, 0.1, 0.25, 0.4], dtype=torch.float64)
    low, high = torch.quantile(draws, probs), torch.quantile(draws, 1 - probs)
    torch.testing.assert_close(low, 1 - high, atol=5e-3, rtol=0)
    # t = f(u) is increasing, so P(T <= f(u)) = u; and cosmap is not uniform.
    u = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    f_u = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    cdf = _empirical_cdf(draws, f_u)
    assert (cdf - u).abs().max() < 0.01
    assert (_empirical_cdf(draws, u) - u).abs().max() > 0.03  # close to uniform, but measurably not uniform


def test_sample_timesteps_applies_shift():
    unshifted = sample_timesteps("lognorm(0.00,1.00)", 1000, _gen(5))
    shifted = sample_timesteps("lognorm(0.00,1.00)", 1000, _gen(5), shift=3.0)
    torch.testing.assert_close(shifted, shift_timesteps(unshifted, 3.0))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.03)  # shifted median of a median-1/2 density
    by_object = sample_timesteps(TimestepDensity("lognorm"), 1000, _gen(5), shift=3.0)
    torch.testing.assert_close(by_object, shifted)


@pytest.mark.parametrize("spec", ["lognorm(a,1)", "lognorm(0,nan)", "lognorm(nan,1)", "mode(inf)"])
def test_density_rejects_non_numeric_or_non_finite_parameters(spec):
    with pytest.raises(ValueError, match=r"timestep density"):
        TimestepDensity.parse(spec)
