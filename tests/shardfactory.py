"""Real WebDataset shards built from real photos, for tests.

Photos are scikit-image's bundled images (no network), encoded with Pillow in memory.
``hostile_cases()`` is the catalogue of bad inputs a LAION-style crawl contains, each with
the outcome vqpipe defines for it; ``write_tar(path, hostile_members())`` makes one shard
holding all of them next to good samples. Outcomes assume ``HOSTILE_RESOLUTION`` and
``HOSTILE_MIN_SIZE`` and the default image keys.
"""

from __future__ import annotations

import functools
import io
import struct
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

HOSTILE_RESOLUTION = 64
HOSTILE_MIN_SIZE = 16

Member = tuple[str, bytes | None]  # (tar member name, data); None makes a directory


@functools.cache
def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    """A bundled scikit-image photo (``astronaut``, ``chelsea``, ``coffee``, ``rocket``: RGB;
    ``camera``: grayscale), optionally resized to ``size`` = (width, height)."""
    img = _photo(name)
    return img.resize(size, Image.Resampling.BICUBIC) if size else img.copy()


def encode(img: Image.Image, fmt: str, **save_args: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 90, exif_orientation: int | None = None) -> bytes:
    """JPEG bytes; ``exif_orientation`` writes the EXIF Orientation tag (pixels unchanged)."""
    if exif_orientation is None:
        return encode(img, "JPEG", quality=quality)
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    return encode(img, "JPEG", quality=quality, exif=exif.tobytes())


def png_bytes(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def webp_bytes(img: Image.Image, quality: int = 90) -> bytes:
    return encode(img, "WEBP", quality=quality)


def bomb_png(width: int, height: int) -> bytes:
    """A genuine, valid 1-bit black PNG of ``width`` x ``height``: a few KB on disk, but
    ``width * height`` pixels once decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    zipper = zlib.compressobj(9)
    idat = b"".join(zipper.compress(row) for _ in range(height)) + zipper.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tar_bytes(members: Sequence[Member], gzip: bool = False, format: int = tarfile.PAX_FORMAT,
              extra: Sequence[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    """A tar (or tar.gz) holding ``members`` in order, with fixed mtimes, in tarfile's ``format``;
    ``extra`` members (any TarInfo, e.g. links or odd types) come last."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_tar(path: Path | str, members: Sequence[Member], gzip: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members, gzip))
    return path


def good_members(key: str, name: str = "chelsea", caption: str = "a photo") -> list[Member]:
    """One ordinary sample: JPEG, caption, JSON metadata."""
    meta = f'{{"key": "{key}", "photo": "{name}"}}'.encode()
    return [(f"{key}.jpg", jpeg_bytes(photo(name))), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


@dataclass(frozen=True)
class Case:
    """One hostile input. ``expected`` is ``"ok"``, ``"skipped"`` (no sample and no
    failure: directories), or the Failure reason; the failure's key is ``key``."""

    key: str
    members: tuple[Member, ...]
    expected: str
    note: str


@functools.cache
def hostile_cases() -> tuple[Case, ...]:
    """The hostile catalogue, in shard order (the duplicate key relies on that order)."""
    cat, gray = photo("chelsea"), photo("camera")
    rgba = photo("coffee").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    palette = photo("rocket").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good = jpeg_bytes(cat)
    rng = np.random.default_rng(0)

    def one(key: str, ext: str, data: bytes | None, expected: str, note: str) -> Case:
        return Case(key, ((f"{key}.{ext}", data),), expected, note)

    return (
        Case("good", tuple(good_members("good")), "ok", "JPEG + caption + JSON"),
        one("truncated_jpeg", "jpg", good[: len(good) // 2], "decode_error", "cut in half"),
        one("zero_bytes", "jpg", b"", "empty", "0-byte image member"),
        one("random_bytes", "jpg", rng.bytes(2048), "decode_error", "not an image"),
        one("text_only", "txt", b"a caption without an image", "no_image", "no image field"),
        one("one_pixel", "png", png_bytes(Image.new("RGB", (1, 1))), "too_small", "1x1"),
        one("rgba_png", "png", png_bytes(rgba), "ok", "alpha gradient, composited over white"),
        one("palette_png", "png", png_bytes(palette), "ok", "mode P"),
        one("gray_jpeg", "jpg", jpeg_bytes(gray), "ok", "mode L"),
        one("cmyk_jpeg", "jpg", jpeg_bytes(cat.convert("CMYK")), "ok", "Adobe CMYK JPEG"),
        one("png16", "png", png_bytes(sixteen_bit(gray)), "ok", "I;16 grayscale PNG"),
        one("webp", "webp", webp_bytes(cat), "ok", "WEBP"),
        one("png_as_jpg", "jpg", png_bytes(cat), "ok", "PNG bytes under .jpg, common in crawls"),
        one("big_jpeg", "jpg", jpeg_bytes(photo("astronaut", (5000, 3000))), "ok", "15 MP, DCT-scaled"),
        one("exif_rot6", "jpg", jpeg_bytes(cat, exif_orientation=6), "ok", "stored 451x300, shown 300x451"),
        one("bomb_warning", "png", bomb_png(10_000, 10_000), "too_large", "1e8 px: Pillow only warns"),
        one("bomb_error", "png", bomb_png(20_000, 20_000), "too_large", "4e8 px: Pillow raises"),
        one("eps", "jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "decode_error",
            "EPS would run Ghostscript; not an allowed format"),
        Case("latin1_caption", (("latin1_caption.jpg", good), ("latin1_caption.txt", b"caf\xe9 cr\xe8me")),
             "ok", "non-UTF-8 caption, decoded with replacement characters"),
        Case("bad_json", (("bad_json.jpg", good), ("bad_json.json", b"{not json")), "ok", "metadata None"),
        Case("UPPER", (("UPPER.JPG", good),), "ok", "extensions are lowercased"),
        Case("repeat", (("repeat.jpg", good), ("repeat.jpg", b"garbage")), "ok", "first field wins"),
        one("dup", "jpg", good, "ok", "first sample with key dup"),
        one("between", "jpg", good, "ok", "separates the two dup samples"),
        one("dup", "jpg", rng.bytes(64), "duplicate_key", "dup again, not consecutive: dropped"),
        Case("sub", (("sub", None),), "skipped", "directory member"),
        one("sub/nested", "jpg", good, "ok", "key keeps its folder"),
        Case("../evil.jpg", (("../evil.jpg", good),), "bad_member_name", "path traversal"),
        Case("/abs.jpg", (("/abs.jpg", good),), "bad_member_name", "absolute path"),
        Case("noext", (("noext", good),), "bad_member_name", "no extension"),
    )


def sixteen_bit(gray: Image.Image) -> Image.Image:
    """The 8-bit grayscale image spread over the full 16-bit range (x * 257)."""
    return Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)


def hostile_members() -> list[Member]:
    return [m for case in hostile_cases() for m in case.members]


def expected_outcomes() -> list[tuple[str, str]]:
    """Sorted (key, outcome) pairs for the hostile shard, directories left out."""
    return sorted((c.key, c.expected) for c in hostile_cases() if c.expected != "skipped")
