"""The paper's training formulations: paths, targets, conversions to the rectified-flow velocity, noise levels."""

from __future__ import annotations

import math

import pytest
import torch

from model.flow import interpolate, shift_timesteps
from model.formulations import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    PAPER_GLOBAL_RANK,
    Formulation,
    canonical_name,
    get_formulation,
    paper_global_rank,
)
from model.objective import loss_at

NAMES = ["rf", "rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/linear", "v/cos",
         "edm(0.00,0.60)", "edm/rf", "edm/cos"]
SHAPE = (5, 4, 3, 3)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)


def _taus_inside(form: Formulation) -> torch.Tensor:
    """One noise level per sample, spread over the formulation's range, edges included."""
    lo, hi = form.tau_range
    return lo + (hi - lo) * torch.tensor([0.0, 0.02, 0.5, 0.98, 1.0])


def _ldm_tau_by_hand() -> torch.Tensor:
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    sigma = torch.sqrt((1 - alpha_bar) / alpha_bar)
    return sigma / (1 + sigma)


def _no_context(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, 2, 8), torch.zeros(batch, 8)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_the_formulation_path(name: str):
    form = get_formulation(name)
    x0, eps = _batch()
    tau = _taus_inside(form)
    a, b = form.coefficients(tau)
    z = form.state(interpolate(x0, eps, tau), tau)
    expected = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(z, expected, atol=1e-4, rtol=1e-5)
    # All paths share tau's noise-to-signal ratio sigma = b / a = tau / (1 - tau).
    torch.testing.assert_close(b / a, tau / (1 - tau), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_oracle_network_has_zero_loss_and_implies_the_true_velocity(name: str):
    form = get_formulation(name)
    x0, eps = _batch(1)
    tau = _taus_inside(form)
    z = form.state(interpolate(x0, eps, tau), tau)
    target = form.target(x0, eps, z, tau)

    def oracle(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        torch.testing.assert_close(x, form.network_input(z, tau))
        torch.testing.assert_close(t, tau)
        return target

    loss = loss_at(oracle, form, x0, eps, tau, *_no_context(SHAPE[0]))
    assert loss.shape == (SHAPE[0],)
    assert torch.equal(loss, torch.zeros(SHAPE[0]))
    x0_hat, eps_hat = form.predictions(target, z, tau)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(form.velocity(target, z, tau), eps - x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_mse_to_the_target(name: str):
    form = get_formulation(name)
    x0, eps = _batch(2)
    tau = _taus_inside(form)[1:4]
    x0, eps = x0[:3], eps[:3]
    z = form.state(interpolate(x0, eps, tau), tau)
    target = form.target(x0, eps, z, tau)
    loss = loss_at(lambda x, t, c, p: target + 0.1, form, x0, eps, tau, *_no_context(3))
    torch.testing.assert_close(loss, torch.full((3,), 0.01))


@pytest.mark.parametrize("name", NAMES)
def test_sample_tau_in_range_and_deterministic(name: str):
    form = get_formulation(name)
    lo, hi = form.tau_range
    tau = form.sample_tau(4096, _gen(3))
    assert tau.shape == (4096,)
    assert tau.min() >= lo and tau.max() <= hi
    assert tau.std() > 0.05  # actually spread over the range
    assert torch.equal(tau, form.sample_tau(4096, _gen(3)))
    assert not torch.equal(tau, form.sample_tau(4096, _gen(4)))
    shifted = form.sample_tau(4096, _gen(3), shift=3.0)
    assert shifted.min() >= lo and shifted.max() <= hi
    assert shifted.mean() > tau.mean()  # the shift moves noise levels towards noise


def test_sample_tau_shift_scales_sigma_before_clamping():
    form = get_formulation("rf/lognorm(0.00,1.00)")
    torch.testing.assert_close(form.sample_tau(512, _gen(5), shift=3.0),
                               shift_timesteps(form.sample_tau(512, _gen(5)), 3.0))


def test_paper_rank_table_is_table_1():
    best_first = ["rf/lognorm(0.00,1.00)", "rf/lognorm(1.00,0.60)", "rf/lognorm(0.50,0.60)", "rf/mode(1.29)",
                  "rf/lognorm(0.50,1.00)", "eps/linear", "rf/mode(1.75)", "rf/cosmap", "edm(0.00,0.60)", "rf",
                  "v/linear", "edm(0.60,1.20)", "v/cos", "edm/cos", "edm/rf", "edm(-1.20,1.20)"]
    assert sorted(PAPER_GLOBAL_RANK, key=PAPER_GLOBAL_RANK.get) == best_first
    assert PAPER_GLOBAL_RANK["rf/lognorm(0.00,1.00)"] == 1.54 and PAPER_GLOBAL_RANK["edm(-1.20,1.20)"] == 15.58


@pytest.mark.parametrize("name", sorted(PAPER_GLOBAL_RANK))
def test_every_paper_setting_parses(name: str):
    form = get_formulation(name)
    assert form.name == name
    assert isinstance(form, Formulation)


def test_paper_rank_found_whatever_the_spelling():
    """A user's `rf/uniform` is the paper's plain `rf` (5.67); short numbers name the same setting."""
    spellings = {"rf/uniform": "rf", "rf": "rf", "rf/lognorm(0,1)": "rf/lognorm(0.00,1.00)",
                 "rf/lognorm(1, 0.6)": "rf/lognorm(1.00,0.60)", "rf/mode(1.29)": "rf/mode(1.29)",
                 "rf/cosmap": "rf/cosmap", "edm(-1.2,1.2)": "edm(-1.20,1.20)", "edm/rf": "edm/rf",
                 "eps/linear": "eps/linear", "v/cos": "v/cos"}
    for spelling, canonical in spellings.items():
        assert canonical_name(spelling) == canonical, spelling
        assert paper_global_rank(spelling) == PAPER_GLOBAL_RANK[canonical]
    assert paper_global_rank("rf/uniform") == 5.67
    assert paper_global_rank("rf/lognorm(0.20,0.90)") is None  # a setting the paper did not rank
    for name in PAPER_GLOBAL_RANK:
        assert canonical_name(name) == name


def test_parsed_settings_have_the_paper_meaning():
    rf = get_formulation("rf")
    assert (rf.path, rf.prediction, rf.noise.kind, str(rf.noise.density)) == ("linear", "velocity", "density",
                                                                            "uniform")
    assert str(get_formulation("rf/mode(1.75)").noise.density) == "mode(1.75)"
    edm = get_formulation("edm(-1.20,1.20)")
    assert (edm.path, edm.prediction) == ("ve", "edm")
    assert (edm.noise.density.kind, edm.noise.density.loc, edm.noise.density.scale) == ("lognorm", -1.2, 1.2)
    assert (get_formulation("eps/linear").path, get_formulation("eps/linear").prediction) == ("vp", "eps")
    assert get_formulation("v/cos").noise.kind == "cos"
    assert get_formulation("v/linear").noise.kind == "ldm"
    assert get_formulation("rf / lognorm(0.00, 1.00)").name == "rf/lognorm(0.00,1.00)"


@pytest.mark.parametrize("name", ["", "flow", "rf/", "rf/gaussian", "rf/mode(3.0)", "eps/cos", "v", "edm",
                                  "edm(1.0)", "edm/linear"])
def test_unknown_formulation_raises(name: str):
    with pytest.raises(ValueError, match=r"formulation|timestep density|mode scale"):
        get_formulation(name)


@pytest.mark.parametrize("t", [0.06, 0.2, 0.37, 0.5, 0.71, 0.9, 0.94])
def test_rf_loss_equals_the_unified_weighted_eps_loss(t: float):
    """L = -1/2 w_t lambda'_t ||eps_hat - eps||^2, w_t = t / (1 - t), lambda_t = log((1 - t)^2 / t^2)."""
    form = get_formulation("rf")
    gen = _gen(6)
    x0, eps, v_hat = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3))
    tau = torch.full((SHAPE[0],), t, dtype=torch.float64)
    z = interpolate(x0, eps, tau)
    loss = loss_at(lambda x, s, c, p: v_hat, form, x0, eps, tau, *_no_context(SHAPE[0]))

    def log_snr(s: torch.Tensor) -> torch.Tensor:
        return torch.log((1 - s) ** 2 / s**2)

    weight = t / (1 - t)
    d_log_snr = -2 / (t * (1 - t))
    step = 1e-6  # the analytic derivative, checked against a finite difference of lambda_t
    finite_difference = (log_snr(torch.tensor(t + step, dtype=torch.float64))
                         - log_snr(torch.tensor(t - step, dtype=torch.float64))) / (2 * step)
    assert finite_difference.item() == pytest.approx(d_log_snr, rel=1e-6)
    eps_hat = z + (1 - t) * v_hat
    unified = (-0.5 * weight * d_log_snr * (eps_hat - eps) ** 2).flatten(1).mean(dim=1)
    torch.testing.assert_close(loss.double(), unified, rtol=1e-5, atol=1e-6)


def test_eps_linear_range_is_the_ldm_schedule():
    tau = _ldm_tau_by_hand()
    lo, hi = get_formulation("eps/linear").tau_range
    assert lo == pytest.approx(tau[0].item(), rel=1e-5)
    assert hi == pytest.approx(tau[-1].item(), rel=1e-5)
    assert 0.02 < lo < 0.03 and 0.93 < hi < 0.94  # sqrt(0.00085) / (1 + ...) and the last LDM step
    assert get_formulation("v/linear").tau_range == (lo, hi)


def test_ldm_formulations_train_on_the_discrete_ldm_levels():
    table = _ldm_tau_by_hand().float()
    tau = get_formulation("eps/linear").sample_tau(2000, _gen(7))
    nearest = (tau[:, None] - table[None, :]).abs().min(dim=1).values
    assert nearest.max() < 1e-6
    assert tau.unique().numel() > 800  # uniform over 1000 steps: 2000 draws hit most of them


def test_edm_range_is_sigma_min_to_sigma_max():
    lo, hi = get_formulation("edm/rf").tau_range
    assert lo / (1 - lo) == pytest.approx(EDM_SIGMA_MIN)
    assert hi / (1 - hi) == pytest.approx(EDM_SIGMA_MAX)


@pytest.mark.parametrize(("p_mean", "p_std"), [(0.0, 0.6), (-1.2, 1.2), (0.6, 1.2)])
def test_edm_log_sigma_is_normal(p_mean: float, p_std: float):
    tau = get_formulation(f"edm({p_mean:.2f},{p_std:.2f})").sample_tau(200_000, _gen(8)).double()
    log_sigma = torch.log(tau / (1 - tau))
    assert log_sigma.mean().item() == pytest.approx(p_mean, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(p_std, abs=0.01)


def test_cos_noise_levels_are_the_cosine_schedule_at_uniform_time():
    # sigma = tan(pi t / 2) with t ~ U(0, 1), so (2 / pi) atan(sigma) is uniform.
    tau = get_formulation("v/cos").sample_tau(100_000, _gen(9)).double()
    u = (2 / math.pi) * torch.atan(tau / (1 - tau))
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    cdf = torch.searchsorted(u.sort().values, grid, right=True).double() / u.numel()
    assert (cdf - grid).abs().max() < 0.01


def test_vp_path_preserves_variance_and_edm_input_and_target_are_unit_variance():
    vp = get_formulation("v/cos")
    a, b = vp.coefficients(torch.linspace(0, 1, 11))
    torch.testing.assert_close(a**2 + b**2, torch.ones(11))
    edm = get_formulation("edm/rf")
    gen = _gen(10)
    x0 = edm.sigma_data * torch.randn(4, 20_000, generator=gen)
    eps = torch.randn(4, 20_000, generator=gen)
    tau = torch.tensor([0.01, 0.3, 0.7, 0.98])
    z = edm.state(interpolate(x0, eps, tau), tau)
    assert z.std(dim=1)[-1] > 10  # sigma = 49: the raw EDM state is far from unit scale
    torch.testing.assert_close(edm.network_input(z, tau).std(dim=1), torch.ones(4), atol=0.02, rtol=0)
    # Karras et al.'s c_skip and c_out also give the regression target unit variance at every noise level.
    torch.testing.assert_close(edm.target(x0, eps, z, tau).std(dim=1), torch.ones(4), atol=0.02, rtol=0)
