"""MM-DiT configuration and the registry of named flavors."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

QKNorm = Literal["none", "rms"]
Parametrization = Literal["sp", "mup"]
PARAMETRIZATIONS: tuple[str, ...] = get_args(Parametrization)
HEAD_DIM = 64  # the paper's width rule: hidden 64*d with d heads
MUP_BASE_WIDTH = 128  # the debug flavor's width: muP's learning rates and inits are the standard ones there


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of an MM-DiT. `from_depth` and `at_depth` apply the paper's width-by-depth rule."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 16
    mlp_ratio: int = 4
    context_dim: int = 4096
    pooled_dim: int = 2048
    pos_embed_max_size: int = 192  # maximum patch grid side; 192 patches = 3072 px at 8x VAE, patch 2
    sample_size: int = 128  # latent side the position scale refers to (SD3: 128 latents = 1024 px)
    qk_norm: QKNorm = "none"
    # "mup": maximal update parametrization (`model.mup`), the same as "sp" at `mup_base_width` (heads of 64): a
    # training choice that exports fold away, so the weights keep SD3's format and function either way
    parametrization: Parametrization = "sp"
    mup_base_width: int = MUP_BASE_WIDTH

    def __post_init__(self) -> None:
        positive = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "mlp_ratio",
                    "context_dim", "pooled_dim", "pos_embed_max_size", "sample_size", "mup_base_width")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MMDiTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MMDiTConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"MMDiTConfig.hidden_size ({self.hidden_size}) must be divisible by 4 for the 2-D sin-cos embedding"
            )
        if self.qk_norm not in ("none", "rms"):
            raise ValueError(f"MMDiTConfig.qk_norm must be one of 'none', 'rms', got {self.qk_norm!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"MMDiTConfig.parametrization must be one of {', '.join(map(repr, PARAMETRIZATIONS))}, "
                             f"got {self.parametrization!r}")
        if self.mup_base_width % 4:
            raise ValueError(f"MMDiTConfig.mup_base_width ({self.mup_base_width}) must be divisible by 4, "
                             "as any hidden size")
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"MMDiTConfig.sample_size ({self.sample_size}) must be divisible by patch_size ({self.patch_size})"
            )

    @classmethod
    def from_depth(cls, depth: int, **overrides: object) -> MMDiTConfig:
        """The paper's scaling rule: hidden 64*d, d heads of width 64, MLP ratio 4."""
        return replace(cls(**_paper_widths(depth)), **overrides)

    def at_depth(self, depth: int) -> MMDiTConfig:
        """This shape at another depth by the paper's width rule (as `from_depth`); every other field kept."""
        return replace(self, **_paper_widths(depth))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def width_multiplier(self) -> float:
        """muP's width ratio hidden_size / mup_base_width, by which hidden learning rates shrink; 1 under SP."""
        return self.hidden_size / self.mup_base_width if self.parametrization == "mup" else 1.0

    def parametrization_label(self) -> str:
        """'sp', or 'mup' with its base width: what a checkpoint's optimizer state was trained under."""
        return "sp" if self.parametrization == "sp" else f"mup (base width {self.mup_base_width})"

    @property
    def attention_scale(self) -> float | None:
        """Scale of the attention logits; None: SDPA's (and SD3's) 1/sqrt(head_dim). muP scales them by 1/head_dim,
        as sqrt(HEAD_DIM)/head_dim so that the base model's heads of 64 keep SD3's scale: under the width rule (heads of
        64 at every width) so does every muP network; other head widths differ, folded into the weights at export."""
        if self.parametrization == "sp" or self.head_dim == HEAD_DIM:
            return None
        return math.sqrt(HEAD_DIM) / self.head_dim

    def exported(self) -> MMDiTConfig:
        """This shape as its diffusers export reads back (`interop.config_from_diffusers`): in the standard
        parametrization, muP's attention scale folded into the weights."""
        return replace(self, parametrization="sp", mup_base_width=MUP_BASE_WIDTH)

    @property
    def mlp_hidden(self) -> int:
        return self.hidden_size * self.mlp_ratio

    @property
    def patch_dim(self) -> int:
        """Values per patch: what the image embedding reads and the final layer writes."""
        return self.in_channels * self.patch_size**2

    def image_tokens(self, height: int, width: int) -> int:
        """Number of image tokens for a latent of `height` x `width`."""
        return (height // self.patch_size) * (width // self.patch_size)


def _paper_widths(depth: int) -> dict[str, int]:
    """The width-by-depth rule, stated once: hidden 64*d with d heads of width 64."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"MMDiTConfig.depth must be a positive int, got {depth!r}")
    return {"depth": depth, "hidden_size": HEAD_DIM * depth, "num_heads": depth}


def _paper_flavors() -> dict[str, MMDiTConfig]:
    flavors = {f"d{d}": MMDiTConfig.from_depth(d) for d in (15, 18, 21, 24, 30, 38)}
    flavors["sd3-medium"] = MMDiTConfig.from_depth(24, qk_norm="none")
    flavors["sd3.5-large"] = MMDiTConfig.from_depth(38, qk_norm="rms")
    # Tiny network for tests and demos: it reads the tiny text encoders' widths (see conditioning.TINY_TEXT).
    flavors["debug"] = MMDiTConfig.from_depth(
        2, context_dim=64, pooled_dim=64, pos_embed_max_size=32, sample_size=32, qk_norm="rms",
    )
    return flavors


FLAVORS: dict[str, MMDiTConfig] = _paper_flavors()


def get_flavor(name: str, **overrides: object) -> MMDiTConfig:
    """A named flavor with optional field overrides; unknown names list the known ones."""
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; known flavors: {', '.join(sorted(FLAVORS))}")
    return replace(FLAVORS[name], **overrides)
