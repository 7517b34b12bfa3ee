"""Decoding, normalisation and rejection of bad inputs."""

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.decode import (
    DecodeLimits,
    Rejected,
    decode_image,
    nearest_bucket,
    normalise_caption,
    parse_buckets,
)

SQUARE = DecodeLimits(buckets=((64, 64),))


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_is_resized_and_centre_cropped():
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 50, 100))  # a red band at the left, outside the centre crop
    out = decode_image(encode(image), SQUARE)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (np.abs(out.astype(int) - [10, 20, 30]).max(axis=-1) < 8).mean() > 0.95


@pytest.mark.parametrize(("mode", "mean_rgb"), [("CMYK", (200, 100, 50)), ("P", (200, 100, 50)), ("L", (124,) * 3),
                                               ("LA", (124,) * 3), ("RGBA", (200, 100, 50)), ("1", (124,) * 3)])
def test_any_mode_becomes_rgb_of_its_colour(mode, mean_rgb):
    """The colour (200, 100, 50) in each mode; its grey is 124, and mode 1 dithers to that grey on average."""
    data = encode(Image.new("RGB", (80, 80), (200, 100, 50)).convert(mode), "JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(data, SQUARE)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), mean_rgb, atol=3)


@pytest.mark.parametrize(("mode", "brightest"), [("I;16", 24), ("I", 254), ("F", 254)])
def test_high_bit_modes_are_scaled_to_grey_bytes(mode, brightest):
    """A ramp 0..6399: 16-bit scales by its full range (6399 of 65535 is 24), 32-bit and float by their maximum."""
    ramp = Image.fromarray((np.arange(80 * 80).reshape(80, 80)).astype(np.uint16)).convert(mode)
    out = decode_image(encode(ramp, "TIFF"), SQUARE)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == out[..., :1]).all() and out.min() == 0 and abs(int(out.max()) - brightest) <= 1


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    out = decode_image(encode(image), SQUARE)
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (96, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 96, 32))  # red on top
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    out = decode_image(encode(image, "JPEG", exif=exif, quality=95), DecodeLimits(buckets=((96, 64),)))
    assert out[-1, 48, 0] > 200 and out[0, 48, 2] > 200  # red ends at the bottom once rotated


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "missing image"),
        (b"", "empty file"),
        (b"this is not an image at all", "cannot decode"),
        (encode(Image.new("RGB", (64, 64)))[:60], "cannot decode"),  # truncated
        (encode(Image.new("RGB", (1, 1))), "too small"),
        (encode(Image.new("RGB", (400, 40))), "extreme aspect ratio"),
        (encode(Image.new("L", (2000, 2000))), "decompression bomb"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(data, reason):
    limits = DecodeLimits(buckets=((64, 64),), max_pixels=1_000_000)
    with pytest.raises(Rejected, match=reason):
        decode_image(data, limits)


def test_buckets_parse_validate_and_match_aspect():
    assert parse_buckets(256, []) == ((256, 256),)
    buckets = parse_buckets(256, ["256x256", "320x192", "192x320"])
    assert nearest_bucket(1600, 900, buckets) == (320, 192)
    assert nearest_bucket(900, 1600, buckets) == (192, 320)
    assert nearest_bucket(1000, 1000, buckets) == (256, 256)
    for bad in (["250x256"], ["256"], ["256x256", "256x256"]):
        with pytest.raises(ValueError, match="bucket"):
            parse_buckets(256, bad)


def test_bucketed_image_keeps_its_aspect():
    out = decode_image(encode(Image.new("RGB", (330, 200))), DecodeLimits(buckets=((64, 64), (96, 64))))
    assert out.shape == (64, 96, 3)


def test_captions_are_normalised():
    assert normalise_caption(None, 100) == ""
    assert normalise_caption(b"  two  red\ncircles \x00", 100) == "two red circles"
    assert normalise_caption("caf\xe9".encode("latin-1"), 100) == "caf\ufffd"
    assert len(normalise_caption(b"word " * 5000, 2000)) == 2000
