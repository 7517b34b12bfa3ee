"""Sampling: the shifted schedule, Euler, Heun and DPM-Solver++(2M) on velocity fields with known solutions (and
against diffusers' flow scheduler), guidance, and sampling models trained in another formulation."""

from __future__ import annotations

import pytest
import torch

from model.flow import shift_timesteps
from model.formulations import Formulation, get_formulation
from model.sampling import dpmpp_2m_sample, euler_sample, guided_velocity, heun_sample, sample, sampling_schedule

B, C, H, W = 3, 2, 4, 4
MU, STD = 1.5, 2.0  # toy data distribution N(MU, STD^2 I)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noise(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=_gen(seed), dtype=dtype)


def _null_text(batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, 5, 8), torch.zeros(batch, 8)


def _bcast(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def gaussian_x0_hat(z_rf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | z_t] for x0 ~ N(MU, STD^2 I) and z_t = (1 - t) x0 + t eps."""
    t = _bcast(t)
    var_t = (1 - t) ** 2 * STD**2 + t**2
    return MU + (1 - t) * STD**2 * (z_rf - (1 - t) * MU) / var_t


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity E[eps - x0 | z_t] = (z_t - E[x0 | z_t]) / t of the Gaussian toy data."""
    return (x - gaussian_x0_hat(x, t)) / _bcast(t)


def gaussian_oracle(form: Formulation):
    """The Bayes-optimal network for the Gaussian toy data, trained in formulation `form`."""

    def network(x: torch.Tensor, tau: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        a, b = (_bcast(c) for c in form.coefficients(tau))
        z = x * (b**2 + form.sigma_data**2).sqrt() if form.prediction == "edm" else x  # undo EDM's c_in
        z_rf = z / (a + b)
        x0_hat = gaussian_x0_hat(z_rf, tau)
        eps_hat = (z_rf - (1 - _bcast(tau)) * x0_hat) / _bcast(tau)
        return form.target(x0_hat, eps_hat, z, tau)

    return network


# --- schedule ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedule_runs_from_noise_to_data(steps: int):
    schedule = sampling_schedule(steps)
    assert schedule.shape == (steps + 1,)
    assert schedule[0].item() == 1.0 and schedule[-1].item() == 0.0
    assert (schedule.diff() < 0).all()
    torch.testing.assert_close(schedule.diff(), torch.full((steps,), -1 / steps))


def test_schedule_is_shifted():
    schedule = sampling_schedule(8, shift=3.0)
    torch.testing.assert_close(schedule, shift_timesteps(torch.linspace(1, 0, 9), 3.0))
    assert schedule[0].item() == pytest.approx(1.0) and schedule[-1].item() == 0.0
    assert schedule[4].item() == pytest.approx(0.75)  # t = 0.5 shifted by 3
    assert (schedule.diff() < 0).all()


@pytest.mark.parametrize("steps", [0, -3])
def test_schedule_rejects_fewer_than_one_step(steps: int):
    with pytest.raises(ValueError, match="steps"):
        sampling_schedule(steps)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="euler"):
        sample(gaussian_velocity, _noise(), *_null_text(), steps=2, method="dpm")


# --- integrators ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_point_mass_data_is_recovered_exactly(method: str, shift: float):
    """For data at one point x0 the rf velocity is (z - x0) / t, a straight line the integrators follow exactly."""
    x0 = torch.randn(1, C, H, W, generator=_gen(1), dtype=torch.float64)

    def network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return (x - x0) / _bcast(t)

    noise = _noise()
    out = sample(network, noise, *_null_text(), steps=3, shift=shift, method=method)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-6, rtol=0)  # float32 timesteps


def test_gaussian_velocity_is_exact():
    """Check the toy field itself: it is d/dt of the exact flow z_t = (1 - t) MU + sqrt((1 - t)^2 STD^2 + t^2) eps."""
    noise = _noise(2)

    def flow(t: float) -> torch.Tensor:
        return (1 - t) * MU + ((1 - t) ** 2 * STD**2 + t**2) ** 0.5 * noise

    for t in (0.2, 0.5, 0.9):
        step = 1e-6
        finite_difference = (flow(t + step) - flow(t - step)) / (2 * step)
        velocity = gaussian_velocity(flow(t), torch.full((B,), t, dtype=torch.float64), *_null_text())
        torch.testing.assert_close(velocity, finite_difference, atol=1e-6, rtol=1e-6)


