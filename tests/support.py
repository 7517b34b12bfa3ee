"""Helpers both test tiers import (on the path through `pythonpath` in pyproject.toml)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
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


def random_step_batch(seed: int = 0, n: int = 4, latent_size: int = 8) -> dict[str, torch.Tensor]:
    """A training step's batch: `random_batch`'s latents and one caption's embeddings a row, as the training stream
    hands them over (`workloads.train.streaming.CaptionCollate`)."""
    from workloads.train.data import choose_captions

    return choose_captions(random_batch(seed, n, latent_size), synthetic=bool(seed % 2))


@contextmanager
def offline(who: str) -> Iterator[None]:
    """No hub access and no connection off the machine inside: `who` names the test in the error.

    Loopback stays open for session-wide servers (the S3 test server, a local Ray cluster).
    """
    real_connect = socket.socket.connect

    def refuse(sock: socket.socket, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"{who} must not touch the network (connect to {address})")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        yield


PLANTED_ORIGINALS, PLANTED_COPIED = 40, 6  # the dedup tests' folder: 40 distinct images, 6 with a copy of each kind
