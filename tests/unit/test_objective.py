"""Training loss and the fixed-grid, fixed-noise validation loss."""

from __future__ import annotations

import pytest
import torch

from model.flow import interpolate
from model.formulations import get_formulation
from model.objective import fixed_noise, training_loss, validation_loss, validation_timesteps

B, C, H, W = 4, 3, 4, 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    x0 = torch.randn(batch, C, H, W, generator=gen)
    return x0, torch.randn(batch, 6, 8, generator=gen), torch.randn(batch, 8, generator=gen)


def zero_network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    return x * 0


def toy_network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Depends on every input per sample, never across samples."""
    scale = (1 + t + context.mean(dim=(1, 2)) + pooled.mean(dim=1)).view(-1, 1, 1, 1)
    return torch.tanh(x) * scale - 0.3


def test_training_loss_shapes_and_determinism():
    x0, context, pooled = _inputs()
    out = training_loss(toy_network, x0, context, pooled, generator=_gen(1))
    assert out.per_sample.shape == (B,) and out.tau.shape == (B,)
    assert (out.per_sample > 0).all()
    assert ((out.tau > 0) & (out.tau < 1)).all()
    again = training_loss(toy_network, x0, context, pooled, generator=_gen(1))
    assert torch.equal(out.per_sample, again.per_sample) and torch.equal(out.tau, again.tau)
    other = training_loss(toy_network, x0, context, pooled, generator=_gen(2))
    assert not torch.equal(out.tau, other.tau)


def test_training_loss_is_the_velocity_mse_at_the_drawn_noise():
    x0, context, pooled = _inputs()
    out = training_loss(toy_network, x0, context, pooled, formulation="rf/mode(1.29)", generator=_gen(3))
    # Replay the generator: noise levels first, then the noise.
    gen = _gen(3)
    tau = get_formulation("rf/mode(1.29)").sample_tau(B, gen)
    eps = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(out.tau, tau)
    v_hat = toy_network(interpolate(x0, eps, tau), tau, context, pooled)
    torch.testing.assert_close(out.per_sample, (v_hat - (eps - x0)).pow(2).mean(dim=(1, 2, 3)))


def test_training_loss_shift_moves_noise_levels():
    x0, context, pooled = _inputs(batch=256)
    plain = training_loss(zero_network, x0, context, pooled, generator=_gen(4))
    shifted = training_loss(zero_network, x0, context, pooled, shift=3.0, generator=_gen(4))
    torch.testing.assert_close(shifted.tau, 3 * plain.tau / (1 + 2 * plain.tau))


def test_validation_timesteps_grid():
    assert validation_timesteps(8).tolist() == [i / 8 for i in range(8)]
    assert validation_timesteps().tolist() == [i / 8 for i in range(8)]
    assert validation_timesteps(4).tolist() == [0.0, 0.25, 0.5, 0.75]


def test_fixed_noise_depends_only_on_seed_and_sample_id():
    noise = fixed_noise((C, H, W), torch.tensor([5, 9, 2]), 8, seed=0)
    assert noise.shape == (8, 3, C, H, W)
    alone = fixed_noise((C, H, W), torch.tensor([9]), 8, seed=0)
    assert torch.equal(noise[:, 1], alone[:, 0])
    assert not torch.equal(noise[0, 0], noise[1, 0])  # a fresh draw per timestep
    assert not torch.equal(noise, fixed_noise((C, H, W), torch.tensor([5, 9, 2]), 8, seed=1))


def test_validation_loss_shape_and_repeatability():
    x0, context, pooled = _inputs()
    first = validation_loss(toy_network, x0, context, pooled)
    assert first.shape == (B, 8)
    assert torch.equal(first, validation_loss(toy_network, x0, context, pooled))
    assert not torch.allclose(first, validation_loss(toy_network, x0, context, pooled, seed=1))
    assert validation_loss(toy_network, x0, context, pooled, n_timesteps=5).shape == (B, 5)


def test_validation_loss_of_a_sample_does_not_depend_on_its_batch():
    x0, context, pooled = _inputs(batch=6)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    batched = validation_loss(toy_network, x0, context, pooled, sample_ids=ids)
    for i in (0, 3, 5):
        alone = validation_loss(toy_network, x0[i:i + 1], context[i:i + 1], pooled[i:i + 1], sample_ids=ids[i:i + 1])
        torch.testing.assert_close(alone[0], batched[i], rtol=1e-6, atol=0)
    # Reordering the batch reorders the rows: the noise follows the sample id, not the batch position.
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = validation_loss(toy_network, x0[perm], context[perm], pooled[perm], sample_ids=ids[perm])
    torch.testing.assert_close(shuffled, batched[perm], rtol=1e-6, atol=0)
    # Without ids the batch position keys the noise, so the same sample at position 0 gets other noise.
    unkeyed = validation_loss(toy_network, x0[3:4], context[3:4], pooled[3:4])
    assert not torch.allclose(unkeyed[0], batched[3])


def test_validation_loss_of_zero_velocity_is_the_target_energy():
    x0, context, pooled = _inputs()
    ids = torch.arange(B) + 100
    losses = validation_loss(zero_network, x0, context, pooled, sample_ids=ids, seed=3)
    noise = fixed_noise((C, H, W), ids, 8, seed=3)
    expected = torch.stack([(noise[i] - x0).pow(2).mean(dim=(1, 2, 3)) for i in range(8)], dim=1)
    torch.testing.assert_close(losses, expected)


def test_validation_loss_clamps_to_the_formulation_range():
    # eps/linear with a zero network predicts eps_hat = 0, x0_hat = z / a, so the velocity error is
    # -(1 + sigma) eps at the clamped noise level: t = 0 evaluates at the first LDM step, not at sigma = 0.
    form = get_formulation("eps/linear")
    x0, context, pooled = _inputs()
    losses = validation_loss(zero_network, x0, context, pooled, formulation=form)
    noise = fixed_noise((C, H, W), torch.arange(B), 8, seed=0)
    tau = form.clamp(validation_timesteps(8))
    assert tau[0] > 0.02
    sigma = tau / (1 - tau)
    expected = torch.stack([(1 + sigma[i]) ** 2 * noise[i].pow(2).mean(dim=(1, 2, 3)) for i in range(8)], dim=1)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["rf", "eps/linear", "v/cos", "edm(0.00,0.60)"])
def test_validation_loss_is_the_same_metric_for_every_formulation(name: str):
    """A network that is Bayes-optimal for point-mass data x0 gets (almost) zero loss in any formulation."""
    form = get_formulation(name)
    x0, context, pooled = _inputs()

    def oracle(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        a, b = (s.view(-1, 1, 1, 1) for s in form.coefficients(t))
        if form.prediction == "edm":
            x = x * (b**2 + form.sigma_data**2).sqrt()  # undo EDM's input scaling c_in
        eps = (x - a * x0) / b.clamp_min(1e-12)
        return form.target(x0, eps, x, t)

    losses = validation_loss(oracle, x0, context, pooled, formulation=form)
    assert losses[:, 1:].max() < 1e-8  # t = 0 is degenerate for paths whose b vanishes there
