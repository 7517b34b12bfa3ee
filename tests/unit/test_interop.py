"""Weight interop against diffusers' own SD3Transformer2DModel."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open

import model
from model import interop

CONFIGS = {
    "no-qk-norm": model.MMDiTConfig.from_depth(3, hidden_size=48, num_heads=3, context_dim=40, pooled_dim=24,
                                               pos_embed_max_size=12, sample_size=8, in_channels=4),
    "qk-rms": model.MMDiTConfig.from_depth(2, hidden_size=64, num_heads=2, context_dim=32, pooled_dim=16,
                                           pos_embed_max_size=10, sample_size=8, qk_norm="rms"),
}


def _random_diffusers(c: model.MMDiTConfig, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    net = SD3Transformer2DModel(**interop.diffusers_config(c))
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere, so a misplaced tensor changes the output
            p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


def _inputs(c: model.MMDiTConfig, h: int = 10, w: int = 14):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, c.in_channels, h, w, generator=gen), torch.rand(2, generator=gen),
            torch.randn(2, 9, c.context_dim, generator=gen), torch.randn(2, c.pooled_dim, generator=gen))


def _theirs(net: SD3Transformer2DModel, x, t, ctx, pooled) -> torch.Tensor:
    # diffusers' SD3 takes the timestep on the scheduler's [0, 1000] scale
    return net(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled).sample


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_diffusers_model_gives_same_output(name):
    c = CONFIGS[name]
    theirs = _random_diffusers(c)
    ours = model.MMDiT(c).eval()
    ours.load_state_dict(interop.from_diffusers(theirs.state_dict(), c))
    with torch.no_grad():
        for h, w in [(10, 14), (20, 4)]:
            inputs = _inputs(c, h, w)
            torch.testing.assert_close(ours(*inputs), _theirs(theirs, *inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_lossless(name):
    c = CONFIGS[name]
    theirs = _random_diffusers(c).state_dict()
    back = interop.to_diffusers(interop.from_diffusers(theirs, c), c)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    ours = model.MMDiT(c).state_dict()
    again = interop.from_diffusers(interop.to_diffusers(ours, c), c)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_our_init_position_table_equals_diffusers():
    c = CONFIGS["no-qk-norm"]
    theirs = SD3Transformer2DModel(**interop.diffusers_config(c))
    assert torch.equal(model.MMDiT(c).pos_embed, theirs.pos_embed.pos_embed[0])


@pytest.mark.parametrize("name", sorted(model.FLAVORS))
def test_parameter_counts_equal_diffusers_on_meta(name):
    c = model.FLAVORS[name]
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**interop.diffusers_config(c))
    assert sum(p.numel() for p in theirs.parameters()) == model.count_params(c)


def test_mismatched_state_dict_names_the_keys():
    c = CONFIGS["qk-rms"]
    state = _random_diffusers(c).state_dict()
    del state["transformer_blocks.0.attn.to_q.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"to_q\.weight.*extra\.weight"):
        interop.from_diffusers(state, c)
    with pytest.raises(KeyError, match="missing"):
        interop.to_diffusers({}, c)


def test_export_loads_in_diffusers_and_back(tmp_path):
    c = CONFIGS["qk-rms"]
    ours = model.MMDiT(c).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    interop.export_diffusers(ours, tmp_path / "transformer")
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    theirs = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    inputs = _inputs(c)
    with torch.no_grad():
        torch.testing.assert_close(_theirs(theirs, *inputs), ours(*inputs), rtol=1e-5, atol=1e-5)
        loaded = interop.load_diffusers(tmp_path / "transformer")
        assert loaded.config == c
        assert torch.equal(loaded(*inputs), ours(*inputs))


def test_export_in_bf16_and_sharded(tmp_path):
    c = CONFIGS["no-qk-norm"]
    interop.export_diffusers(model.MMDiT(c), tmp_path, dtype=torch.bfloat16, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    dtypes = set()
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}
    theirs = SD3Transformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    assert interop.load_diffusers(tmp_path).config == c


_SMALL = {"context_dim": 32, "pooled_dim": 16, "pos_embed_max_size": 10, "sample_size": 8, "parametrization": "mup"}
MUP_CONFIGS = {  # off the base width 128 (multipliers 1.5, 0.75, 0.5), with each way muP's attention scale folds
    "mup-heads-64": model.MMDiTConfig.from_depth(2, hidden_size=192, num_heads=3, **_SMALL),  # SD3's scale: no fold
    "mup-heads-32": model.MMDiTConfig.from_depth(2, hidden_size=96, num_heads=3, **_SMALL),  # into the Q rows
    "mup-heads-16-rms": model.MMDiTConfig.from_depth(2, hidden_size=64, num_heads=4, qk_norm="rms",
                                                     **_SMALL),  # into the query norm's gain
}


def _perturbed(c: model.MMDiTConfig) -> model.MMDiT:
    torch.manual_seed(0)
    net = model.MMDiT(c).eval()
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere (adaLN-Zero would make every output 0)
            p.add_(torch.randn_like(p) * 0.1)
    return net


@pytest.mark.parametrize("name", sorted(MUP_CONFIGS))
def test_a_mup_network_exports_to_the_same_function(name):
    c = MUP_CONFIGS[name]
    ours = _perturbed(c)
    theirs = SD3Transformer2DModel(**interop.diffusers_config(c)).eval()
    theirs.load_state_dict(interop.to_diffusers(ours.state_dict(), c), strict=True)
    unfolded = SD3Transformer2DModel(**interop.diffusers_config(c)).eval()
    unfolded.load_state_dict(interop.to_diffusers(ours.state_dict(), c.exported()), strict=True)
    inputs, tol = _inputs(c), {"rtol": 1e-5, "atol": 1e-4}  # float32 rounding of outputs up to about 7
    with torch.no_grad():
        torch.testing.assert_close(_theirs(theirs, *inputs), ours(*inputs), **tol)
        # the fold is what makes them equal where muP's attention scale is not SD3's (off by 0.3 and more)
        same = torch.allclose(_theirs(unfolded, *inputs), ours(*inputs), **tol)
    assert same == (c.attention_scale is None)
    back = interop.from_diffusers(interop.to_diffusers(ours.state_dict(), c), c)
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(back[key], tensor, rtol=1e-6, atol=0)


def test_a_mup_export_loads_back_in_either_parametrization(tmp_path):
    c = MUP_CONFIGS["mup-heads-16-rms"]
    ours = _perturbed(c)
    interop.export_diffusers(ours, tmp_path)
    inputs = _inputs(c)
    with torch.no_grad():
        standard = interop.load_diffusers(tmp_path)
        assert standard.config == c.exported() and standard.config.parametrization == "sp"
        torch.testing.assert_close(standard(*inputs), ours(*inputs), rtol=1e-5, atol=1e-5)
        again = interop.load_diffusers(tmp_path, config=c)  # e.g. a muP run's next stage, `init_from` this one
        assert again.config == c
        torch.testing.assert_close(again(*inputs), ours(*inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different network"):
        interop.load_diffusers(tmp_path, config=MUP_CONFIGS["mup-heads-32"])


def test_unsupported_diffusers_variants_are_rejected():
    base = interop.diffusers_config(CONFIGS["qk-rms"])
    with pytest.raises(ValueError, match="dual_attention_layers"):
        interop.config_from_diffusers({**base, "dual_attention_layers": (0,)})
    with pytest.raises(ValueError, match="qk_norm"):
        interop.config_from_diffusers({**base, "qk_norm": "layer_norm"})
    assert interop.config_from_diffusers(base) == CONFIGS["qk-rms"]
