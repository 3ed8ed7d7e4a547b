"""Image preprocessing: one :class:`Sample` in, one :class:`Preprocessed` or :class:`Failure` out.

Steps: pick the image field (RGB and grayscale JPEGs take the faster, pixel-equal path in
``jpeg_decode``), decode with Pillow (JPEG DCT-domain downscaling when the photo
is at least twice the target), apply EXIF orientation, convert any mode to RGB (alpha over
white), resize the shorter side to ``resolution`` (bicubic, antialiased), center-crop.
Everything a hostile file can make Pillow raise becomes a ``Failure`` with a reason;
programmer errors (``TypeError``...) and ``MemoryError`` propagate.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

# Image.open(formats=...) only tries registered plugins; Pillow registers these lazily.
from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin  # noqa: F401
from PIL import PngImagePlugin, TiffImagePlugin, WebPImagePlugin  # noqa: F401

from vqpipe.config import IMAGE_KEYS
from vqpipe.input.jpeg_decode import preprocess_jpeg
from vqpipe.records import Failure, FailureReason, Preprocessed, Sample

if TYPE_CHECKING:
    from vqpipe.input.views import ViewRenderer as Render


# Formats LAION-style shards actually carry (multi-picture JPEGs open through "JPEG" and
# report "MPO"). Pillow would also try EPS (which runs Ghostscript), PSD, ICO and a dozen
# more parsers on hostile bytes; there is no reason to.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# What Pillow raises on malformed or truncated input. MemoryError is left out on purpose:
# the bomb limit bounds honest allocations, so one here means the worker itself is in
# trouble and should stop rather than count it against a sample.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, zlib.error)

_ROTATES_90 = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_WHITE = (255, 255, 255)


class Rejected(Exception):
    """A sample-level rejection raised inside decoding; ``preprocess`` turns it into a
    Failure with ``reason``."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def preprocess(
    sample: Sample,
    image_keys: Sequence[str] = IMAGE_KEYS,
    resolution: int = 256,
    min_size: int = 0,
    draft: bool = True,
    max_pixels: int | None = None,
    fast: bool = True,
    render: Render | None = None,
) -> Preprocessed | Failure:
    """Decode and resize the first present field of ``image_keys``.

    ``min_size`` applies to the shorter side of the original image. ``draft=False`` turns
    off JPEG DCT scaling (for comparisons; full decodes are 2-4x slower on 1-3 MP photos).
    Caption is the ``txt`` field decoded as UTF-8 with replacement characters; metadata is
    the ``json`` field's text if it parses as JSON, else None (bad metadata never fails a
    sample -- the image is what we tokenize). ``max_pixels`` rejects larger images from their
    header, before any pixel is decoded (reason ``too_large``); Pillow's own bomb limit (~89 MP)
    always applies. ``fast`` sends RGB and grayscale JPEGs through ``jpeg_decode`` (same pixels
    within rounding, about twice the speed; it falls back here on anything it does not take).
    ``render`` (:class:`vqpipe.input.views.ViewRenderer`) replaces the center crop with several
    views of the one decoded image (on the Pillow path: the fast path makes the center crop only).
    """
    field = image_field(sample, image_keys)
    if field is None:
        return Failure(sample.key, "no_image", f"none of {list(image_keys)} in {sorted(sample.fields)}")
    data = sample.fields[field]
    if not data:
        return Failure(sample.key, "empty", f"field {field!r} is empty")
    fast_result = preprocess_jpeg(data, resolution, min_size, max_pixels) if fast and draft and render is None else None
    if fast_result is not None:
        return Preprocessed(sample.key, *fast_result, caption_text(sample), metadata_text(sample))
    try:
        img, width, height, scale = _decode(data, render.draft_size if render else resolution, min_size, draft,
                                            max_pixels)
    except Rejected as e:
        return Failure(sample.key, e.reason, str(e))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Failure(sample.key, "too_large", str(e))
    except _DECODE_ERRORS as e:
        return Failure(sample.key, "decode_error", f"{type(e).__name__}: {e}")
    if render is not None:
        pixels, crops = render(img, (width, height), scale)
        return Preprocessed(sample.key, pixels, width, height, caption_text(sample), metadata_text(sample), crops)
    pixels = resize_center_crop(img, resolution, (width, height), scale)
    return Preprocessed(sample.key, pixels, width, height, caption_text(sample), metadata_text(sample))


