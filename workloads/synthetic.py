"""Synthetic conditional latents for the demo and tests, until the preprocessing pipeline provides real ones.

Each class is a coloured shape at a random position. The RGB drawing fills latent channels 0-2 and a fixed
random mixing of it fills the rest, so every channel carries structure; channels 0-2 render back to a picture.
Per class, fixed random "encoder outputs" go through the real text-conditioning assembly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.conditioning import TINY_TEXT, TextConditioningConfig, TextEmbeddings, assemble_conditioning

SHAPES = ("square", "circle", "cross")
COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
BACKGROUND = -0.2


@dataclass(frozen=True)
class SyntheticLatents:
    channels: int = 16
    size: int = 16  # latent side
    text: TextConditioningConfig = TINY_TEXT
    seed: int = 0

    @property
    def captions(self) -> list[str]:
        return [f"a {color} {shape}" for shape in SHAPES for color in COLORS]

    def _mask(self, shape: str, cy: torch.Tensor, cx: torch.Tensor, radius: int) -> torch.Tensor:
        """(B, S, S) boolean masks of `shape` centred at (cy, cx)."""
        grid = torch.arange(self.size, dtype=torch.float32)
        dy = (grid[None, :, None] - cy[:, None, None]).abs()  # (B, S, 1)
        dx = (grid[None, None, :] - cx[:, None, None]).abs()  # (B, 1, S)
        if shape == "square":
            return (dy <= radius) & (dx <= radius)
        if shape == "circle":
            return dy**2 + dx**2 <= radius**2 + 1
        return ((dy <= 1) & (dx <= radius)) | ((dx <= 1) & (dy <= radius))

    def latents(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) class labels -> (B, C, S, S) latents with random positions."""
        radius = self.size // 5
        cy = torch.randint(radius, self.size - radius, labels.shape, generator=generator).float()
        cx = torch.randint(radius, self.size - radius, labels.shape, generator=generator).float()
        rgb = torch.full((labels.shape[0], 3, self.size, self.size), BACKGROUND)
        colors = torch.tensor(list(COLORS.values()))
        for i, shape in enumerate(SHAPES):
            mask = self._mask(shape, cy, cx, radius) & (labels // len(COLORS) == i)[:, None, None]  # (B, S, S)
            color = colors[labels % len(COLORS)][:, :, None, None]  # (B, 3, 1, 1)
            rgb = torch.where(mask[:, None], color.expand_as(rgb), rgb)
        mixing = torch.randn(self.channels - 3, 3, generator=torch.Generator().manual_seed(self.seed)) / 3**0.5
        rest = torch.einsum("kc,bchw->bkhw", mixing, rgb)  # (B, C - 3, S, S)
        return torch.cat([rgb, rest], dim=1)

    def embeddings(self, labels: torch.Tensor) -> TextEmbeddings:
        """Fixed pseudo encoder outputs per class (what the frozen encoders would give for its caption)."""
        c = self.text
        gen = torch.Generator().manual_seed(self.seed + 1)
        n = len(self.captions)
        table = TextEmbeddings(
            clip_l=torch.randn(n, c.clip_tokens, c.clip_l_dim, generator=gen),
            clip_l_pooled=torch.randn(n, c.clip_l_dim, generator=gen),
            clip_g=torch.randn(n, c.clip_tokens, c.clip_g_dim, generator=gen),
            clip_g_pooled=torch.randn(n, c.clip_g_dim, generator=gen),
            t5=torch.randn(n, c.t5_tokens, c.t5_dim, generator=gen),
        )
        return TextEmbeddings(**{k: v[labels] for k, v in vars(table).items()})

    def conditioning(self, labels: torch.Tensor,
                     keep: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) for the classes, with optional per-encoder keep masks (training dropout)."""
        return assemble_conditioning(self.embeddings(labels), self.text, keep)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random labels and their latents: (B,), (B, C, S, S)."""
        labels = torch.randint(0, len(self.captions), (batch_size,), generator=generator)
        return labels, self.latents(labels, generator)
