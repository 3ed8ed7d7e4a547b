"""A JPEG header read without Pillow, for the plain files Pillow's parser would read the same way.

Pillow's ``Image.open`` and ``getexif`` cost 0.04 ms per image alone and ~0.1 ms inside the fast
path (its Python parser runs on caches the decode just filled): 4% of a 1024x768 image. Most
JPEGs a pipeline sees, and every one its benchmark encodes, carry only JFIF, tables, a comment
and one frame; for those this scan gives what ``Image.open`` would (size, mode) and no EXIF
orientation. Anything else -- an EXIF/XMP/ICC/Adobe/MPF segment, another frame type, junk or
fill bytes between markers, a segment Pillow would reject -- returns None, and the caller reads
the header with Pillow as before, so every rejection keeps Pillow's reason.
"""

from __future__ import annotations

_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman frames: Pillow's SOF handler
_SKIPPED = {0xC4, 0xDD, 0xFE}  # DHT and DRI (Pillow skips them), COM (Pillow stores it)
_APP0, _DQT, _SOS = 0xE0, 0xDB, 0xDA
_MODES = {1: "L", 3: "RGB"}


def plain_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of a JPEG whose segments before the scan are all of the plain kinds
    Pillow parses without side effects, each well formed; None when Pillow should read it."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos, frame = 2, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, end = data[pos + 1], pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end < pos + 4 or end > len(data):
            return None  # a length under 2 or past the end: Pillow's own reading decides
        segment = data[pos + 4:end]
        if marker == _SOS:
            return frame
        if marker in _SOF:
            if frame is not None:
                return None  # a second frame: Pillow keeps the last, libjpeg refuses
            frame = _frame(segment)
            if frame is None:
                return None
        elif marker == _APP0:
            if segment.startswith(b"JFIF") and len(segment) < 7:
                return None  # Pillow reads the JFIF version unguarded and fails
        elif marker == _DQT:
            if not _tables_complete(segment):
                return None
        elif marker not in _SKIPPED:
            return None
        pos = end
    return None


def _frame(segment: bytes) -> tuple[int, int, str] | None:
    """Width, height and mode of an 8-bit SOF segment with 1 or 3 components, each listed."""
    if len(segment) < 6 or segment[0] != 8 or segment[5] not in _MODES or len(segment) != 6 + 3 * segment[5]:
        return None
    return (segment[3] << 8) | segment[4], (segment[1] << 8) | segment[2], _MODES[segment[5]]


def _tables_complete(segment: bytes) -> bool:
    """Pillow's DQT check: every table (8- or 16-bit entries) is whole."""
    pos = 0
    while pos < len(segment):
        pos += 1 + (64 if segment[pos] < 16 else 128)
        if pos > len(segment):
            return False
    return True
