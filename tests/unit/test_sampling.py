"""Sampling: the shifted schedule, Euler, Heun and DPM-Solver++(2M) on velocity fields with known solutions (and
against diffusers' flow scheduler), guidance, and sampling models trained in another formulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import MMDiT, MMDiTConfig
from model.flow import shift_timesteps
from model.formulations import Formulation, get_formulation
from model.interop import diffusers_config, to_diffusers
from model.sampling import (
    INTEGRATORS,
    SD35_MEDIUM_SLG,
    SkipLayerGuidance,
    Step,
    dpmpp_2m_sample,
    euler_sample,
    guided_velocity,
    heun_sample,
    sample,
    sampling_schedule,
)

B, C, H, W = 3, 2, 4, 4
MU, STD = 1.5, 2.0  # toy data distribution N(MU, STD^2 I)
FIRST = Step(0, 1)  # a step where no skip-layer guidance applies


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
    for i, (timestep, sigma) in enumerate(zip(scheduler.timesteps, scheduler.sigmas[:-1].tolist(), strict=True)):
        v = velocity(theirs, torch.full((B,), sigma), Step(i, 8))
        theirs = scheduler.step(v, timestep, theirs).prev_sample
    ours = dpmpp_2m_sample(velocity, z, scheduler.sigmas.to(torch.float32))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_integrators_take_the_given_timesteps_and_name_the_step():
    seen: list[float] = []
    steps: list[Step] = []

    def velocity(z: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        assert t.shape == (z.shape[0],)
        seen.append(t[0].item())
        steps.append(step)
        return torch.ones_like(z)

    timesteps = torch.tensor([1.0, 0.7, 0.2, 0.0])
    z = euler_sample(velocity, torch.zeros(2, 1, 2, 2), timesteps)
    assert seen == pytest.approx([1.0, 0.7, 0.2])
    assert steps == [Step(0, 3), Step(1, 3), Step(2, 3)]
    torch.testing.assert_close(z, torch.full((2, 1, 2, 2), -1.0))  # a constant unit velocity over [1, 0]
    seen.clear()
    steps.clear()
    z = heun_sample(velocity, torch.zeros(2, 1, 2, 2), timesteps)
    assert seen == pytest.approx([1.0, 0.7, 0.7, 0.2, 0.2])  # no evaluation at t = 0
    assert [s.index for s in steps] == [0, 0, 1, 1, 2]  # both calls of a step are that step's
    torch.testing.assert_close(z, torch.full((2, 1, 2, 2), -1.0))
    steps.clear()
    dpmpp_2m_sample(velocity, torch.zeros(2, 1, 2, 2), timesteps)
    assert steps == [Step(0, 3), Step(1, 3), Step(2, 3)]


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
    guided = guided_velocity(text_network, context, pooled, guidance)(z, t, FIRST)
    torch.testing.assert_close(guided, v_uncond + guidance * (v_cond - v_uncond))


def test_guidance_one_is_the_conditional_velocity():
    context, pooled = _text()
    z, t = _noise(5, torch.float32), torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(guided_velocity(text_network, context, pooled, 1.0)(z, t, FIRST),
                               text_network(z, t, context, pooled))


def test_a_guidance_interval_guides_only_below_its_time():
    context, pooled = _text()
    z = _noise(5, torch.float32)
    guide = guided_velocity(text_network, context, pooled, 4.0, guidance_below=0.6)
    high, low = torch.full((B,), 0.8), torch.full((B,), 0.5)
    torch.testing.assert_close(guide(z, high, FIRST), text_network(z, high, context, pooled))  # no CFG at t = 0.8
    v_cond = text_network(z, low, context, pooled)
    v_uncond = text_network(z, low, torch.zeros_like(context), torch.zeros_like(pooled))
    torch.testing.assert_close(guide(z, low, FIRST), v_uncond + 4.0 * (v_cond - v_uncond))
    calls = []
    network = lambda z, t, c, p: calls.append(len(z)) or text_network(z, t, c, p)  # noqa: E731
    sample(network, z, context, pooled, steps=4, guidance=4.0, guidance_below=0.6)
    assert calls == [B, B, 2 * B, 2 * B]  # t = 1, 0.75 unguided; 0.5, 0.25 guided
    with pytest.raises(ValueError, match="guidance_below must be in"):
        guided_velocity(text_network, context, pooled, 4.0, guidance_below=0.0)


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


# --- skip-layer guidance -------------------------------------------------------------------------------------

# Depth 10: SD3.5 Medium's blocks 7, 8 and 9 exist, the last (pre-only text) block among them.
SLG_NET = MMDiTConfig.from_depth(10, hidden_size=32, num_heads=2, context_dim=16, pooled_dim=8, pos_embed_max_size=8,
                                 sample_size=8, in_channels=4)


@pytest.fixture(scope="module")
def twins() -> tuple[MMDiT, torch.nn.Module]:
    """Our MM-DiT and diffusers' SD3Transformer2DModel with the same random weights (adaLN-Zero's zeros perturbed,
    else both output zero whatever is skipped)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    ours = MMDiT(SLG_NET).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs = SD3Transformer2DModel(**diffusers_config(SLG_NET)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), SLG_NET))
    return ours, theirs


