"""Decoding and resizing: any readable image to an RGB uint8 array at its resolution bucket, or a reason
why not. Captions are normalised to clean UTF-8 text."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

Bucket = tuple[int, int]  # (width, height), each a multiple of 16


class Rejected(Exception):
    """A sample that cannot be used; the message is the recorded reason."""


@dataclass(frozen=True)
class DecodeLimits:
    buckets: tuple[Bucket, ...]
    max_pixels: int = 40_000_000
    min_side: int = 32
    max_aspect: float = 4.0
    max_caption_chars: int = 2000


def parse_buckets(resolution: int, buckets: list[str] | tuple[str, ...]) -> tuple[Bucket, ...]:
    """'WxH' strings (or the square resolution when none), validated: each side a positive multiple of 16."""
    specs = list(buckets) or [f"{resolution}x{resolution}"]
    parsed = []
    for spec in specs:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(spec))
        if not match:
            raise ValueError(f"bucket {spec!r} must look like WIDTHxHEIGHT, e.g. 256x256")
        w, h = int(match.group(1)), int(match.group(2))
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise ValueError(f"bucket {spec!r}: each side must be a positive multiple of 16")
        parsed.append((w, h))
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"buckets contain duplicates: {specs}")
    return tuple(parsed)


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is closest in log space."""
    ratio = np.log(width / height)
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - ratio))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: alpha composited on white, 16-bit and float scaled to 8 bits, palettes expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> np.ndarray:
    """Scale so the bucket is covered, then centre-crop to it: (H, W, 3) uint8."""
    w, h = bucket
    scale = max(w / image.width, h / image.height)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    return np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.uint8)


def open_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Image bytes -> an RGB image at its own size (EXIF orientation applied); raises Rejected with the reason."""
    if data is None:
        raise Rejected("missing image")
    if len(data) == 0:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise Rejected(f"decompression bomb: {width}x{height} exceeds max_pixels={max_pixels}")
            image.load()
    except Rejected:
        raise
    except Image.DecompressionBombError as err:
        raise Rejected(f"decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many types for bad bytes: all mean "not a decodable image"
        raise Rejected(f"cannot decode image: {type(err).__name__}: {err}") from None
    image = ImageOps.exif_transpose(image) or image
    try:
        return _to_rgb(image)
    except Exception as err:
        raise Rejected(f"cannot convert mode {image.mode} to RGB: {err}") from None


def decode_image(data: bytes | None, limits: DecodeLimits) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 at the nearest bucket; raises Rejected with the reason."""
    rgb = open_image(data, limits.max_pixels)
    if min(rgb.size) < limits.min_side:
        raise Rejected(f"too small: {rgb.width}x{rgb.height} (min_side={limits.min_side})")
    aspect = max(rgb.size) / min(rgb.size)
    if aspect > limits.max_aspect:
        raise Rejected(f"extreme aspect ratio {aspect:.1f} (max_aspect={limits.max_aspect})")
    return resize_to_bucket(rgb, nearest_bucket(rgb.width, rgb.height, limits.buckets))


def normalise_caption(data: bytes | None, max_chars: int) -> str:
    """Bytes -> text: UTF-8 (undecodable bytes replaced), whitespace collapsed, cut at max_chars.
    A missing caption becomes the empty prompt; the synthetic caption still describes the image."""
    if data is None:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\x00", " ")
    return " ".join(text.split())[:max_chars]
