"""Hydra schema for choosing an MM-DiT: a flavor name from `model.FLAVORS` plus typed field overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from model import MMDiTConfig, get_flavor


@dataclass
class ModelConf:
    """`model.flavor=d15 model.qk_norm=rms ...`; a None field keeps the flavor's value."""

    flavor: str = "debug"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    in_channels: int | None = None
    mlp_ratio: int | None = None
    context_dim: int | None = None
    pooled_dim: int | None = None
    pos_embed_max_size: int | None = None
    sample_size: int | None = None
    qk_norm: str | None = None
    parametrization: str | None = None  # sp (default) or mup: `model.parametrization=mup model.mup_base_width=128`
    mup_base_width: int | None = None  # muP's base width, where it equals SP (default 128, the debug flavor's)

    def __post_init__(self) -> None:
        self.build()  # a bad flavor or field fails when the config is made, naming it

    @classmethod
    def at_depth(cls, flavor: str, depth: int) -> ModelConf:
        """The flavor at another depth with the paper's width rule (`MMDiTConfig.at_depth`)."""
        config = get_flavor(flavor).at_depth(depth)
        return cls(flavor, depth=config.depth, hidden_size=config.hidden_size, num_heads=config.num_heads)

    def with_depth(self, depth: int) -> ModelConf:
        """This choice at another depth with the paper's width rule, keeping every other field set here (patch size,
        latent channels, ...), as a depth sweep over a customised flavor needs."""
        at = ModelConf.at_depth(self.flavor, depth)
        return replace(self, depth=at.depth, hidden_size=at.hidden_size, num_heads=at.num_heads)

    def build(self) -> MMDiTConfig:
        """The validated MMDiTConfig; raises ValueError naming a bad flavor or field."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "flavor"}
        return get_flavor(self.flavor, **{k: v for k, v in overrides.items() if v is not None})
