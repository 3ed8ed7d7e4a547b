"""The fast path of image preprocessing, for JPEGs in RGB or grayscale: same pixels, half the time.

libjpeg-turbo decodes through simplejpeg at the power-of-two DCT scale Pillow's ``draft`` would
pick, and torch's uint8 antialiased bicubic resize (a SIMD port of Pillow's filter) maps the
same crop box, so the result matches ``images.resize_center_crop`` to within rounding (measured
mean absolute difference <= 0.2/255 on photos). Pillow reads every header but the plain JFIF
ones ``jpeg_header`` reads as Pillow would: its checks, its EXIF parser and its format sniffing stay
the ones the hostile-input suite pins down.

``preprocess_jpeg`` returns None for anything it does not handle (another format, CMYK, MPO, a
header that breaks a limit, any decoder error); the caller then runs the Pillow path, so every
failure keeps the reason and message it had before.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import simplejpeg
import torch
from PIL import Image

from vqpipe.input.jpeg_header import plain_header

# What simplejpeg (strict: libjpeg warnings such as a premature end raise) and Pillow's header
# parser raise on malformed input; anything else is a programmer error and propagates.
_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, zlib.error, Image.DecompressionBombError,
           Image.DecompressionBombWarning)

_MODES = ("RGB", "L")  # CMYK and YCCK go to Pillow, which inverts Adobe CMYK correctly

# EXIF orientation -> the array view ImageOps.exif_transpose's transpose gives, on (H, W, C).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def preprocess_jpeg(data: bytes, resolution: int, min_size: int = 0,
                    max_pixels: int | None = None) -> tuple[np.ndarray, int, int] | None:
    """(R, R, 3) uint8 pixels and the oriented original width and height, or None when the
    Pillow path should handle ``data`` (and produce any rejection)."""
    try:
        header = _header(data, min_size, max_pixels)
        if header is None:
            return None
        width, height, orientation = header
        scale = draft_scale(width, height, resolution)
        # strict: a libjpeg warning (premature end, corrupt data) raises, and Pillow decides.
        decoded = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale),
                                         min_width=-(-width // scale), strict=True)
    except _ERRORS:
        return None
    if decoded.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None  # not the scale asked for: the geometry below would be off
    oriented = _ORIENT.get(orientation, lambda a: a)(decoded)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return resize_center_crop(oriented, resolution, (width, height), scale), width, height


def _header(data: bytes, min_size: int, max_pixels: int | None) -> tuple[int, int, int | None] | None:
    """Stored width, height and EXIF orientation of a JPEG this path takes, else None."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None  # not a JPEG: skip Pillow's format sniffing twice
    plain = plain_header(data)  # a plain JFIF (no EXIF): Pillow's parser would read the same, slower
    img = None if plain else _open(data)
    width, height, mode = plain or (*img.size, img.mode if img.format == "JPEG" else None)  # None: MPO
    limit = min(max_pixels or math.inf, Image.MAX_IMAGE_PIXELS or math.inf)
    if mode not in _MODES or width * height > limit \
            or min(width, height) < max(min_size, 1):  # a zero side would divide by zero in the geometry
        return None
    return width, height, None if img is None else img.getexif().get(0x0112)


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=("JPEG",))


def draft_scale(width: int, height: int, resolution: int) -> int:
    """The factor Pillow's ``draft`` picks for a (resolution, resolution) request: the largest of
    1, 2, 4, 8 that keeps both sides >= resolution, and 1 below twice the resolution (as
    ``images._draft``)."""
    scale = 1
    if min(width, height) >= 2 * resolution:
        while scale < 8 and min(width, height) // (2 * scale) >= resolution:
            scale *= 2
    return scale


def resize_center_crop(pixels: np.ndarray, resolution: int, source_size: tuple[int, int], scale: int) -> np.ndarray:
    """``images.resize_center_crop`` on an (H, W, 3) uint8 array showing ``source_size`` at 1/scale.

    Explicit scale factors (not the array's size ratio) map output to input, so a decode whose
    last block is partial (odd sizes) keeps the geometry of a full decode."""
    width, height = source_size
    if pixels.shape[:2] == (resolution, resolution) and scale == 1:
        return np.ascontiguousarray(pixels)
    if width <= height:
        resized = (resolution, max(resolution, round(height * resolution / width)))
    else:
        resized = (max(resolution, round(width * resolution / height)), resolution)
    left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)  # channels_last view
    out = np.empty((top + resolution, left + resolution, 3), np.uint8)
    # The aten op, not F.interpolate: it takes the output size and the scales together, so rounding
    # in size * scale never loses the last row; and writing into a channels_last (HWC) buffer skips
    # the kernel's conversion to NCHW and a transposing copy back (0.5 of 1.4 ms at 1024x768 / 2).
    torch.ops.aten._upsample_bicubic2d_aa.out(x, list(out.shape[:2]), False, resized[1] * scale / height,
                                              resized[0] * scale / width,
                                              out=torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0))
    return np.ascontiguousarray(out[top:, left:])
