"""Image embeddings for copy detection, L2-normalised, so faiss' squared L2 between two is 2 - 2 cos.

- `descriptor` (the embedded default, no weights): the image squashed to a small colour thumbnail, blurred (so a
  shift of a few percent moves it little), mirrored onto itself (so a flip embeds alike) and centred on its mean
  colour. It finds copies, re-encodes, resizes, flips and small crops; it has no notion of content, so it misses
  heavy crops and edits, and two different images of one plain layout can look alike to it.
- `torchscript`: a copy-detection network by path, e.g. SSCD (`sscd_disc_mixup.torchscript.pt`, 512-d), fed the
  image squashed to `image_size` squared and ImageNet-normalised (SSCD's recipe for batched inference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image

from pipelines.torchscript import load_torchscript

if TYPE_CHECKING:
    from conf.dedup import EmbedderConf

# Squared-L2 thresholds when the config gives none: SSCD's is the paper's; the descriptor's was chosen by the sweep
# of `python -m workloads.bench.dedup` on planted duplicates of the shapes data (see the README).
DEFAULT_THRESHOLDS = {"descriptor": 0.1, "torchscript": 0.5}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DESCRIPTOR_OVERSAMPLE = 4  # the descriptor's input is 4x its thumbnail, averaged down (area) on the actor


def default_threshold(cfg: EmbedderConf) -> float:
    return DEFAULT_THRESHOLDS[str(cfg.kind)]


def input_size(cfg: EmbedderConf) -> int:
    """Side of the square uint8 image that decoding hands the embedder."""
    return cfg.thumbnail * DESCRIPTOR_OVERSAMPLE if cfg.kind == "descriptor" else cfg.image_size


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image squashed to (size, size, 3) uint8 (area averaging when shrinking)."""
    return cv2.resize(np.asarray(image, dtype=np.uint8), (size, size), interpolation=cv2.INTER_AREA)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Descriptor:
    """The blurred, flip-symmetrised, mean-centred colour thumbnail (3 * thumbnail^2 dimensions)."""

    def __init__(self, cfg: EmbedderConf) -> None:
        self.thumbnail, self.blur, self.flip_invariant = cfg.thumbnail, cfg.blur, cfg.flip_invariant
        self.dim = 3 * cfg.thumbnail ** 2

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, dim) float32, unit length."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i, image in enumerate(images):
            thumb = cv2.resize(image.astype(np.float32) / 255.0, (self.thumbnail, self.thumbnail),
                               interpolation=cv2.INTER_AREA)  # (t, t, 3)
            if self.blur:
                thumb = cv2.GaussianBlur(thumb, (0, 0), self.blur)
            if self.flip_invariant:
                thumb = thumb + thumb[:, ::-1]
            out[i] = (thumb - thumb.mean(axis=(0, 1), keepdims=True)).ravel()
        return l2_normalise(out)


class TorchScriptEmbedder:
    """A TorchScript copy-detection model: (N, 3, S, S) ImageNet-normalised floats -> (N, dim) descriptors."""

    def __init__(self, cfg: EmbedderConf, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = load_torchscript(cfg.path, "embedder.path", "a copy-detection model such as SSCD's "
                                      "sscd_disc_mixup.torchscript.pt", self.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.dim = int(self.embed(np.zeros((1, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)).shape[1])

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)  # (N, S, S, 3) uint8
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std  # (N, 3, S, S)
        y = self.model(x)
        if y.ndim != 2 or y.shape[0] != len(images):
            raise ValueError(f"embedder.path model returned shape {tuple(y.shape)}; expected (N, dim) descriptors")
        return l2_normalise(y.float().cpu().numpy())


def build_embedder(cfg: EmbedderConf, device: str = "cpu") -> Descriptor | TorchScriptEmbedder:
    return Descriptor(cfg) if cfg.kind == "descriptor" else TorchScriptEmbedder(cfg, device)