def _gaussian_error(method: str, steps: int) -> float:
    noise = _noise(3)
    exact = MU + STD * noise  # the flow's endpoint at t = 0
    return (sample(gaussian_velocity, noise, *_null_text(), steps=steps, method=method) - exact).abs().max().item()


def test_euler_and_heun_converge_with_first_and_second_order():
    euler = {steps: _gaussian_error("euler", steps) for steps in (5, 10, 20, 100)}
    heun = {steps: _gaussian_error("heun", steps) for steps in (5, 10, 20, 100)}
    assert heun[5] < 0.5 * euler[5]
    assert euler[100] < 0.1 and heun[100] < 1e-3
    assert 1.6 < euler[10] / euler[20] < 2.5  # first order
    assert heun[10] / heun[20] > 3.2  # second order


def test_dpm_solver_2m_converges_with_second_order_at_one_call_a_step():
    """Halving the step divides the error by about 3.3 (Euler: 2), measured 10 to 80 steps: second order inside,
    with the first-order first step and last step (log-SNR is infinite at t = 1 and t = 0) costing a little."""
    euler = {steps: _gaussian_error("euler", steps) for steps in (10, 20, 40, 80)}
    dpm = {steps: _gaussian_error("dpmpp_2m", steps) for steps in (10, 20, 40, 80)}
    assert dpm[10] < 0.35 * euler[10] and dpm[80] < 0.01
    assert all(dpm[n] / dpm[2 * n] > 3.0 for n in (10, 20, 40))
    assert all(euler[n] / euler[2 * n] < 2.1 for n in (10, 20, 40))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_2m_matches_diffusers_flow_scheduler(shift: float):
    """The same steps as diffusers' `DPMSolverMultistepScheduler` for flow matching (its sigmas are our times, the
    network's velocity its `flow_prediction`) on a nonlinear, text-dependent network."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(8)
    context, pooled = _text()
    velocity = guided_velocity(text_network, context, pooled)
    z = theirs = _noise(7, torch.float32)
    for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1].tolist(), strict=True):
        v = velocity(theirs, torch.full((B,), sigma))
        theirs = scheduler.step(v, timestep, theirs).prev_sample
    ours = dpmpp_2m_sample(velocity, z, scheduler.sigmas.to(torch.float32))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_integrators_take_the_given_timesteps():
    seen: list[float] = []

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (z.shape[0],)
        seen.append(t[0].item())
        return torch.ones_like(z)

    timesteps = torch.tensor([1.0, 0.7, 0.2, 0.0])
    z = euler_sample(velocity, torch.zeros(2, 1, 2, 2), timesteps)
    assert seen == pytest.approx([1.0, 0.7, 0.2])
    torch.testing.assert_close(z, torch.full((2, 1, 2, 2), -1.0))  # a constant unit velocity over [1, 0]
    seen.clear()
    z = heun_sample(velocity, torch.zeros(2, 1, 2, 2), timesteps)
    assert seen == pytest.approx([1.0, 0.7, 0.7, 0.2, 0.2])  # no evaluation at t = 0
    torch.testing.assert_close(z, torch.full((2, 1, 2, 2), -1.0))


# --- guidance ------------------------------------------------------------------------------------------------


def text_network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """A nonlinear network whose output depends on the text."""
    gain = _bcast(1 + context.pow(2).mean(dim=(1, 2)))
    bias = _bcast(pooled.mean(dim=1).tanh())
    return torch.sin(x) * gain + bias * _bcast(t)


def _text(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    return torch.randn(B, 5, 8, generator=gen) + 1, torch.randn(B, 8, generator=gen) + 1


@pytest.mark.parametrize("guidance", [0.0, 2.0, 4.5])
def test_guided_velocity_is_classifier_free_guidance(guidance: float):
    context, pooled = _text()
    z, t = _noise(5, torch.float32), torch.tensor([0.9, 0.5, 0.1])
    v_cond = text_network(z, t, context, pooled)
    v_uncond = text_network(z, t, torch.zeros_like(context), torch.zeros_like(pooled))
    assert not torch.allclose(v_cond, v_uncond)
    guided = guided_velocity(text_network, context, pooled, guidance)(z, t)
    torch.testing.assert_close(guided, v_uncond + guidance * (v_cond - v_uncond))


def test_guidance_one_is_the_conditional_velocity():
    context, pooled = _text()
    z, t = _noise(5, torch.float32), torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(guided_velocity(text_network, context, pooled, 1.0)(z, t),
                               text_network(z, t, context, pooled))


@pytest.mark.parametrize(("guidance", "method", "calls", "batch"),
                         [(1.0, "euler", 4, B), (1.0, "heun", 7, B), (5.0, "euler", 4, 2 * B), (5.0, "heun", 7, 2 * B),
                          (1.0, "dpmpp_2m", 4, B), (5.0, "dpmpp_2m", 4, 2 * B)])
def test_network_calls_per_sample(guidance: float, method: str, calls: int, batch: int):
    context, pooled = _text()
    seen: list[tuple[int, int, int, bool]] = []

    def network(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        null_half = bool((c[B:] == 0).all() and (p[B:] == 0).all()) if c.shape[0] > B else False
        seen.append((x.shape[0], t.shape[0], c.shape[0], null_half))
        torch.testing.assert_close(c[:B], context)  # the conditional branch comes first
        return text_network(x, t, c, p)

    out = sample(network, _noise(6, torch.float32), context, pooled, steps=4, guidance=guidance, method=method)
    assert out.shape == (B, C, H, W)
    assert len(seen) == calls
    assert all(s == (batch, batch, batch, batch > B) for s in seen)


def test_guided_sample_one_euler_step():
    context, pooled = _text()
    noise = _noise(7, torch.float32)
    t = torch.ones(B)
    v_cond = text_network(noise, t, context, pooled)
    v_uncond = text_network(noise, t, torch.zeros_like(context), torch.zeros_like(pooled))
    out = sample(text_network, noise, context, pooled, steps=1, guidance=3.0)
    torch.testing.assert_close(out, noise - (v_uncond + 3.0 * (v_cond - v_uncond)))


# --- formulations --------------------------------------------------------------------------------------------


def test_gaussian_oracle_in_rf_is_the_exact_velocity():
    z, t = _noise(8), torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(gaussian_oracle(get_formulation("rf"))(z, t, *_null_text()),
                               gaussian_velocity(z, t, *_null_text()))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_v_cos_oracle_samples_like_the_rf_oracle(method: str):
    noise = _noise(9)
    reference = sample(gaussian_oracle(get_formulation("rf")), noise, *_null_text(), steps=6, method=method,
                       shift=2.0)
    v_cos = get_formulation("v/cos")
    converted = sample(gaussian_oracle(v_cos), noise, *_null_text(), steps=6, method=method, shift=2.0,
                       formulation=v_cos)
    torch.testing.assert_close(converted, reference, atol=1e-6, rtol=1e-6)
    # The network saw v/cos states, not rf states, so the agreement is the conversion's doing.
    assert not torch.allclose(gaussian_oracle(v_cos)(noise, torch.full((B,), 0.5, dtype=torch.float64),
                                                     *_null_text()),
                              gaussian_velocity(noise, torch.full((B,), 0.5, dtype=torch.float64), *_null_text()))


@pytest.mark.parametrize(("name", "tolerance"), [("edm(0.00,0.60)", 0.01), ("edm/cos", 0.01), ("eps/linear", 0.06),
                                               ("v/linear", 0.06)])
def test_clamped_formulations_sample_close_to_rf(name: str, tolerance: float):
    """EDM and LDM formulations see t = 1 clamped to their largest noise level (sigma 80 and about 14.6), which
    biases the first step; otherwise they sample like rf. STD * noise is several units, so a wrong conversion
    would be off by O(1)."""
    noise = _noise(10)
    reference = sample(gaussian_oracle(get_formulation("rf")), noise, *_null_text(), steps=20, method="heun")
    assert (reference - (MU + STD * noise)).abs().max() < 0.01
    form = get_formulation(name)
    converted = sample(gaussian_oracle(form), noise, *_null_text(), steps=20, method="heun", formulation=form)
    assert (converted - reference).abs().max() < tolerance
