"""Diffusion-DPO in the rectified-flow velocity form: the loss against a direct computation on a fixed batch, its
sign, the noise and t shared by winner and loser, and the reference being the policy with its adapters off."""

import math

import pytest
import torch

import model
from conf.train import LoraConf
from model.flow import velocity_target
from model.objective import DIFFUSION_DPO_BETA_EPS, default_dpo_beta, dpo_loss
from workloads.train import lora

CONFIG = model.MMDiTConfig.from_depth(2, hidden_size=64, num_heads=2, context_dim=32, pooled_dim=16,
                                      pos_embed_max_size=10, sample_size=8)


def _batch(n: int = 3):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(n, CONFIG.in_channels, 8, 8, generator=gen), torch.randn(n, CONFIG.in_channels, 8, 8,
            generator=gen), torch.randn(n, 5, CONFIG.context_dim, generator=gen),
            torch.randn(n, CONFIG.pooled_dim, generator=gen))


class Recorder(torch.nn.Module):
    """A network that returns a fixed function of its input and remembers what it was called with."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, z, t, context, pooled):
        self.calls.append((z.clone(), t.clone()))
        return self.scale * z


def test_winner_and_loser_share_t_and_noise_and_the_loss_is_the_direct_formula():
    winner, loser, context, pooled = _batch()
    policy, reference = Recorder(0.5), Recorder(0.2)
    gen = torch.Generator().manual_seed(0)
    out = dpo_loss(policy, reference, winner, loser, context, pooled, beta=100.0, generator=gen)
    (z, t), = policy.calls
    n = winner.shape[0]
    assert torch.equal(t[:n], t[n:]) and torch.equal(t[:n], out.tau)
    tau = t[:n, None, None, None]
    eps_w, eps_l = (z[:n] - (1 - tau) * winner) / tau, (z[n:] - (1 - tau) * loser) / tau
    torch.testing.assert_close(eps_w, eps_l, rtol=1e-4, atol=1e-4)  # the same noise
    (z_ref, t_ref), = reference.calls
    assert torch.equal(z_ref, z) and torch.equal(t_ref, t)  # the reference sees exactly the policy's inputs
    # the direct computation: velocity errors of each network, then -log sigmoid(-beta/2 (policy - reference))
    eps = eps_w

    def error(scale, x0, zz):
        return (scale * zz - velocity_target(x0, eps)).pow(2).flatten(1).mean(1)

    e = {name: (error(s, winner, z[:n]), error(s, loser, z[n:])) for name, s in (("p", 0.5), ("r", 0.2))}
    inside = -50.0 * ((e["p"][0] - e["p"][1]) - (e["r"][0] - e["r"][1]))
    torch.testing.assert_close(out.inside, inside, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(inside), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.reward_margin, 2 * out.inside)


def test_the_sign_prefers_a_policy_that_fits_the_winner_better():
    """Reference = policy: the loss is log 2 and the accuracy undecided. A policy whose error on the winner is
    lower than the reference's (loser unchanged) gets inside > 0, accuracy 1 and a loss below log 2."""
    winner, loser, context, pooled = _batch()
    same = dpo_loss(Recorder(0.3), Recorder(0.3), winner, loser, context, pooled, beta=10.0,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.loss, torch.full_like(same.loss, math.log(2)))

    class FitsWinner(torch.nn.Module):
        def forward(self, z, t, context, pooled):
            n = z.shape[0] // 2
            eps = (z[:n] - (1 - t[:n, None, None, None]) * winner) / t[:n, None, None, None]
            exact = velocity_target(winner, eps)  # the winner's true velocity
            return torch.cat([exact, 0.3 * z[n:]])

    better = dpo_loss(FitsWinner(), Recorder(0.3), winner, loser, context, pooled, beta=10.0,
                      generator=torch.Generator().manual_seed(0))
    assert (better.inside > 0).all() and (better.accuracy == 1).all() and (better.loss < math.log(2)).all()


class Scaled(torch.nn.Module):
    """`scale * z` with a trainable scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, z, t, context, pooled):
        return self.scale * z


def test_the_reference_pass_carries_no_gradient_even_when_its_weights_could_learn():
    winner, loser, context, pooled = _batch()
    policy, reference = Scaled(0.5), Scaled(0.2)
    out = dpo_loss(policy, reference, winner, loser, context, pooled, beta=10.0,
                   generator=torch.Generator().manual_seed(0))
    assert out.policy_error.requires_grad and not out.reference_error.requires_grad
    out.loss.mean().backward()
    assert policy.scale.grad is not None and reference.scale.grad is None


def test_the_reference_is_the_base_with_the_adapters_off():
    torch.manual_seed(0)
    base = model.MMDiT(CONFIG)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    winner, loser, context, pooled = _batch()
    t = torch.full((3,), 0.4)
    with torch.no_grad():
        plain = base(winner, t, context, pooled)
    net = lora.apply_lora(base, LoraConf(rank=4), seed=1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
        adapted = net(winner, t, context, pooled)
        with lora.adapters_disabled(net):
            off = net(winner, t, context, pooled)
        again = net(winner, t, context, pooled)
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)  # back on afterwards
    assert all(p.requires_grad for n, p in net.named_parameters() if ".lora_" in n)

    def reference(*args):
        with lora.adapters_disabled(net):
            return net(*args)

    out = dpo_loss(net, reference, winner, loser, context, pooled, beta=default_dpo_beta(),
                   generator=torch.Generator().manual_seed(0))
    out.loss.mean().backward()
    grads = [n for n, p in net.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n for n in grads)  # only the adapters learn
    # The base above is frozen, so its reference pass would carry no graph with or without `no_grad`: a base that
    # would learn shows whether the reference pass itself is kept out of the graph.
    for p in net.parameters():
        p.requires_grad_(True)
    out = dpo_loss(net, reference, winner, loser, context, pooled, beta=default_dpo_beta(),
                   generator=torch.Generator().manual_seed(0))
    assert out.policy_error.requires_grad
    assert not out.reference_error.requires_grad and out.reference_error.grad_fn is None
    with pytest.raises(ValueError, match="no adapters"), lora.adapters_disabled(model.MMDiT(CONFIG)):
        pass


def test_the_default_beta_carries_diffusion_dpos_over_to_the_velocity_error():
    beta = default_dpo_beta("rf/lognorm(0.00,1.00)")
    # E[(1 - t)^2] under logit-normal(0, 1) is about 0.294 (t and 1 - t have the same law: E[t^2] = 0.25 + Var t)
    assert beta == pytest.approx(DIFFUSION_DPO_BETA_EPS * 0.294, rel=0.01)
    assert default_dpo_beta("rf/lognorm(0.00,1.00)", shift=3.0) < beta  # shifted to more noise: smaller (1 - t)
