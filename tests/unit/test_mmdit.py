"""The MM-DiT: config validation, shapes, gradient flow, determinism, meta construction, parameter counts."""

import copy
import dataclasses
import math
import typing

import pytest
import torch

import model
from conf.model import ModelConf
from model.flops import count_params, paper_train_flops, train_flops
from model.layers import sincos_pos_embed_2d

TINY_FLAVORS = {
    "debug": model.FLAVORS["debug"],
    "debug-noqk": model.get_flavor("debug", qk_norm="none"),
    "depth3-odd": model.MMDiTConfig.from_depth(3, hidden_size=48, num_heads=3, context_dim=40, pooled_dim=24,
                                               pos_embed_max_size=12, sample_size=8, in_channels=4),
}


def _inputs(c: model.MMDiTConfig, batch: int = 2, h: int = 8, w: int = 12, text: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, c.in_channels, h, w, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, text, c.context_dim, generator=gen), torch.randn(batch, c.pooled_dim, generator=gen))


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """adaLN-Zero makes a fresh network output zeros; give every weight a value so checks can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name", sorted(TINY_FLAVORS))
def test_output_shape_any_aspect_ratio(name):
    c = TINY_FLAVORS[name]
    net = model.MMDiT(c)
    for h, w in [(8, 12), (4, 4), (2, 2 * c.pos_embed_max_size)]:
        out = net(*_inputs(c, h=h, w=w))
        assert out.shape == (2, c.in_channels, h, w)


def test_adaln_zero_init_outputs_zero_and_is_not_degenerate():
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    assert torch.count_nonzero(net(*_inputs(c))) == 0  # zero-initialised modulation and final layer
    assert all(torch.count_nonzero(b.img.qkv.weight) > 0 for b in net.blocks)


@pytest.mark.parametrize("name", sorted(TINY_FLAVORS))
def test_every_parameter_gets_gradient(name):
    c = TINY_FLAVORS[name]
    net = model.MMDiT(c)
    _randomize(net)
    net(*_inputs(c)).square().mean().backward()
    # The last block's text queries are discarded (pre-only stream); SD3's format keeps their weights anyway.
    last = f"blocks.{c.depth - 1}.txt"
    dead = {f"{last}.q_norm.weight"}
    missing = [n for n, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert set(missing) == (dead if c.qk_norm == "rms" else set())
    qkv_grad = dict(net.named_parameters())[f"{last}.qkv.weight"].grad
    assert torch.count_nonzero(qkv_grad[: c.hidden_size]) == 0 and torch.count_nonzero(qkv_grad[c.hidden_size:]) > 0


def test_deterministic_and_batch_independent():
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    _randomize(net)
    x, t, ctx, pooled = _inputs(c, batch=3)
    full = net(x, t, ctx, pooled)
    assert torch.equal(full, net(x, t, ctx, pooled))
    single = net(x[1:2], t[1:2], ctx[1:2], pooled[1:2])
    torch.testing.assert_close(single, full[1:2], rtol=1e-5, atol=1e-5)


def test_output_depends_on_every_input():
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    _randomize(net)
    x, t, ctx, pooled = _inputs(c)
    base = net(x, t, ctx, pooled)
    for changed in [(x + 1, t, ctx, pooled), (x, t * 0.5, ctx, pooled), (x, t, ctx + 1, pooled),
                    (x, t, ctx, pooled + 1)]:
        assert not torch.allclose(net(*changed), base)


@pytest.mark.parametrize("skip", [(0,), (1, 2), (3,), (0, 3), (0, 1, 2, 3)])
def test_skipping_layers_equals_diffusers_skip_layers(skip):
    """Both streams pass a skipped block unchanged, as `SD3Transformer2DModel(skip_layers=...)` does; block 3 is
    the last, whose text stream is pre-only."""
    from diffusers import SD3Transformer2DModel

    c = model.MMDiTConfig.from_depth(4, hidden_size=48, num_heads=3, context_dim=40, pooled_dim=24,
                                     pos_embed_max_size=12, sample_size=8, in_channels=4, qk_norm="rms")
    ours = model.MMDiT(c).eval()
    _randomize(ours)
    theirs = SD3Transformer2DModel(**model.interop.diffusers_config(c)).eval()
    theirs.load_state_dict(model.interop.to_diffusers(ours.state_dict(), c))
    x, t, ctx, pooled = _inputs(c)
    with torch.no_grad():
        skipped = ours(x, t, ctx, pooled, skip_layers=skip)
        expected = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled,
                          skip_layers=list(skip)).sample
        torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-5)
        assert (skipped - ours(x, t, ctx, pooled)).abs().max() > 1e-3  # the skip changed the output


@pytest.mark.parametrize("skip", [(2,), (-1,), (0, 5)])
def test_skip_layers_outside_the_blocks_name_the_allowed_range(skip):
    c = model.FLAVORS["debug"]
    with pytest.raises(ValueError, match=r"skip_layers must be block indices in \[0, 1\]"):
        model.MMDiT(c)(*_inputs(c), skip_layers=skip)


def test_position_embedding_is_centre_cropped():
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    g = c.pos_embed_max_size
    table = net.pos_embed.view(g, g, -1)
    crop = net.cropped_pos_embed(4, 6).view(4, 6, -1)
    top, left = (g - 4) // 2, (g - 6) // 2
    assert torch.equal(crop, table[top:top + 4, left:left + 6])
    assert torch.equal(net.cropped_pos_embed(g, g), net.pos_embed)


def test_sincos_table_separates_rows_and_columns():
    table = sincos_pos_embed_2d(16, grid=4, base=4).view(4, 4, 16)
    assert torch.equal(table[0, :, :8], table[3, :, :8])  # first half depends on the column only
    assert torch.equal(table[:, 0, 8:], table[:, 3, 8:])  # second half on the row only
    for a, b in ((0, 1), (0, 3), (1, 2)):  # and each half does change along its own axis
        assert not torch.allclose(table[:, a, :8], table[:, b, :8]), (a, b)
        assert not torch.allclose(table[a, :, 8:], table[b, :, 8:]), (a, b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda c, x, t, ctx, p: (x[:, :3], t, ctx, p), "x must have shape"),
        (lambda c, x, t, ctx, p: (x[..., :7], t, ctx, p), "divisible by patch_size"),
        (lambda c, x, t, ctx, p: (torch.zeros(2, 16, 2, 2 * c.pos_embed_max_size + 2), t, ctx, p), "at most"),
        (lambda c, x, t, ctx, p: (x, t[:1], ctx, p), "t must have shape"),
        (lambda c, x, t, ctx, p: (x, t, ctx[..., :5], p), "context must have shape"),
        (lambda c, x, t, ctx, p: (x, t, ctx, p[:, :5]), "pooled must have shape"),
    ],
)
def test_wrong_shapes_name_the_tensor(args, message):
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    with pytest.raises(ValueError, match=message):
        net(*args(c, *_inputs(c)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"hidden_size": 65}, "hidden_size"), ({"num_heads": 3}, "num_heads"), ({"qk_norm": "layer"}, "qk_norm"),
     ({"depth": 0}, "depth"), ({"patch_size": -2}, "patch_size"), ({"sample_size": 33}, "sample_size"),
     ({"parametrization": "ntk"}, "parametrization"), ({"mup_base_width": 0}, "mup_base_width"),
     ({"mup_base_width": 130}, "mup_base_width")],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        model.get_flavor("debug", **overrides)


def test_unknown_flavor_lists_known_ones():
    with pytest.raises(ValueError, match="sd3-medium"):
        model.get_flavor("d99")


def test_paper_width_rule():
    for d in (15, 18, 21, 24, 30, 38):
        c = model.FLAVORS[f"d{d}"]
        assert (c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden) == (64 * d, d, 64, 4 * 64 * d)
    assert model.FLAVORS["sd3-medium"].qk_norm == "none"
    assert model.FLAVORS["sd3.5-large"].qk_norm == "rms" and model.FLAVORS["sd3.5-large"].depth == 38


def test_at_depth_applies_the_width_rule_and_keeps_the_rest():
    debug = model.FLAVORS["debug"]
    deeper = debug.at_depth(5)
    assert (deeper.depth, deeper.hidden_size, deeper.num_heads, deeper.head_dim) == (5, 64 * 5, 5, 64)
    assert dataclasses.replace(deeper, depth=2, hidden_size=128, num_heads=2) == debug  # text widths etc. kept
    assert model.FLAVORS["d15"].at_depth(24) == model.FLAVORS["d24"] == model.MMDiTConfig.from_depth(24)
    assert model.FLAVORS["sd3.5-large"].at_depth(24).qk_norm == "rms"
    assert ModelConf.at_depth("debug", 5).build() == deeper
    # what a depth series builds from a customised flavor: the width rule, and the other choices kept
    custom = ModelConf("debug", patch_size=4, in_channels=4).with_depth(3).build()
    assert (custom.depth, custom.hidden_size, custom.num_heads) == (3, 192, 3)
    assert (custom.patch_size, custom.in_channels) == (4, 4)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=r"MMDiTConfig\.depth"):
            debug.at_depth(bad)


def test_model_conf_has_an_optional_override_for_every_config_field():
    """`conf.model.ModelConf` is a flavor name plus one override per MMDiTConfig field; None keeps the flavor's."""
    names = [f.name for f in dataclasses.fields(ModelConf)]
    assert sorted(names) == sorted(["flavor", *(f.name for f in dataclasses.fields(model.MMDiTConfig))])
    hints = typing.get_type_hints(ModelConf)
    not_optional = [n for n in names if n != "flavor" and type(None) not in typing.get_args(hints[n])]
    assert not not_optional, f"ModelConf fields must be Optional (None keeps the flavor's value): {not_optional}"
    assert all(getattr(ModelConf(), n) is None for n in names if n != "flavor")


