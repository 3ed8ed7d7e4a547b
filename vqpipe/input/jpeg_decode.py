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

# EXIF orientation -> (flip rows, flip columns, then swap the two axes): what ImageOps.exif_transpose's
# transpose does. One table for the arrays here and the device tensors of ``device_decode``.
EXIF_FLIPS = {
    2: (False, True, False),
    3: (True, True, False),
    4: (True, False, False),
    5: (False, False, True),
    6: (True, False, True),  # rotate 90 degrees clockwise
    7: (True, True, True),
    8: (False, True, True),  # rotate 90 degrees counter-clockwise
}
_AS_STORED = (False, False, False)


def preprocess_jpeg(data: bytes, resolution: int, min_size: int = 0,
                    max_pixels: int | None = None) -> tuple[np.ndarray, int, int] | None:
    """(R, R, 3) uint8 pixels and the oriented original width and height, or None when the
    Pillow path should handle ``data`` (and produce any rejection)."""
    header = read_header(data, min_size, max_pixels)
    if header is None:
        return None
    width, height, orientation = header
    try:
        scale = draft_scale(width, height, resolution)
        # strict: a libjpeg warning (premature end, corrupt data) raises, and Pillow decides.
        decoded = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale),
                                         min_width=-(-width // scale), strict=True)
    except _ERRORS:
        return None
    if decoded.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None  # not the scale asked for: the geometry below would be off
    oriented = orient(decoded, orientation)
    if EXIF_FLIPS.get(orientation, _AS_STORED)[2]:
        width, height = height, width
    return resize_center_crop(oriented, resolution, (width, height), scale), width, height


def read_header(data: bytes, min_size: int, max_pixels: int | None) -> tuple[int, int, int | None] | None:
    """Stored width, height and EXIF orientation of a JPEG this path takes, else None (the Pillow
    path decides: another format or mode, a limit, a header Pillow cannot parse)."""
    try:
        return _header(data, min_size, max_pixels)
    except _ERRORS:
        return None


def _header(data: bytes, min_size: int, max_pixels: int | None) -> tuple[int, int, int | None] | None:
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


def orient(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """An (H, W, C) array as EXIF ``orientation`` says it is shown (a view, no copy)."""
    rows, columns, swap = EXIF_FLIPS.get(orientation, _AS_STORED)
    pixels = pixels[::-1] if rows else pixels
    pixels = pixels[:, ::-1] if columns else pixels
    return pixels.transpose(1, 0, 2) if swap else pixels


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
    if pixels.shape[:2] == (resolution, resolution) and scale == 1:
        return np.ascontiguousarray(pixels)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)  # channels_last view
    # Into a channels_last (HWC) buffer: that skips the kernel's conversion to NCHW and a transposing
    # copy back (0.5 of 1.4 ms at 1024x768 / 2).
    crop = resize_box(x, resolution, source_size, scale, channels_last=True)
    return np.ascontiguousarray(crop[0].permute(1, 2, 0).numpy())


def crop_plan(width: int, height: int, resolution: int) -> tuple[tuple[int, int], int, int]:
    """The size the source is resized to (shorter side ``resolution``) and the left and top of
    the centered ``resolution`` square in it, floored toward the left/top."""
    if width <= height:
        resized = (resolution, max(resolution, round(height * resolution / width)))
    else:
        resized = (max(resolution, round(width * resolution / height)), resolution)
    return resized, (resized[0] - resolution) // 2, (resized[1] - resolution) // 2


def resize_box(x: torch.Tensor, resolution: int, source_size: tuple[int, int], scale: int,
               channels_last: bool = False) -> torch.Tensor:
    """The center crop, antialiased bicubic: ``x`` (1, C, H, W) shows ``source_size`` at 1/``scale``;
    returns the (1, C, R, R) crop, a view of a resize that starts at the source's top left. uint8
    runs torch's SIMD port of Pillow's filter (CPU only); float runs the same filter on any device."""
    width, height = source_size
    resized, left, top = crop_plan(width, height, resolution)
    # The aten op, not F.interpolate: it takes the output size and the scales together, so rounding
    # in size * scale never loses the last row. But where an output side equals the input's, the CPU
    # kernel skips that axis whatever the scale says (a 320x213 photo to 256: 64 + 256 columns of
    # 320, which must be stretched by 385/320): one spare column or row keeps the pass.
    size = [top + resolution, left + resolution]
    size = [n + (n == have) for n, have in zip(size, x.shape[-2:])]
    scales = (resized[1] * scale / height, resized[0] * scale / width)
    out = torch.empty((*x.shape[:2], *size), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.ops.aten._upsample_bicubic2d_aa.out(x, size, False, *scales, out=out)
    return out[..., top:top + resolution, left:left + resolution]
