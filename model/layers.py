"""Building blocks of the MM-DiT: embeddings, adaLN modulation, the per-stream MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

NORM_EPS = 1e-6
TIMESTEP_FEATURES = 256
# SD3 checkpoints embed t*1000 (the sinusoid was trained on the [0, 1000] range); keeping that scale makes
# public weights load without retraining the time embedding. Pass t in fp32: bf16 would round t*1000 by up to 2.
TIMESTEP_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of `t * TIMESTEP_SCALE`, cosines first: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * TIMESTEP_SCALE)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): sines then cosines over dim/2 log-spaced frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int, base: int, device: torch.device | None = None) -> torch.Tensor:
    """2-D sin-cos table for a `grid` x `grid` patch grid, row-major: (grid*grid, dim).

    Positions are scaled so that `base` patches span `base` units whatever the grid size (SD3 uses
    base = sample_size / patch_size). The first half of the channels encodes the column, the second the row.
    """
    coords = torch.arange(grid, dtype=torch.float32, device=device) / (grid / base)  # (G,)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    col_emb = _sincos_1d(dim // 2, cols.reshape(-1))  # (G*G, D/2)
    row_emb = _sincos_1d(dim // 2, rows.reshape(-1))  # (G*G, D/2)
    return torch.cat([col_emb, row_emb], dim=1).float()  # (G*G, D)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the timestep features and the pooled text vector."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(in_dim, hidden_size)
        self.lin2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(nn.functional.silu(self.lin1(x)))  # (B, D)


@dataclass
class Modulation:
    """adaLN parameters for one sub-layer; `gate` is None where the output is not a gated residual."""

    shift: torch.Tensor  # (B, D)
    scale: torch.Tensor  # (B, D)
    gate: torch.Tensor | None = None  # (B, D)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine, then the conditioned scale and shift: (B, L, D) -> (B, L, D)."""
        x = nn.functional.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
        return x * (1 + self.scale[:, None]) + self.shift[:, None]

    def gated(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        assert self.gate is not None, "this modulation has no gate"
        return residual + self.gate[:, None] * update  # (B, L, D)


class AdaLN(nn.Module):
    """SiLU -> Linear from the conditioning vector to `count` Modulations (zero-initialised: adaLN-Zero)."""

    def __init__(self, hidden_size: int, count: int, gated: bool) -> None:
        super().__init__()
        self.count, self.gated = count, gated
        self.chunks = 3 if gated else 2
        self.lin = nn.Linear(hidden_size, hidden_size * self.chunks * count)

    def forward(self, y: torch.Tensor) -> list[Modulation]:
        params = self.lin(nn.functional.silu(y)).chunk(self.chunks * self.count, dim=-1)  # each (B, D)
        return [Modulation(*params[i * self.chunks:(i + 1) * self.chunks]) for i in range(self.count)]


class FeedForward(nn.Module):
    """Per-stream MLP with GELU (tanh approximation)."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))  # (B, L, D)
