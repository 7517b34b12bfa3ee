"""Distribution applied to the MM-DiT from outside `model/` (the torchtitan way): the block is the unit."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from model import MMDiT


def apply_activation_checkpointing(net: MMDiT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The forward is replaced per instance, so parameter names (and checkpoints, and diffusers export) are unchanged.
    """
    for block in net.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block.activation_checkpointing = True
