"""Exponential moving average of the weights, kept per rank on the rank's own shards (ZeRO-3 partitions, else the
replicated tensors), in fp32 whatever the training precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

CHUNK_BYTES = 2**30  # fp32 bytes of the weights one update step casts at a time


def chunked(tensors: list[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive indices of `tensors` in groups of at most `limit` bytes (a larger tensor is a group alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return [g for g in groups if g]


class EMA:
    """`shadow = decay * shadow + (1 - decay) * weights` after each optimizer step.

    With `warmup`, the decay is min(decay, (1 + n) / (10 + n)) after n updates, so a short or young run's EMA is
    not stuck at the initial weights.
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float, warmup: bool = True,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.tensors, self.decay, self.warmup = tensors, decay, warmup
        self.shadow = [t.detach().float().clone() for t in tensors]
        # (shadow tensors, weights) a chunk: `load_state_dict` copies into the shadow in place, so these stay valid
        self.chunks = [([self.shadow[i] for i in group], [tensors[i] for i in group])
                       for group in chunked(self.shadow, chunk_bytes)]
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step, a chunk of tensors at a time: bf16 weights are cast to fp32 per chunk, so the casts never hold
        more than `chunk_bytes` (all at once they would be 4 bytes a parameter: 8 GB at d=24, 32 GB at 8B)."""
        weight = 1.0 - self.current_decay()
        for shadow, weights in self.chunks:
            torch._foreach_lerp_(shadow, [t.detach().float() for t in weights], weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the EMA weights in (cast to the training precision) for the duration, then restore."""
        backup = [t.detach().clone() for t in self.tensors]
        with torch.no_grad():
            for t, s in zip(self.tensors, self.shadow, strict=True):
                t.data.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(self.tensors, backup, strict=True):
                    t.data.copy_(b)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            if s.shape != saved.shape:
                raise ValueError(f"EMA tensor shape {tuple(saved.shape)} does not match {tuple(s.shape)}")
            s.copy_(saved)
        self.updates = int(state["updates"])