def diffusers_sd3_sample(transformer, scheduler, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                         steps: int, guidance: float, slg: SkipLayerGuidance,
                         sigmas: list[float] | None) -> tuple[torch.Tensor, list[tuple[float, bool]]]:
    """diffusers' StableDiffusion3Pipeline with skip-layer guidance, embeddings in and latents out (no text encoders
    or VAE), and its transformer calls as (t, with skipped layers)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    calls: list[tuple[float, bool]] = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["timestep"][0].item() / 1000,
                                                   kwargs.get("skip_layers") is not None)), with_kwargs=True)
    null_context, null_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    side = noise.shape[-1] * pipe.vae_scale_factor
    try:
        latents = pipe(prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_context,
                       negative_pooled_prompt_embeds=null_pooled, latents=noise, num_inference_steps=steps,
                       sigmas=sigmas, guidance_scale=guidance, skip_guidance_layers=list(slg.layers),
                       skip_layer_guidance_scale=slg.scale, skip_layer_guidance_start=slg.start,
                       skip_layer_guidance_stop=slg.stop, output_type="latent", height=side, width=side).images
    finally:
        hook.remove()
    return latents, calls


def exact_flow_dpm_solver():
    """diffusers' DPM-Solver++(2M) for flow matching, handing the network its exact sigmas (times 1000) where
    diffusers' own rounds them to whole timesteps (our sampler does not round)."""
    from diffusers import DPMSolverMultistepScheduler

    class ExactDPMSolver(DPMSolverMultistepScheduler):
        def set_timesteps(self, *args, **kwargs) -> None:
            super().set_timesteps(*args, **kwargs)
            self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps

    return ExactDPMSolver(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                          solver_order=2, final_sigmas_type="zero")


def recording(network: MMDiT, calls: list[tuple[float, bool]]):
    """`network`, noting each call as (t, with skipped layers)."""

    def call(x, t, context, pooled, **kwargs):
        calls.append((t[0].item(), "skip_layers" in kwargs))
        return network(x, t, context, pooled, **kwargs)

    return call


