"""muP: the coordinate check (updates stay the same size as the width grows, where SP's grow), the parameter roles
and learning-rate groups, and muP at its base width being SP."""

import pytest
import torch

import model
from model import mup
from workloads.train.trainer import lr_lambda

WIDTHS = (64, 128, 256)  # heads of 64: the width rule


def _config(width: int, parametrization: str) -> model.MMDiTConfig:
    return model.get_flavor("debug", hidden_size=width, num_heads=width // model.config.HEAD_DIM,
                            parametrization=parametrization)


def _batch(c: model.MMDiTConfig):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(4, c.in_channels, 8, 8, generator=gen), torch.rand(4, generator=gen),
            torch.randn(4, 8, c.context_dim, generator=gen), torch.randn(4, c.pooled_dim, generator=gen),
            torch.randn(4, c.in_channels, 8, 8, generator=gen))


def block_updates(c: model.MMDiTConfig, lr: float = 1e-2, steps: int = 3) -> list[float]:
    """Mean |change| of each block's image-stream output on a fixed batch after `steps` AdamW steps at `lr`. Three
    is the fewest in which every weight moves: the zero-initialised final layer and adaLN gates pass no gradient back
    until a step has made them non-zero."""
    torch.manual_seed(0)
    net = model.MMDiT(c)
    x, t, context, pooled, target = _batch(c)
    outputs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda _m, _in, out, i=i: outputs.__setitem__(i, out[0].detach()))
    with torch.no_grad():
        net(x, t, context, pooled)
    before = dict(outputs)
    optimizer = torch.optim.AdamW(mup.param_groups(net, lr, c))
    for _ in range(steps):
        loss = (net(x, t, context, pooled) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        net(x, t, context, pooled)
    return [float((outputs[i] - before[i]).abs().mean()) for i in sorted(outputs)]


def test_coordinate_check_updates_stay_flat_under_mup_and_grow_under_sp():
    growth = {}
    for parametrization in ("sp", "mup"):
        sizes = {w: block_updates(_config(w, parametrization)) for w in WIDTHS}
        print(parametrization, {w: [round(s, 4) for s in v] for w, v in sizes.items()})
        growth[parametrization] = [wide / narrow for wide, narrow in zip(sizes[WIDTHS[-1]], sizes[WIDTHS[0]],
                                                                         strict=True)]
        if parametrization == "mup":
            for block in range(len(sizes[WIDTHS[0]])):
                column = [sizes[w][block] for w in WIDTHS]
                assert max(column) / min(column) < 2, f"muP block {block}'s update moves with the width: {column}"
    # SP's Adam updates grow about linearly with the width (x4 here); muP's do not
    assert all(sp > 2 * max(m, 1.0) for sp, m in zip(growth["sp"], growth["mup"], strict=True)), growth


def test_every_parameter_has_its_role():
    net = model.MMDiT(_config(128, "mup"))
    roles = {name: mup.layer_role(name) for name, _ in net.named_parameters()}
    assert {n for n, r in roles.items() if r == "input"} == {f"{layer}.weight" for layer in mup.INPUT_LAYERS}
    assert {n for n, r in roles.items() if r == "output"} == {"final.linear.weight"}
    assert roles["blocks.0.img.qkv.weight"] == roles["blocks.1.txt.mod.lin.weight"] == "hidden"
    assert roles["time_in.lin2.weight"] == roles["final.mod.lin.weight"] == "hidden"
    assert roles["blocks.0.img.q_norm.weight"] == roles["img_in.bias"] == roles["final.linear.bias"] == "vector"
    # peft's names: an adapter learns as its layer's weight, the base layer's tensors keep their roles
    assert mup.layer_role("blocks.0.img.qkv.lora_A.default.weight") == "hidden"
    assert mup.layer_role("txt_in.lora_B.default.weight") == "input"
    assert mup.layer_role("blocks.0.img.qkv.base_layer.bias") == "vector"


def test_param_groups_scale_hidden_and_output_learning_rates_by_base_over_width():
    c = _config(256, "mup")
    net = model.MMDiT(c)
    groups = mup.param_groups(net, 1e-3, c, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-3 * 128 / 256, 0.1 * 256 / 128)]
    slow = {id(p) for p in groups[1]["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in slow) == (mup.layer_role(name) in ("hidden", "output")), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # SP, and muP at its base width: one group of every trained parameter at the base learning rate
    for config in (_config(256, "sp"), _config(128, "mup")):
        net = model.MMDiT(config)
        net.img_in.weight.requires_grad = False
        (group,) = mup.param_groups(net, 1e-3, config, weight_decay=0.1)
        assert (group["lr"], group["weight_decay"]) == (1e-3, 0.1)
        assert group["params"] == [p for p in net.parameters() if p.requires_grad]


def test_the_warmup_scales_each_group_keeping_the_ratios():
    c = _config(256, "mup")
    optimizer = torch.optim.AdamW(mup.param_groups(model.MMDiT(c), 1e-3, c))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(4))
    for factor in (0.25, 0.5, 0.75, 1.0, 1.0):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * factor, 0.5e-3 * factor])
        optimizer.step()
        schedule.step()


def test_mup_at_the_base_width_is_sp():
    base = _config(128, "mup")
    torch.manual_seed(0)
    ours = model.MMDiT(base).state_dict()
    torch.manual_seed(0)
    standard = model.MMDiT(_config(128, "sp")).state_dict()
    assert all(torch.equal(ours[k], standard[k]) for k in standard)
    assert base.attention_scale is None and base.width_multiplier == 1.0


def test_mup_init_keeps_input_weights_and_shrinks_hidden_ones_with_width():
    def stds(width: int, parametrization: str) -> dict[str, float]:
        torch.manual_seed(0)
        net = model.MMDiT(_config(width, parametrization))
        names = ("img_in.weight", "txt_in.weight", "time_in.lin2.weight")
        return {n: float(net.get_parameter(n).detach().std()) for n in names}

    narrow, wide = stds(128, "mup"), stds(512, "mup")
    for name in ("img_in.weight", "txt_in.weight"):  # fan-in fixed: the variance must not follow the width
        assert wide[name] == pytest.approx(narrow[name], rel=0.1)
        assert stds(512, "sp")[name] < 0.8 * narrow[name]  # SP's Xavier shrinks them
    assert wide["time_in.lin2.weight"] == pytest.approx(narrow["time_in.lin2.weight"] / 2, rel=0.1)


def test_attention_scale_is_one_over_head_dim_from_the_base_heads():
    assert _config(512, "mup").attention_scale is None  # heads of 64: SD3's 1/8
    odd = model.get_flavor("debug", hidden_size=128, num_heads=4, parametrization="mup")
    assert odd.attention_scale == pytest.approx(8 / 32)
    assert model.get_flavor("debug", hidden_size=128, num_heads=4).attention_scale is None
