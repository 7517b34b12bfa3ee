"""Distribution helpers applied from outside the model."""

import copy

import torch

from model import FLAVORS, MMDiT
from workloads.train.distribute import apply_activation_checkpointing


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    torch.manual_seed(0)
    plain = MMDiT(FLAVORS["debug"])
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped)
    apply_activation_checkpointing(wrapped)  # idempotent
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    inputs = (torch.randn(2, 16, 8, 8), torch.rand(2), torch.randn(2, 10, 64), torch.randn(2, 64))
    calls = {"plain": 0, "wrapped": 0}
    plain.blocks[0].img.mod.register_forward_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    wrapped.blocks[0].img.mod.register_forward_hook(lambda *_: calls.__setitem__("wrapped", calls["wrapped"] + 1))
    out_plain, out_wrapped = plain(*inputs), wrapped(*inputs)
    torch.testing.assert_close(out_wrapped, out_plain)
    out_plain.square().mean().backward()
    out_wrapped.square().mean().backward()
    assert calls == {"plain": 1, "wrapped": 2}  # the block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