@pytest.mark.parametrize(("method", "steps", "slg"), [
    ("euler", 28, SD35_MEDIUM_SLG),  # steps 1 to 5
    ("euler", 20, SkipLayerGuidance((0, 9), 3.0, 0.05, 0.25)),  # 20 * 0.05 and 20 * 0.25 are whole: steps 2 to 4
    ("dpmpp_2m", 12, SkipLayerGuidance((4,), 2.0, 0.0, 0.5)),  # start 0 still leaves out step 0: steps 1 to 5
])
def test_sampling_with_slg_matches_diffusers_sd3_pipeline_step_for_step(twins, method: str, steps: int,
                                                                        slg: SkipLayerGuidance):
    """The same network calls (the skip branch at the same steps, with the same times) and the same samples as
    diffusers' pipeline on the same weights: Euler through `FlowMatchEulerDiscreteScheduler` given our schedule,
    DPM-Solver++(2M) on `DPMSolverMultistepScheduler`'s flow sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours, theirs = twins
    gen = _gen(11)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    context, pooled = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 8, generator=gen)
    if method == "euler":
        scheduler, timesteps = FlowMatchEulerDiscreteScheduler(), sampling_schedule(steps)
        sigmas = timesteps[:-1].tolist()
    else:
        scheduler = exact_flow_dpm_solver()
        scheduler.set_timesteps(steps)
        timesteps, sigmas = scheduler.sigmas.to(torch.float32), None
    expected, their_calls = diffusers_sd3_sample(theirs, scheduler, noise, context, pooled, steps, 4.0, slg, sigmas)
    our_calls: list[tuple[float, bool]] = []
    velocity = guided_velocity(recording(ours, our_calls), context, pooled, 4.0, slg=slg)
    got = INTEGRATORS[method](velocity, noise, timesteps)
    assert [skip for _, skip in our_calls] == [skip for _, skip in their_calls]
    assert [t for t, _ in our_calls] == pytest.approx([t for t, _ in their_calls], abs=1e-6)
    assert any(skip for _, skip in our_calls), "the case must reach the skip branch"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    plain = INTEGRATORS[method](guided_velocity(ours, context, pooled, 4.0), noise, timesteps)
    assert (got - plain).abs().max() > 1e-3  # skip-layer guidance changed the sample


@pytest.mark.parametrize(("steps", "start", "stop", "applied"), [
    (28, 0.01, 0.2, [1, 2, 3, 4, 5]), (10, 0.01, 0.2, [1]), (100, 0.01, 0.2, list(range(2, 20))),
    (20, 0.05, 0.25, [2, 3, 4]), (4, 0.0, 1.0, [1, 2, 3]), (5, 0.1, 0.2, []),
])
def test_slg_applies_at_diffusers_step_indices(steps: int, start: float, stop: float, applied: list[int]):
    """diffusers' rule, `i > n * start and i < n * stop`, both strict, by step index."""
    slg = SkipLayerGuidance((0,), 1.0, start, stop)
    assert [i for i in range(steps) if slg.applies(Step(i, steps))] == applied


def skip_aware_network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                       skip_layers: tuple[int, ...] = ()) -> torch.Tensor:
    """`text_network`, degraded differently by each skipped block."""
    return text_network(x, t, context, pooled) * (1 - 0.1 * len(skip_layers)) + 0.05 * sum(skip_layers)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_slg_velocity_adds_scale_times_conditional_minus_skipped(guidance: float):
    context, pooled = _text()
    z, t = _noise(5, torch.float32), torch.tensor([0.9, 0.5, 0.1])
    slg = SkipLayerGuidance((1, 2), 2.5, 0.1, 0.5)
    v_cond = skip_aware_network(z, t, context, pooled)
    v_uncond = skip_aware_network(z, t, torch.zeros_like(context), torch.zeros_like(pooled))
    v_skip = skip_aware_network(z, t, context, pooled, skip_layers=(1, 2))
    assert not torch.allclose(v_cond, v_skip)
    velocity = guided_velocity(skip_aware_network, context, pooled, guidance, slg=slg)
    cfg = v_uncond + guidance * (v_cond - v_uncond)
    torch.testing.assert_close(velocity(z, t, Step(2, 10)), cfg + 2.5 * (v_cond - v_skip))
    for outside in (Step(1, 10), Step(5, 10)):  # 10 * 0.1 and 10 * 0.5: both bounds strict
        torch.testing.assert_close(velocity(z, t, outside), cfg)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_slg_scale_zero_is_plain_cfg_and_a_positive_scale_changes_the_sample(method: str):
    context, pooled = _text()
    noise = _noise(6, torch.float32)
    plain = sample(skip_aware_network, noise, context, pooled, steps=10, guidance=4.0, method=method)
    off = SkipLayerGuidance((1,), 0.0, 0.0, 1.0)
    torch.testing.assert_close(sample(skip_aware_network, noise, context, pooled, steps=10, guidance=4.0,
                                      method=method, slg=off), plain, rtol=0, atol=0)
    on = SkipLayerGuidance((1,), 2.5, 0.0, 1.0)
    guided = sample(skip_aware_network, noise, context, pooled, steps=10, guidance=4.0, method=method, slg=on)
    assert (guided - plain).abs().max() > 1e-2


