"""LoRA on the MM-DiT (peft): frozen base, exact start, the merge, and both exports read by diffusers itself."""

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.tuners.lora import LoraLayer

import model
from conf.train import LoraConf
from model import interop
from workloads.train import lora
from workloads.train.distribute import full_numel, trained

CONFIG = model.MMDiTConfig.from_depth(2, hidden_size=64, num_heads=2, context_dim=32, pooled_dim=16,
                                      pos_embed_max_size=10, sample_size=8, qk_norm="rms")
# muP with heads of 32 and no QK-norm: the attention scale folds into the query rows, an adapter's B's too
MUP_CONFIG = model.MMDiTConfig.from_depth(2, hidden_size=96, num_heads=3, context_dim=32, pooled_dim=16,
                                          pos_embed_max_size=10, sample_size=8, parametrization="mup")


def _inputs(c: model.MMDiTConfig = CONFIG):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, c.in_channels, 8, 6, generator=gen), torch.rand(2, generator=gen),
            torch.randn(2, 7, c.context_dim, generator=gen), torch.randn(2, c.pooled_dim, generator=gen))


def _base(seed: int = 0, config: model.MMDiTConfig = CONFIG) -> model.MMDiT:
    torch.manual_seed(seed)
    net = model.MMDiT(config)
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere (adaLN-Zero would make every output 0)
            p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


def _adapted(conf: LoraConf, seed: int = 0, config: model.MMDiTConfig = CONFIG) -> model.MMDiT:
    """The base with adapters whose B is no longer zero (as after training)."""
    net = lora.apply_lora(_base(seed, config), conf, seed=1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return net.eval()


def _theirs(net: SD3Transformer2DModel, x, t, ctx, pooled) -> torch.Tensor:
    return net(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled).sample


def test_adapters_start_at_the_base_and_are_all_that_trains():
    base = _base()
    with torch.no_grad():
        before = base(*_inputs())
    net = lora.apply_lora(base, LoraConf(rank=4), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(net(*_inputs()), before, rtol=0, atol=0)  # B = 0
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    adapted = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    # every linear layer of both streams: 5 per stream and block, the last text stream pre-only (modulation, QKV)
    assert len(adapted) == 2 * 5 + 5 + 2
    expected = sum(4 * (m.in_features + m.out_features) for m in net.modules() if isinstance(m, LoraLayer))
    assert full_numel(trained(net)) == expected == sum(net.get_parameter(n).numel() for n in trainable)


def test_the_same_seed_draws_the_same_adapters():
    a, b = (lora.apply_lora(_base(), LoraConf(rank=4), seed=1) for _ in range(2))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="matches none of the MM-DiT's linear layers"):
        lora.apply_lora(_base(), LoraConf(rank=4, targets=r"blocks\.\d+\.nothing"), seed=1)
    with pytest.raises(ValueError, match=r"lora\.targets is not a regular expression"):
        LoraConf(rank=4, targets="blocks.(")


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_merged_weights_give_the_adapted_output(alpha):
    conf = LoraConf(rank=4, alpha=alpha)
    net = _adapted(conf)
    plain = model.MMDiT(CONFIG).eval()
    plain.load_state_dict(lora.merged_state(net.state_dict(), conf), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(*_inputs()), net(*_inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("alpha", "config"), [(None, CONFIG), (16.0, CONFIG), (None, MUP_CONFIG)])
def test_the_adapter_export_loads_into_diffusers_and_matches(tmp_path, alpha, config):
    """The base exported as diffusers weights, the adapters through the SD3 pipeline's own LoRA reader and the
    transformer's `load_lora_adapter`: diffusers' output equals ours (the fused QKV split into three adapters,
    the pre-only text stream's modulation reordered, muP's attention scale folded)."""
    conf = LoraConf(rank=4, alpha=alpha)
    net = _adapted(conf, config=config)
    base_state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}
    theirs = SD3Transformer2DModel(**interop.diffusers_config(config))
    theirs.load_state_dict(interop.to_diffusers(base_state, config), strict=True)
    size = lora.export_lora(net.state_dict(), conf, config, tmp_path)
    assert size == (tmp_path / lora.LORA_WEIGHTS).stat().st_size > 0
    state = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path))
    assert all(k.startswith("transformer.") for k in state)
    theirs.load_lora_adapter(state, prefix="transformer")
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(_theirs(theirs, *_inputs(config)), net(*_inputs(config)), rtol=1e-4, atol=1e-5)


def test_the_merged_export_loads_in_diffusers(tmp_path):
    conf = LoraConf(rank=4)
    net = _adapted(conf)
    plain = model.MMDiT(CONFIG)
    plain.load_state_dict(lora.merged_state(net.state_dict(), conf))
    interop.export_diffusers(plain, tmp_path)
    theirs = SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_theirs(theirs, *_inputs()), net(*_inputs()), rtol=1e-4, atol=1e-5)


def test_adapter_sizes_at_the_papers_depths():
    """The figures of the note: rank 128 on every block linear of d=24 and d=38 (counted on meta tensors)."""
    for depth, low, high in ((24, 150e6, 250e6), (38, 350e6, 600e6)):
        numel = lora.lora_numel(model.MMDiTConfig.from_depth(depth), LoraConf(rank=128))
        assert low < numel < high, (depth, numel)