@pytest.mark.parametrize("name", sorted(model.FLAVORS))
def test_count_params_is_exact_on_meta(name):
    c = model.FLAVORS[name]
    with torch.device("meta"):
        net = model.MMDiT(c)
    assert all(p.is_meta for p in net.parameters())
    assert count_params(c) == sum(p.numel() for p in net.parameters())


def test_headline_sizes():
    assert 1.9e9 < count_params(model.FLAVORS["sd3-medium"]) < 2.1e9
    assert 7.8e9 < count_params(model.FLAVORS["sd3.5-large"]) < 8.2e9
    for d in (15, 24, 38):  # the paper's 147456 d^3 rule of thumb holds to a few percent
        assert count_params(model.FLAVORS[f"d{d}"]) == pytest.approx(147456 * d**3, rel=0.08)


def test_train_flops_matches_paper_leading_term():
    for d in (15, 24, 38):
        c = model.FLAVORS[f"d{d}"]
        ours, paper = train_flops(c, 32, 32), paper_train_flops(c, 32, 32)
        assert ours == pytest.approx(paper, rel=0.03)
        assert ours < 6 * count_params(c) * (256 + 154) / 2  # 6NT overcounts (about 3x)
    c = model.FLAVORS["d24"]
    token_ratio = (64 * 64 // 4 + 154) / (32 * 32 // 4 + 154)
    assert train_flops(c, 64, 64) > 1.05 * token_ratio * train_flops(c, 32, 32)  # attention: superlinear in tokens


def test_train_flops_counts_a_dense_matmul_exactly():
    """Cross-check the per-token term against a direct count for a 1-block net: no text, no attention term."""
    c = model.MMDiTConfig.from_depth(1, hidden_size=8, num_heads=1, context_dim=8, pooled_dim=8,
                                     pos_embed_max_size=4, sample_size=4, in_channels=4)
    h, n = c.hidden_size, c.image_tokens(4, 4)
    per_token = 3 * h * h + h * h + 2 * h * c.mlp_hidden + 2 * c.patch_dim * h
    attention = 2 * n * n * h
    per_sample = (6 + 2 + 2) * h * h + (256 + h + c.pooled_dim + h) * h  # adaLN: image, text, final
    expected = 3 * 2 * (n * per_token + attention + per_sample)
    assert train_flops(c, 4, 4, text_tokens=0) == expected
    assert math.isclose(train_flops(c, 4, 4, text_tokens=0), expected)


def test_meta_build_then_init_matches_eager_init():
    c = model.FLAVORS["debug"]
    eager = model.MMDiT(c)
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = model.MMDiT(c)
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    lazy.init_weights()
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_round_trip():
    c = model.FLAVORS["debug"]
    net = model.MMDiT(c)
    _randomize(net)
    clone = copy.deepcopy(net)
    fresh = model.MMDiT(c)
    fresh.load_state_dict(clone.state_dict())
    inputs = _inputs(c)
    assert torch.equal(fresh(*inputs), net(*inputs))