@pytest.mark.parametrize(("method", "skip_calls"), [("euler", 4), ("heun", 8), ("dpmpp_2m", 4)])
def test_the_skip_branch_is_conditional_only_and_on_every_call_of_its_steps(method: str, skip_calls: int):
    """10 steps from 0.01 to 0.5: steps 1 to 4; Heun's second call of a step skips as its first did."""
    context, pooled = _text()
    seen: list[tuple[int, tuple[int, ...]]] = []

    def network(x, t, c, p, **kwargs):
        if "skip_layers" in kwargs:
            torch.testing.assert_close(c, context)  # the conditional branch alone
        seen.append((x.shape[0], tuple(kwargs.get("skip_layers", ()))))
        return skip_aware_network(x, t, c, p, **kwargs)

    sample(network, _noise(6, torch.float32), context, pooled, steps=10, guidance=4.0, method=method,
           slg=SkipLayerGuidance((3, 5), 2.5, 0.01, 0.5))
    assert [s for s in seen if s[1]] == [(B, (3, 5))] * skip_calls
    assert all(batch == 2 * B for batch, layers in seen if not layers)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"layers": ()}, "layers"), ({"layers": (-1,)}, "layers"), ({"layers": (2, 2)}, "layers"),
    ({"scale": -1.0}, "scale"), ({"start": 0.3, "stop": 0.2}, "start < stop"), ({"stop": 1.5}, "stop <= 1"),
])
def test_skip_layer_guidance_rejects_bad_settings_naming_them(kwargs: dict, named: str):
    with pytest.raises(ValueError, match=named):
        dataclasses.replace(SD35_MEDIUM_SLG, **kwargs)


def compose(job: str, args: list[str]):
    """A job's config as its command line composes it, its schema registered as its driver does."""
    from conf import evaluate, pairs, sweep, train  # noqa: F401  (evaluate registers on import)
    from workloads import runtime

    for module in (pairs, sweep, train):
        module.register()
    return runtime.compose(job, args)


@pytest.mark.parametrize(("job", "args", "field"), [
    ("evaluate", ["run=runs/x", "data=d", "out=o"], "skip_layers"),
    ("make_pairs", ["run=runs/x", "data=d", "out=o"], "skip_layers"),
    ("train", ["data=d", "model=d15"], "validation.skip_layers"),
    ("sweep", ["data=d"], "skip_layers"),
])
def test_jobs_take_skip_layer_guidance_from_the_command_line(job: str, args: list[str], field: str):
    def section(cfg):
        return cfg.validation if field.startswith("validation.") else cfg

    assert section(compose(job, args)).skip_layer_guidance is None  # off by default
    slg = section(compose(job, [*args, f"{field}=[7,8,9]"])).skip_layer_guidance
    assert slg == SD35_MEDIUM_SLG  # the other fields' defaults are SD3.5 Medium's


@pytest.mark.parametrize(("job", "required", "override", "named"), [
    ("evaluate", ["run=runs/x", "data=d", "out=o"], "skip_layers=[-1]", "evaluate.skip_layers"),
    ("evaluate", ["run=runs/x", "data=d", "out=o"], "skip_layer_scale=-1", "evaluate.skip_layer_scale"),
    ("evaluate", ["run=runs/x", "data=d", "out=o"], "skip_layer_start=0.5", "evaluate.skip_layer_start"),
    ("make_pairs", ["run=runs/x", "data=d", "out=o"], "skip_layer_stop=1.5", "skip_layer_stop"),
    ("train", ["data=d"], "validation.skip_layers=[1,1]", "validation.skip_layers"),
    ("train", ["data=d"], "validation.skip_layers=[2]", "validation.skip_layers must be block indices in [0, 1]"),
    ("sweep", ["data=d"], "skip_layer_scale=-2", "sweep.skip_layer_scale"),
])
def test_bad_skip_layer_settings_fail_naming_the_field(job: str, required: list[str], override: str, named: str):
    from workloads import runtime

    with pytest.raises(Exception) as error:
        compose(job, [*required, override])
    assert runtime.is_user_error(error.value)
    assert named in runtime.one_line(error.value)