def image_field(sample: Sample, image_keys: Sequence[str]) -> str | None:
    """The member extension ``preprocess`` takes the image from: the first of ``image_keys`` present."""
    return next((k for k in image_keys if k in sample.fields), None)


def _decode(data: bytes, resolution: int, min_size: int, draft: bool,
            max_pixels: int | None = None) -> tuple[Image.Image, int, int, int]:
    """Oriented RGB image, the oriented original size, and the DCT downscale factor."""
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; we want both as failures.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    width, height = img.size
    if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
        # Backstop: the warnings filter above is process-global, so a decode in another
        # thread can restore the default filter while this one is opening.
        raise Rejected("too_large", f"{width}x{height} exceeds {Image.MAX_IMAGE_PIXELS} pixels")
    if max_pixels is not None and width * height > max_pixels:
        # A PNG or WebP is decoded in full (JPEG draft mode does not apply): 80 MP is 240 MB of RGB
        # per decode thread, from a file that can be a few hundred bytes.
        raise Rejected("too_large", f"{width}x{height} exceeds preprocess.max_pixels {max_pixels}")
    if min(width, height) < min_size:
        raise Rejected("too_small", f"{width}x{height} is below min_size {min_size}")
    if img.getexif().get(0x0112) in _ROTATES_90:
        width, height = height, width
    scale = _draft(img, resolution) if draft else 1
    img.load()
    img = ImageOps.exif_transpose(img)
    return to_rgb(img), width, height, scale


def _draft(img: Image.Image, resolution: int) -> int:
    """Ask a large JPEG to decode at 1/2, 1/4 or 1/8 scale (DCT scaling, 2-4x faster);
    returns the factor chosen (1 if none). Pillow picks the largest factor that keeps both
    sides >= the request, so the shorter side stays >= resolution."""
    if img.format not in ("JPEG", "MPO") or min(img.size) < 2 * resolution:
        return 1
    raw_width = img.size[0]
    drafted = img.draft("RGB", (resolution, resolution))
    # The draft box is the original's extent in draft pixels: (0, 0, w / s, h / s).
    return round(raw_width / drafted[1][2]) if drafted else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: transparency composited over white, 16/32-bit scaled.

    Raises Rejected("unsupported_mode") for a mode Pillow cannot convert."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_mode_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    try:
        if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
            return _over_white(img.convert("RGBA"))
        return img.convert("RGB")
    except ValueError as e:  # no decoder in ALLOWED_FORMATS yields such a mode today
        raise Rejected("unsupported_mode", f"mode {img.mode}: {e}") from e


def _over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _mode_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    # convert("L") would clip 16-bit values at 255, turning most of the image white.
    if mode == "F":
        # Float images come in [0, 1] (TIFF) or [0, 255] (Pillow's own); guess from range.
        finite = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    # "I" (32-bit) in practice holds 16-bit samples (old Pillow opened 16-bit PNGs so).
    wide = np.clip(values.astype(np.float32), 0, 65535)
    return np.rint(wide / 257.0).astype(np.uint8)


def resize_center_crop(
    img: Image.Image, resolution: int, source_size: tuple[int, int] | None = None, scale: int = 1
) -> np.ndarray:
    """(R, R, 3) uint8: the source resized so its shorter side is R (bicubic,
    antialiased), then a centered crop, floored toward the left/top.

    ``img`` shows a source of ``source_size`` (default: ``img.size``) downscaled by
    ``scale`` (JPEG draft). The crop is mapped back to a box in ``img`` and resized in one
    call, which matches resize-then-crop (within 1/255) and keeps the draft path on the
    same geometry as a full decode. An R x R image is returned without resampling."""
    width, height = source_size or img.size
    if img.size == (resolution, resolution) and scale == 1:
        return np.asarray(img, dtype=np.uint8)
    if width <= height:
        resized = (resolution, max(resolution, round(height * resolution / width)))
    else:
        resized = (max(resolution, round(width * resolution / height)), resolution)
    left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    fx, fy = width / resized[0] / scale, height / resized[1] / scale
    box = (left * fx, top * fy, (left + resolution) * fx, (top + resolution) * fy)
    out = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def caption_text(sample: Sample) -> str | None:
    data = sample.fields.get("txt")
    return None if data is None else data.decode("utf-8", errors="replace")


def metadata_text(sample: Sample) -> str | None:
    data = sample.fields.get("json")
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
        json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return text
