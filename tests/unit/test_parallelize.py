"""Distribution helpers applied from outside the model: activation checkpointing and torch.compile per block."""

import copy

import pytest
import torch

from model import FLAVORS, MMDiT
from workloads.train.distribute import apply_activation_checkpointing, apply_compile


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


def _perturbed_debug() -> MMDiT:
    """The debug MM-DiT with every weight moved off its init (adaLN-Zero outputs exactly zero whatever the blocks)."""
    torch.manual_seed(0)
    net = MMDiT(FLAVORS["debug"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_keep_names_outputs_and_gradients(checkpointed):
    torch._dynamo.reset()
    plain = _perturbed_debug()
    compiled = copy.deepcopy(plain)
    if checkpointed:
        apply_activation_checkpointing(compiled)
    before = _graphs()
    apply_compile(compiled, backend="aot_eager")  # inductor's code generation is what the GPU runs; same capture
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    inputs = (torch.randn(2, 16, 8, 8), torch.rand(2), torch.randn(2, 10, 64), torch.randn(2, 64))
    out_plain, out_compiled = plain(*inputs), compiled(*inputs)
    assert _graphs() - before == 2  # one graph for the blocks that share code, one for the last (text pre-only)
    torch.testing.assert_close(out_compiled, out_plain)
    out_plain.square().mean().backward()
    out_compiled.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize(("dynamic", "graphs"), [(None, 4), (True, 2), (False, 6)])
def test_recompiles_across_resolution_buckets(dynamic, graphs):
    """Three buckets: automatic dynamic shapes recompile once (at the second bucket), dynamic from the start never,
    static once per bucket (2 graphs each: the shared blocks and the last)."""
    torch._dynamo.reset()
    net = _perturbed_debug()
    apply_compile(net, backend="eager", dynamic=dynamic)  # the capture alone: guards and graphs are what count here
    before = _graphs()
    with torch.no_grad():
        for side in (8, 12, 16, 8):
            net(torch.randn(2, 16, side, side), torch.rand(2), torch.randn(2, 10, 64), torch.randn(2, 64))
    assert _graphs() - before == graphs


def test_compile_bench_reports_graphs_and_ratios_per_bucket(capsys):
    from conf.bench import BenchCompileConf
    from workloads.bench import compile as bench_compile

    cfg = BenchCompileConf(latent_sizes=[8, 12, 8], steps=1, modes=["dynamic"], backend="eager")
    figures = bench_compile.run(cfg)
    assert [row["graphs"] for row in figures["modes"]["dynamic"]] == [2, 2, 2]  # every bucket on the first graphs
    assert all(row["vs_eager"] > 0 and row["first_s"] > 0 for row in figures["modes"]["dynamic"])
    assert "x eager" in capsys.readouterr().out
    with pytest.raises(ValueError, match="modes must be among"):
        BenchCompileConf(modes=["fast"])
