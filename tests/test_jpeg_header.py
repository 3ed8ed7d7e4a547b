"""``jpeg_header.plain_header``: whenever it reads a header, Pillow's ``Image.open`` reads the same
size and mode with no EXIF orientation; everything else is left to Pillow (hypothesis flips
bytes in real headers, as ``test_jpeg_decode.py`` does for the whole fast path)."""

from __future__ import annotations

import collections
import functools
import io
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import shardfactory as sf
from vqpipe.input.jpeg_header import plain_header


def _with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    """``data`` with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


@functools.cache
def plain_inputs() -> dict[str, bytes]:
    photo = sf.photo("coffee", (96, 72))
    baseline = sf.jpeg_bytes(photo)
    return {"baseline": baseline, "gray": sf.jpeg_bytes(photo.convert("L")),
            "progressive": sf.encode(photo, "JPEG", progressive=True),
            "restart_and_comment": sf.encode(photo, "JPEG", restart_marker_blocks=4, comment=b"hi"),
            "no_jfif": sf.encode(photo, "JPEG", quality=80)[:2] + baseline[2 + 18:]}


def pillow_reads(data: bytes) -> tuple[int, int, str]:
    img = Image.open(io.BytesIO(data), formats=("JPEG",))
    assert img.format == "JPEG" and img.getexif().get(0x0112) is None
    return (*img.size, img.mode)


@pytest.mark.parametrize("name", sorted(plain_inputs()))
def test_reads_plain_jpegs_as_pillow_does(name):
    data = plain_inputs()[name]
    assert plain_header(data) == pillow_reads(data) != (0, 0, "")


@functools.cache
def pillow_only_inputs() -> dict[str, bytes]:
    photo = sf.photo("coffee", (96, 72))
    baseline = sf.jpeg_bytes(photo)
    jfif_end = 2 + 18  # SOI, then Pillow's 16-byte JFIF APP0 segment
    return {
        "exif": sf.jpeg_bytes(photo, exif_orientation=6),
        "xmp": _with_segment(baseline, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"),
        "icc": sf.encode(photo, "JPEG", icc_profile=b"\x00" * 128),
        "adobe": _with_segment(baseline, 0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01"),
        "mpf": _with_segment(baseline, 0xE2, b"MPF\x00" + b"\x00" * 16),
        "cmyk": sf.jpeg_bytes(photo.convert("CMYK")),
        "short_jfif": baseline[:2] + b"\xff\xe0\x00\x06JFIF" + baseline[jfif_end:],
        "fill_bytes": baseline[:jfif_end] + b"\xff" + baseline[jfif_end:],
        "junk_between_markers": baseline[:jfif_end] + b"\x00" + baseline[jfif_end:],
        "truncated_before_scan": baseline[:baseline.index(b"\xff\xda") + 3],
        "twelve_bit_frame": baseline.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1),
        "two_frames": baseline.replace(b"\xff\xda", baseline[baseline.index(b"\xff\xc0"):][:19] + b"\xff\xda", 1),
        "short_quantization_table": baseline.replace(b"\xff\xdb\x00\x43", b"\xff\xdb\x00\x42", 1),
    }


@pytest.mark.parametrize("name", sorted(pillow_only_inputs()))
def test_leaves_everything_else_to_pillow(name):
    assert plain_header(pillow_only_inputs()[name]) is None


def test_the_fixtures_say_what_they_claim():
    # The Pillow-only cases differ from the plain ones where named: Pillow still opens these.
    inputs = pillow_only_inputs()
    assert Image.open(io.BytesIO(inputs["exif"])).getexif().get(0x0112) == 6
    assert Image.open(io.BytesIO(inputs["cmyk"])).mode == "CMYK"
    with pytest.raises(OSError):  # Pillow: "cannot handle 12-bit layers", reported as unidentified
        Image.open(io.BytesIO(inputs["twelve_bit_frame"]))


READ: collections.Counter = collections.Counter()


@settings(max_examples=400, deadline=timedelta(seconds=5), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(plain_inputs())), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)),
                                                         min_size=1, max_size=4), st.integers(0, 1 << 16))
def test_damaged_headers_read_as_pillow_reads_them_or_not_at_all(name, flips, cut):
    data = bytearray(plain_inputs()[name])
    header = data.index(b"\xff\xda") + 14  # the scan header and a few entropy-coded bytes
    for position, mask in flips:
        data[position % header] ^= mask
    damaged = bytes(data[: max(3, cut % (len(data) + 1))])
    ours = plain_header(damaged)
    READ[ours is not None] += 1
    if ours is not None:
        assert ours == pillow_reads(damaged)


def test_damaged_headers_are_often_read():
    # Runs after the test above (file order): without it that one could pass by reading nothing.
    if not READ:
        pytest.skip("run with the damaged-header test")
    assert READ[True] >= 100, dict(READ)
