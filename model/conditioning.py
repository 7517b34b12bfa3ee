"""Text conditioning: assemble (context, pooled) from any subset of CLIP-L, CLIP-G and T5, and the
per-encoder training dropout.

context: CLIP-L and CLIP-G penultimate hidden states concatenated on channels, zero-padded to the context
width, then T5's tokens appended on the sequence: (B, 77 + 77, 4096). pooled: CLIP-L and CLIP-G pooled
projections concatenated: (B, 768 + 1280). An absent or dropped encoder contributes zeros, which is also
what classifier-free guidance's unconditional branch is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

ENCODERS = ("clip_l", "clip_g", "t5")
PAPER_DROP_PROB = 0.463  # per encoder; about 10% of samples end fully unconditional (0.463^3)


@dataclass(frozen=True)
class TextConditioningConfig:
    """Widths and token counts of the three encoders and the MM-DiT context width they are packed into."""

    clip_l_dim: int = 768
    clip_g_dim: int = 1280
    t5_dim: int = 4096
    clip_tokens: int = 77
    t5_tokens: int = 77
    context_dim: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"TextConditioningConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.clip_l_dim + self.clip_g_dim > self.context_dim:
            raise ValueError(
                f"TextConditioningConfig: clip_l_dim + clip_g_dim ({self.clip_l_dim + self.clip_g_dim}) "
                f"exceeds context_dim ({self.context_dim})"
            )
        if self.t5_dim > self.context_dim:
            raise ValueError(f"TextConditioningConfig.t5_dim ({self.t5_dim}) exceeds context_dim ({self.context_dim})")

    @classmethod
    def of_encoders(cls, clip_l_dim: int, clip_g_dim: int, t5_dim: int, tokens: int) -> TextConditioningConfig:
        """The conditioning three encoders of these widths give, each read over `tokens` tokens: the context is as
        wide as the wider of the CLIP pair (side by side) and T5, as SD3 packs them."""
        return cls(clip_l_dim=clip_l_dim, clip_g_dim=clip_g_dim, t5_dim=t5_dim, clip_tokens=tokens, t5_tokens=tokens,
                   context_dim=max(clip_l_dim + clip_g_dim, t5_dim))

    @property
    def pooled_dim(self) -> int:
        return self.clip_l_dim + self.clip_g_dim

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens


SD3_TEXT = TextConditioningConfig()
# Widths and token count of the tiny random encoders used in tests and the demo; the widths match the `debug` MM-DiT
# flavor. 32 tokens an encoder hold every shapes caption (the longest synthetic one, four objects listed, is 26 CLIP
# tokens): at 64 px the text stream of 2 x 77 tokens was 90% of the network's tokens (a debug-flavor training step
# 1.4x slower than at 2 x 32; README, Measured).
TINY_TEXT = TextConditioningConfig(clip_l_dim=32, clip_g_dim=32, t5_dim=64, context_dim=64, clip_tokens=32,
                                   t5_tokens=32)


@dataclass
class TextEmbeddings:
    """Encoder outputs for a batch; None marks an encoder that is absent (e.g. T5 skipped at inference)."""

    clip_l: torch.Tensor | None = None  # (B, 77, 768) penultimate hidden states
    clip_l_pooled: torch.Tensor | None = None  # (B, 768) pooled projection
    clip_g: torch.Tensor | None = None  # (B, 77, 1280)
    clip_g_pooled: torch.Tensor | None = None  # (B, 1280)
    t5: torch.Tensor | None = None  # (B, 77, 4096) last hidden state

    def batch_size(self) -> int:
        present = [v for v in (self.clip_l, self.clip_l_pooled, self.clip_g, self.clip_g_pooled, self.t5)
                   if v is not None]
        if not present:
            raise ValueError("TextEmbeddings has no encoder output; pass batch_size to assemble_conditioning")
        return present[0].shape[0]


def _checked(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if tensor is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    return tensor


def _masked(tensor: torch.Tensor | None, keep: torch.Tensor | None, shape: tuple[int, ...],
            like: torch.Tensor) -> torch.Tensor:
    """The tensor with dropped samples zeroed, or zeros of `shape` for an absent encoder."""
    if tensor is None:
        return like.new_zeros(shape)
    if keep is None:
        return tensor
    return tensor * keep.to(tensor.dtype).view(-1, *([1] * (tensor.ndim - 1)))


def assemble_conditioning(emb: TextEmbeddings, config: TextConditioningConfig = SD3_TEXT,
                          keep: dict[str, torch.Tensor] | None = None,
                          batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, clip_tokens + t5_tokens, context_dim), pooled (B, clip_l_dim + clip_g_dim)).

    `keep` maps an encoder name to a (B,) boolean mask; False zeroes that encoder's outputs for the sample.
    """
    c, b = config, batch_size or emb.batch_size()
    clip_l = _checked("clip_l", emb.clip_l, (b, c.clip_tokens, c.clip_l_dim))
    clip_g = _checked("clip_g", emb.clip_g, (b, c.clip_tokens, c.clip_g_dim))
    t5 = _checked("t5", emb.t5, (b, c.t5_tokens, c.t5_dim))
    clip_l_pooled = _checked("clip_l_pooled", emb.clip_l_pooled, (b, c.clip_l_dim))
    clip_g_pooled = _checked("clip_g_pooled", emb.clip_g_pooled, (b, c.clip_g_dim))
    if (clip_l is None) != (clip_l_pooled is None) or (clip_g is None) != (clip_g_pooled is None):
        raise ValueError("a CLIP encoder needs both its hidden states and its pooled projection, or neither")
    like = next(v for v in (clip_l, clip_g, t5, torch.zeros(())) if v is not None)
    keep = keep or {}
    clip = torch.cat([
        _masked(clip_l, keep.get("clip_l"), (b, c.clip_tokens, c.clip_l_dim), like),
        _masked(clip_g, keep.get("clip_g"), (b, c.clip_tokens, c.clip_g_dim), like),
        like.new_zeros(b, c.clip_tokens, c.context_dim - c.pooled_dim),
    ], dim=2)  # (B, 77, context_dim)
    t5_part = torch.cat([
        _masked(t5, keep.get("t5"), (b, c.t5_tokens, c.t5_dim), like),
        like.new_zeros(b, c.t5_tokens, c.context_dim - c.t5_dim),
    ], dim=2)  # (B, 77, context_dim)
    pooled = torch.cat([
        _masked(clip_l_pooled, keep.get("clip_l"), (b, c.clip_l_dim), like),
        _masked(clip_g_pooled, keep.get("clip_g"), (b, c.clip_g_dim), like),
    ], dim=1)  # (B, pooled_dim)
    return torch.cat([clip, t5_part], dim=1), pooled  # (B, 154, context_dim), (B, pooled_dim)


def sample_encoder_keep(batch_size: int, drop_prob: float = PAPER_DROP_PROB,
                        generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Independent per-sample, per-encoder keep masks for training-time text dropout."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"text dropout drop_prob must be in [0, 1], got {drop_prob}")
    draws = torch.rand(len(ENCODERS), batch_size, generator=generator, device=device)
    return {name: draws[i] >= drop_prob for i, name in enumerate(ENCODERS)}


def unconditional_like(context: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional inputs: what `assemble_conditioning` gives with every encoder dropped (all zeros)."""
    return torch.zeros_like(context), torch.zeros_like(pooled)
