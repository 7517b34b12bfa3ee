"""Helpers both test tiers import (on the path through `pythonpath` in pyproject.toml)."""

from __future__ import annotations

import torch

from model.conditioning import TINY_TEXT
from pipelines import schema


def random_batch(seed: int = 0, n: int = 4, latent_size: int = 8) -> dict[str, torch.Tensor]:
    """A training batch of the tiny models' layout: fp16 latents (16 channels) and every text-embedding column."""
    gen = torch.Generator().manual_seed(seed)
    shapes = schema.embedding_shapes(TINY_TEXT)
    out = {schema.LATENT: torch.randn(n, 16, latent_size, latent_size, generator=gen).half()}
    for column in schema.EMBEDDING_COLUMNS:
        out[column] = torch.randn(n, *shapes[column.split("_", 1)[1]], generator=gen).half()
    return out
