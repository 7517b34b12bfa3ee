"""Text conditioning: packing CLIP-L, CLIP-G and T5 into (context, pooled), absent encoders, dropout masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.conditioning import (
    ENCODERS,
    PAPER_DROP_PROB,
    SD3_TEXT,
    TINY_TEXT,
    TextConditioningConfig,
    TextEmbeddings,
    assemble_conditioning,
    sample_encoder_keep,
    unconditional_like,
)

B = 4
N = TINY_TEXT.clip_tokens  # = t5_tokens


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _embeddings(config: TextConditioningConfig = TINY_TEXT, batch: int = B, seed: int = 0) -> TextEmbeddings:
    gen = _gen(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) + 0.5  # no exact zeros, so zeroed parts are visible

    c = config
    return TextEmbeddings(
        clip_l=draw(batch, c.clip_tokens, c.clip_l_dim), clip_l_pooled=draw(batch, c.clip_l_dim),
        clip_g=draw(batch, c.clip_tokens, c.clip_g_dim), clip_g_pooled=draw(batch, c.clip_g_dim),
        t5=draw(batch, c.t5_tokens, c.t5_dim),
    )


def _keep(*dropped: tuple[str, int]) -> dict[str, torch.Tensor]:
    keep = {name: torch.ones(B, dtype=torch.bool) for name in ENCODERS}
    for name, sample in dropped:
        keep[name][sample] = False
    return keep


def test_paper_widths():
    assert SD3_TEXT.pooled_dim == 2048 and SD3_TEXT.text_tokens == 154 and SD3_TEXT.context_dim == 4096
    assert PAPER_DROP_PROB == 0.463


def test_layout_of_context_and_pooled():
    emb = _embeddings()
    context, pooled = assemble_conditioning(emb, TINY_TEXT)
    assert context.shape == (B, 2 * N, 64) and pooled.shape == (B, 64)
    clip, t5 = context[:, :N], context[:, N:]
    torch.testing.assert_close(clip, torch.cat([emb.clip_l, emb.clip_g], dim=2))  # 32 + 32 fills the 64 channels
    torch.testing.assert_close(t5, emb.t5)
    torch.testing.assert_close(pooled, torch.cat([emb.clip_l_pooled, emb.clip_g_pooled], dim=1))


def test_narrow_encoders_are_zero_padded_on_channels():
    config = TextConditioningConfig(clip_l_dim=8, clip_g_dim=16, t5_dim=40, context_dim=64, clip_tokens=5,
                                    t5_tokens=7)
    emb = _embeddings(config)
    context, pooled = assemble_conditioning(emb, config)
    assert context.shape == (B, 12, 64) and pooled.shape == (B, 24)
    torch.testing.assert_close(context[:, :5, :8], emb.clip_l)
    torch.testing.assert_close(context[:, :5, 8:24], emb.clip_g)
    assert torch.equal(context[:, :5, 24:], torch.zeros(B, 5, 40))
    torch.testing.assert_close(context[:, 5:, :40], emb.t5)
    assert torch.equal(context[:, 5:, 40:], torch.zeros(B, 7, 24))
    torch.testing.assert_close(pooled, torch.cat([emb.clip_l_pooled, emb.clip_g_pooled], dim=1))


@pytest.mark.parametrize("present", [(), ("clip_l",), ("clip_g",), ("t5",), ("clip_l", "clip_g"),
                                     ("clip_l", "t5"), ("clip_g", "t5")])
def test_any_subset_of_encoders(present: tuple[str, ...]):
    full = _embeddings()
    fields = {}
    for name in present:
        fields[name] = getattr(full, name)
        if name != "t5":
            fields[f"{name}_pooled"] = getattr(full, f"{name}_pooled")
    context, pooled = assemble_conditioning(TextEmbeddings(**fields), TINY_TEXT, batch_size=B)
    # An absent encoder gives exactly what dropping it from the full set gives.
    keep = {name: torch.full((B,), name in present) for name in ENCODERS}
    expected_context, expected_pooled = assemble_conditioning(full, TINY_TEXT, keep=keep)
    assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)
    assert context.shape == (B, 2 * N, 64) and pooled.shape == (B, 64)
    assert bool(context[:, N:].abs().sum() > 0) == ("t5" in present)
    assert bool(pooled[:, :32].abs().sum() > 0) == ("clip_l" in present)
    assert bool(pooled[:, 32:].abs().sum() > 0) == ("clip_g" in present)
    assert bool(context[:, :N, 32:].abs().sum() > 0) == ("clip_g" in present)


def test_no_encoder_without_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        assemble_conditioning(TextEmbeddings(), TINY_TEXT)


@pytest.mark.parametrize("dropped", [(("clip_l", 1),), (("clip_g", 0), ("t5", 3)), (("t5", 2),),
                                     (("clip_l", 2), ("clip_g", 2))])
def test_keep_masks_zero_exactly_the_dropped_parts(dropped: tuple[tuple[str, int], ...]):
    emb = _embeddings()
    full_context, full_pooled = assemble_conditioning(emb, TINY_TEXT)
    context, pooled = assemble_conditioning(emb, TINY_TEXT, keep=_keep(*dropped))
    where = {  # (token slice, channel slice) in context, channel slice in pooled
        "clip_l": ((slice(0, N), slice(0, 32)), slice(0, 32)),
        "clip_g": ((slice(0, N), slice(32, 64)), slice(32, 64)),
        "t5": ((slice(N, 2 * N), slice(0, 64)), None),
    }
    expected_context, expected_pooled = full_context.clone(), full_pooled.clone()
    for name, sample in dropped:
        (tokens, channels), pooled_channels = where[name]
        expected_context[sample, tokens, channels] = 0
        if pooled_channels is not None:
            expected_pooled[sample, pooled_channels] = 0
    assert torch.equal(context, expected_context)
    assert torch.equal(pooled, expected_pooled)
    assert not torch.equal(context, full_context)  # something was dropped


def test_dropping_everything_is_the_unconditional_input():
    emb = _embeddings()
    keep = {name: torch.zeros(B, dtype=torch.bool) for name in ENCODERS}
    context, pooled = assemble_conditioning(emb, TINY_TEXT, keep=keep)
    null_context, null_pooled = unconditional_like(*assemble_conditioning(emb, TINY_TEXT))
    assert torch.equal(context, null_context) and torch.equal(pooled, null_pooled)
    assert torch.equal(null_context, torch.zeros(B, 2 * N, 64)) and torch.equal(null_pooled, torch.zeros(B, 64))


def test_half_precision_inputs_stay_half():
    emb = _embeddings()
    half = TextEmbeddings(**{f.name: getattr(emb, f.name).half() for f in dataclasses.fields(emb)})
    context, pooled = assemble_conditioning(half, TINY_TEXT, keep=_keep(("t5", 0)))
    assert context.dtype == pooled.dtype == torch.float16


@pytest.mark.parametrize(("field", "shape"), [("clip_l", (B, N, 31)), ("clip_g", (B, N - 1, 32)), ("t5", (B, N, 65)),
                                              ("clip_l_pooled", (B, 33)), ("clip_g_pooled", (B + 1, 32)),
                                              ("t5", (B, N, 4096))])
def test_wrong_shapes_raise_naming_the_tensor(field: str, shape: tuple[int, ...]):
    emb = dataclasses.replace(_embeddings(), **{field: torch.zeros(shape)})
    with pytest.raises(ValueError, match=rf"^{field} must have shape"):
        assemble_conditioning(emb, TINY_TEXT)


@pytest.mark.parametrize("missing", ["clip_l_pooled", "clip_g_pooled", "clip_l", "clip_g"])
def test_clip_hidden_and_pooled_come_together(missing: str):
    emb = dataclasses.replace(_embeddings(), **{missing: None})
    with pytest.raises(ValueError, match="pooled"):
        assemble_conditioning(emb, TINY_TEXT)


def test_encoder_dropout_rates_and_independence():
    n = 200_000
    keep = sample_encoder_keep(n, PAPER_DROP_PROB, _gen(1))
    assert set(keep) == set(ENCODERS)
    dropped = {name: ~mask for name, mask in keep.items()}
    for name in ENCODERS:
        assert keep[name].shape == (n,) and keep[name].dtype == torch.bool
        assert dropped[name].float().mean().item() == pytest.approx(0.463, abs=0.005)
    all_dropped = (dropped["clip_l"] & dropped["clip_g"] & dropped["t5"]).float().mean().item()
    assert all_dropped == pytest.approx(0.463**3, abs=0.003)  # about 10% fully unconditional
    for a, b in [("clip_l", "clip_g"), ("clip_l", "t5"), ("clip_g", "t5")]:
        both = (dropped[a] & dropped[b]).float().mean().item()
        assert both == pytest.approx(0.463**2, abs=0.005)  # independent pairs


def test_encoder_dropout_is_seeded_and_respects_extremes():
    first = sample_encoder_keep(64, 0.5, _gen(2))
    again = sample_encoder_keep(64, 0.5, _gen(2))
    assert all(torch.equal(first[name], again[name]) for name in ENCODERS)
    assert not torch.equal(first["clip_l"], first["t5"])  # a separate draw per encoder
    assert all(mask.all() for mask in sample_encoder_keep(64, 0.0, _gen(3)).values())
    assert not any(mask.any() for mask in sample_encoder_keep(64, 1.0, _gen(3)).values())
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="drop_prob"):
            sample_encoder_keep(64, bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip_l_dim": 40, "clip_g_dim": 32, "context_dim": 64}, "exceeds context_dim"),
        ({"t5_dim": 128, "context_dim": 64}, "t5_dim"),
        ({"clip_tokens": 0}, "clip_tokens"),
        ({"context_dim": 0}, "context_dim"),
    ],
)
def test_config_validation(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY_TEXT, **overrides)


def test_the_conditioning_of_encoder_widths_packs_the_clip_pair_beside_t5():
    assert TextConditioningConfig.of_encoders(768, 1280, 4096, 77) == SD3_TEXT
    assert TextConditioningConfig.of_encoders(32, 32, 64, 32) == TINY_TEXT
    wide_clip = TextConditioningConfig.of_encoders(64, 64, 96, 8)  # the CLIP pair is wider than T5 here
    assert (wide_clip.context_dim, wide_clip.clip_tokens, wide_clip.t5_tokens) == (128, 8, 8)
