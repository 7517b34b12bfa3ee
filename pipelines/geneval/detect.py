"""Object detectors for GenEval scoring. GenEval's own (Mask2Former on COCO classes, CLIP for colours) has no class for
a circle or a star, so the shapes benchmark uses classical vision (OpenCV): the background is the colour of the
image border, each connected blob of other colours is an object, its shape the nearest of the shapes' outline
statistics and its colour the nearest palette colour. A `Detector` is any callable from an RGB image to detections,
so one for real images (GenEval's, with its weight files) can take its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Protocol

import cv2
import numpy as np

from pipelines.synthetic.shapes import COLORS, SHAPES, draw

# A pixel is foreground when a channel differs from the background colour by more than this: the shapes' colours
# differ from every pastel background (215..255 per channel) by at least 20 in some channel, the halo a decoder
# leaves around flat areas by less.
FOREGROUND_DELTA = 40
EDGE_SHARE = 0.5  # a pixel belongs to a blob when it is this far from the background towards the blob's colour
# Blobs under this share of the image are noise: half the smallest object the generator draws (a star of side 0.16,
# about 1.05% of the image), so a decoder's specks do not count as objects.
MIN_AREA = 0.005


@dataclass(frozen=True)
class Detection:
    """One object: its class, box (x0, y0, x1, y1; pixels, end exclusive), colour name and a confidence in [0, 1]."""

    cls: str
    box: tuple[int, int, int, int]
    color: str | None
    score: float


class Detector(Protocol):
    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detections in an (H, W, 3) uint8 RGB image, most confident first."""
        ...


def _features(mask: np.ndarray) -> np.ndarray:
    """(extent, solidity) of one blob: its share of its bounding box, and of its convex hull."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    extent = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    points = np.stack([xs, ys], axis=1).astype(np.int32)
    hull = cv2.convexHull(points)
    # the hull of pixel centres misses half a pixel all round: add the perimeter's half-pixel band back
    hull_area = cv2.contourArea(hull) + cv2.arcLength(hull, closed=True) / 2 + 1
    return np.array([extent, min(1.0, area / hull_area)])


@cache
def prototypes(sides: tuple[int, ...] = (10, 16, 24, 40)) -> dict[str, np.ndarray]:
    """Each shape's mean (extent, solidity), measured as the detector measures it on the generator's own drawing at
    a few sizes."""
    out = {}
    for shape in SHAPES:
        feats = []
        for side in sides:
            image = np.asarray(draw([{"shape": shape, "color": "blue", "bbox": [4, 4, 4 + side, 4 + side]}],
                                    (255, 255, 255), side + 8))
            (blob,) = _blobs(image, 0.0)
            feats.append(_features(blob[1]))
        out[shape] = np.mean(feats, axis=0)
    return out


def _blobs(image: np.ndarray, min_area: float) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """(box, mask within the box, median colour) of each object. Pixels far from the background colour make the
    blobs; each blob's outline is then drawn where a pixel is nearer the blob's own colour than the background
    (the half-way line of a blurred edge), so a decoder's soft edges keep their geometry."""
    background = background_color(image).astype(np.float64)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground(image).astype(np.uint8), connectivity=8)
    height, width = labels.shape
    out = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < max(4, min_area * labels.size):
            continue
        x0, y0, x1, y1 = max(0, x - 2), max(0, y - 2), min(width, x + w + 2), min(height, y + h + 2)
        blob = (labels[y0:y1, x0:x1] == label).astype(np.uint8)
        core = cv2.erode(blob, np.ones((3, 3), np.uint8)).astype(bool)
        pixels = image[y0:y1, x0:x1].astype(np.float64)
        color = np.median(pixels[core if core.sum() >= 4 else blob.astype(bool)], axis=0)
        span = color - background
        share = ((pixels - background) @ span) / max(float(span @ span), 1e-6)  # 0 background .. 1 the object
        near = cv2.dilate(blob, np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        others = (labels[y0:y1, x0:x1] != label) & (labels[y0:y1, x0:x1] != 0)
        mask = (share > EDGE_SHARE) & near & ~others
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        out.append((box, mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], color))
    return out


def background_color(image: np.ndarray) -> np.ndarray:
    """The median colour of the one-pixel frame of the image."""
    frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(frame, axis=0)


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose colour is far from the background's."""
    diff = np.abs(image.astype(np.int16) - background_color(image).astype(np.int16)).max(axis=2)
    return diff > FOREGROUND_DELTA


def nearest_color(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]] = COLORS) -> tuple[str, float]:
    """(name, distance) of the palette colour nearest `rgb` in RGB."""
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    best = int(distances.argmin())
    return names[best], float(distances[best])


@dataclass
class ShapesDetector:
    """Shapes and colours by classical vision; confidence falls with the distance to the nearest shape outline."""

    min_area: float = MIN_AREA

    def __call__(self, image: np.ndarray) -> list[Detection]:
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        protos = prototypes()
        found = []
        for box, mask, rgb in _blobs(image, self.min_area):
            distances = {s: float(np.linalg.norm(_features(mask) - p)) for s, p in protos.items()}
            shape = min(distances, key=distances.get)
            color, _ = nearest_color(rgb)
            found.append(Detection(shape, box, color, max(0.0, 1.0 - distances[shape] / 0.3)))
        return sorted(found, key=lambda d: -d.score)
