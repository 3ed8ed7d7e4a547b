"""Hostile input, systematically.

Hypothesis cuts and flips bytes of a real shard (JPEG, PNG and WEBP photos with captions and
metadata; plain, gzip, bzip2 and xz) and of real images in every allowed format. Whatever it does:

- nothing but ``ShardError`` leaves the shard loop, and nothing at all leaves ``preprocess``;
- every sample the reader yields is either preprocessed or a ``Failure`` with a known reason;
- a cut shard yields only complete, unaltered samples, in order, then raises;
- flips inside member data keep every sample (the tar structure is intact);
- each example finishes within ``DEADLINE`` (a hang fails the test).

The defined-outcome tests below add what ``shardfactory.hostile_cases`` lacks: members outside
any sample, links and devices, non-UTF-8 names, giant ICC profiles and EXIF blocks, images whose
header claims 100 megapixels, and metadata JSON nested too deep to parse.

The default run is derandomized (the same examples every time, CI stays stable); the ``slow``
variants draw 20x as many fresh ones. ``pytest tests/test_fuzz.py -s`` prints the case counts.
"""

from __future__ import annotations

import bz2
import collections
import functools
import io
import json
import lzma
import struct
import tarfile
import time
import typing
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import shardfactory as sf
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model
from vqpipe.input.images import preprocess
from vqpipe.records import Failure, FailureReason, Preprocessed, Sample, ShardError, ShardErrorReason
from vqpipe.run.shard_job import make_settings, process_shard
from vqpipe.input.shards import iter_samples

RESOLUTION = 32
# Per example. A real hang runs for ever; the slack is for a CI runner whose 2 cores are shared.
DEADLINE = timedelta(seconds=5)
REASONS = set(typing.get_args(FailureReason))
SHARD_REASONS = set(typing.get_args(ShardErrorReason))
IMAGE_REASONS = {"decode_error", "too_large", "too_small", "unsupported_mode"}
CASES: collections.Counter = collections.Counter()  # property -> examples checked


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    yield
    print(f"\nfuzz cases run: {sum(CASES.values())} {dict(sorted(CASES.items()))}")


def fuzz_tests(check, strategy, examples: int):
    """``(test, slow_test)``: ``check`` over ``examples`` derandomized cases, and over 20x as many
    random ones (marked slow)."""

    def make(n: int, derandomize: bool):
        @settings(max_examples=n, deadline=DEADLINE, derandomize=derandomize, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(strategy)
        def test(case):
            check(case)
            CASES[check.__name__] += 1

        test.__doc__ = check.__doc__
        return test

    return make(examples, True), pytest.mark.slow(make(20 * examples, False))


# -- the shard under attack --------------------------------------------------------------------------

@functools.cache
def originals() -> tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...]:
    """``(key, ((field, bytes), ...))`` of four real samples, in tar order."""
    encoders = {"jpg": sf.jpeg_bytes, "png": sf.png_bytes, "webp": sf.webp_bytes}
    out = []
    for i, (name, field) in enumerate([("chelsea", "jpg"), ("coffee", "png"), ("rocket", "webp"),
                                       ("astronaut", "jpg")]):
        image = encoders[field](sf.photo(name, (48, 36)))
        meta = json.dumps({"i": i, "photo": name}).encode()
        out.append((f"s{i:02d}", ((field, image), ("txt", f"caption {i}".encode()), ("json", meta))))
    return tuple(out)


@functools.cache
def shard(gzip: bool = False) -> bytes:
    return sf.tar_bytes([(f"{key}.{field}", data) for key, fields in originals() for field, data in fields], gzip)


@dataclass(frozen=True)
class Layout:
    data_spans: tuple[tuple[int, int], ...]  # [start, end) of each member's data
    sample_ends: tuple[int, ...]  # offset where each sample's last member's data ends
    end_of_archive: int  # offset of the first all-zero block


@functools.cache
def layout() -> Layout:
    with tarfile.open(fileobj=io.BytesIO(shard())) as tar:
        members = tar.getmembers()
    spans = tuple((m.offset_data, m.offset_data + m.size) for m in members)
    ends = tuple(spans[3 * i + 2][1] for i in range(len(originals())))
    last = members[-1]
    return Layout(spans, ends, last.offset_data + -(-last.size // 512) * 512)


@functools.cache
def data_positions() -> list[int]:
    return [p for start, end in layout().data_spans for p in range(start, end)]


def read(data: bytes) -> tuple[list[Sample], list[Failure], ShardError | None]:
    """Everything the reader makes of ``data``: the samples yielded, the failures recorded and the
    ShardError, if one ended the stream. Any other exception propagates (and fails the test)."""
    fsspec.filesystem("memory").pipe_file("/fuzz/shard.tar", data)
    samples: list[Sample] = []
    failures: list[Failure] = []
    try:
        for sample in iter_samples("memory://fuzz/shard.tar", {}, failures.append):
            samples.append(sample)
    except ShardError as err:
        return samples, failures, err
    return samples, failures, None


def account(samples: list[Sample], failures: list[Failure], error: ShardError | None) -> list[str]:
    """Check that every yielded sample is preprocessed or failed with a known reason; returns the
    outcome of each sample ("ok" or the reason)."""
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)), "a key was yielded twice"
    assert {f.reason for f in failures} <= REASONS
    assert error is None or error.reason in SHARD_REASONS
    outcomes = []
    for sample in samples:
        result = preprocess(sample, resolution=RESOLUTION)
        if isinstance(result, Failure):
            assert result.key == sample.key and result.reason in REASONS and result.message
            outcomes.append(result.reason)
        else:
            assert isinstance(result, Preprocessed) and result.key == sample.key
            assert result.pixels.shape == (RESOLUTION, RESOLUTION, 3) and result.pixels.dtype == np.uint8
            outcomes.append("ok")
    return outcomes


def _as_tuples(samples: list[Sample]):
    return tuple((s.key, tuple(s.fields.items())) for s in samples)


def flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


# -- properties of the shard reader -------------------------------------------------------------------

def cut_shard(cut: int) -> None:
    """A shard cut anywhere before its end-of-archive block yields a prefix of its samples,
    byte-identical, never the one being read at the cut, then raises truncated/corrupt."""
    samples, failures, error = read(shard()[:cut])
    account(samples, failures, error)
    assert failures == []
    complete = sum(end <= cut for end in layout().sample_ends)
    assert _as_tuples(samples) == originals()[: len(samples)]
    if cut >= layout().end_of_archive + 512:
        assert error is None and len(samples) == len(originals())
    else:
        assert error is not None and error.reason in {"truncated_tar", "corrupt_tar"}
        assert len(samples) <= complete


def flip_anywhere(flips: list[tuple[int, int]]) -> None:
    """Flipped bytes anywhere (headers included): ShardError or a finished stream, every yielded
    sample accounted for."""
    account(*read(flipped(shard(), flips)))


def flip_member_data(flips: list[tuple[int, int]]) -> None:
    """Flips inside member data leave the tar intact: every sample comes out, in order, and is
    preprocessed or fails as an image would."""
    positions = data_positions()
    data = flipped(shard(), [(positions[i % len(positions)], mask) for i, mask in flips])
    samples, failures, error = read(data)
    outcomes = account(samples, failures, error)
    assert error is None and failures == []
    assert [s.key for s in samples] == [key for key, _ in originals()]
    assert set(outcomes) <= {"ok"} | IMAGE_REASONS


def damage_compressed(case: tuple[str, int, list[tuple[int, int]]]) -> None:
    """A gzip, bzip2 or xz shard cut and/or flipped: ShardError or a finished stream, samples
    accounted for; a gzip stream cut before the tar's end never passes as complete."""
    codec, cut, flips = case
    data = compressed(codec)
    damaged = flipped(data, flips)[:cut] if flips else data[:cut]
    samples, failures, error = read(damaged)
    account(samples, failures, error)
    if codec == "gz" and not flips:
        tar_bytes_left = len(zlib.decompressobj(wbits=31).decompress(damaged))
        assert (error is None) == (tar_bytes_left >= layout().end_of_archive + 512)


@functools.cache
def compressed(codec: str) -> bytes:
    return {"gz": lambda: shard(gzip=True), "bz2": lambda: bz2.compress(shard()),
            "xz": lambda: lzma.compress(shard())}[codec]()


@pytest.mark.parametrize("header", [b"\x1f\x8b\x08", b"\x1f\x8b\x08\x04" + bytes(6) + b"\x05"],
                         ids=["cut_after_method", "cut_inside_extra_length"])
def test_gzip_cut_inside_its_header_is_a_shard_error(header):
    """Found by the fuzzer: CPython's tarfile raised TypeError on these."""
    samples, failures, error = read(header)
    assert (samples, failures, error.reason) == ([], [], "truncated_tar")


_size = len(shard())
test_cut_shard, test_cut_shard_deep = fuzz_tests(cut_shard, st.integers(0, _size - 1), 150)
_flips = st.lists(st.tuples(st.integers(0, _size - 1), st.integers(1, 255)), min_size=1, max_size=8)
test_flip_anywhere, test_flip_anywhere_deep = fuzz_tests(flip_anywhere, _flips, 200)
test_flip_member_data, test_flip_member_data_deep = fuzz_tests(flip_member_data, _flips, 100)
_longest = max(len(compressed(c)) for c in ("gz", "bz2", "xz"))
_compressed_case = st.tuples(st.sampled_from(["gz", "bz2", "xz"]), st.integers(0, _longest),
                             st.lists(st.tuples(st.integers(0, _longest), st.integers(1, 255)), max_size=4))
test_damaged_compressed, test_damaged_compressed_deep = fuzz_tests(damage_compressed, _compressed_case, 100)


# -- properties of the image decoder ------------------------------------------------------------------

@functools.cache
def images() -> dict[str, bytes]:
    """One real photo in every format the decoder accepts, and a few modes."""
    photo = sf.photo("coffee", (40, 30))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    return {
        "jpeg": sf.jpeg_bytes(photo), "jpeg_exif6": sf.jpeg_bytes(photo, exif_orientation=6),
        "jpeg_progressive": sf.encode(photo, "JPEG", progressive=True),
        "cmyk_jpeg": sf.jpeg_bytes(photo.convert("CMYK")), "png": sf.png_bytes(photo), "png_rgba": sf.png_bytes(rgba),
        "png16": sf.png_bytes(sf.sixteen_bit(photo.convert("L"))), "webp": sf.webp_bytes(photo),
        "gif": sf.encode(photo.convert("P"), "GIF"), "bmp": sf.encode(photo, "BMP"),
        "tiff": sf.encode(photo, "TIFF"), "tiff_lzw": sf.encode(photo, "TIFF", compression="tiff_lzw"),
    }


def damage_image(case: tuple[str, int, list[tuple[int, int]]]) -> None:
    """A real image cut and/or flipped: preprocessed to (R, R, 3) uint8, or failed with an image
    reason -- never an exception."""
    name, cut, flips = case
    data = images()[name]
    damaged = flipped(data, flips)[: max(1, cut % (len(data) + 1))] if cut >= 0 else flipped(data, flips)
    samples = [Sample("k", {"jpg": damaged}, "fuzz")]
    assert set(account(samples, [], None)) <= {"ok"} | IMAGE_REASONS


_image_case = st.tuples(st.sampled_from(sorted(images())), st.integers(-1, 1 << 20),
                        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=6))
test_damaged_image, test_damaged_image_deep = fuzz_tests(damage_image, _image_case, 400)


# -- defined outcomes the hostile catalogue lacks -----------------------------------------------------

Link = tuple[str, str]  # (kind, target) for symlink / hardlink / fifo members


def tar_with(members: list[tuple[str, bytes | Link]]) -> bytes:
    """A GNU tar whose names may carry any bytes (as lone surrogates), with links and fifos."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if isinstance(data, tuple):
                kind, target = data
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
                info.linkname = target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def claims_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF header patched to claim ``width`` x ``height`` (the scan is unchanged)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for an 8-bit RGB ``width`` x ``height`` image, with one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * 3 * width)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_exif(image: Image.Image, fmt: str, description_bytes: int, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "x" * description_bytes  # ImageDescription
    return sf.encode(image, fmt, exif=exif.tobytes())


def corrupt_exif_jpeg(jpeg: bytes) -> bytes:
    """An APP1 EXIF segment whose first IFD offset points 4 GB past the end."""
    body = b"Exif\0\0" + b"II\x2a\0" + struct.pack("<I", 0xFFFFFF00)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


@functools.cache
def extra_cases() -> tuple[sf.Case, ...]:
    photo = sf.photo("chelsea", (64, 48))
    good = sf.jpeg_bytes(photo)
    rng = np.random.default_rng(0)

    def one(key: str, ext: str, data: bytes, expected: str, note: str) -> sf.Case:
        return sf.Case(key, ((f"{key}.{ext}", data),), expected, note)

    return (
        sf.Case("README", (("README", b"This shard was made by ..."),), "bad_member_name",
                "a file outside any sample, first in the tar"),
        sf.Case(".jpg", ((".jpg", good),), "bad_member_name", "no key: only an extension"),
        sf.Case("dir/.txt", (("dir/.txt", b"x"),), "bad_member_name", "no key inside a folder"),
        sf.Case("LICENSE", (("LICENSE.md", b"CC-BY"),), "no_image", "a stray file with an extension: a sample"),
        sf.Case("a/../../b.jpg", (("a/../../b.jpg", good),), "bad_member_name", "traversal mid-path"),
        sf.Case("caf\\xe9.jpg", (("caf\udce9.jpg", good),), "bad_member_name", "a Latin-1 member name"),
        sf.Case("link", (("link.jpg", ("symlink", "/etc/passwd")), ("link.txt", b"t")), "no_image",
                "a symlink is never followed: its sample has no image"),
        sf.Case("hard", (("hard.jpg", ("hardlink", "README")), ("hard.txt", b"t")), "no_image",
                "a hardlink is never resolved"),
        sf.Case("fifo", (("fifo.jpg", ("fifo", "")),), "skipped", "a fifo is not a member to read"),
        sf.Case("deep_json", (("deep_json.jpg", good), ("deep_json.json", b"[" * 200_000)), "ok",
                "JSON nested past the recursion limit: metadata None"),
        sf.Case("huge_caption", (("huge_caption.jpg", good), ("huge_caption.txt", b"\xff\xfe" * 2**19)), "ok",
                "1 MiB of non-UTF-8 caption"),
        one("icc_1mb", "jpg", sf.encode(photo, "JPEG", icc_profile=rng.bytes(2**20)), "ok",
            "1 MiB ICC profile over 17 APP2 segments"),
        one("icc_4mb", "jpg", sf.encode(photo, "JPEG", icc_profile=rng.bytes(4 * 2**20)), "ok",
            "4 MiB ICC (real ones are a few KB): 65 APP2 segments"),
        one("icc_webp", "webp", sf.encode(photo, "WEBP", icc_profile=rng.bytes(4 * 2**20)), "ok", "4 MiB ICCP chunk"),
        one("icc_png_bomb", "png", sf.encode(photo, "PNG", icc_profile=bytes(64 * 2**20)), "decode_error",
            "64 MiB of ICC deflated into 64 KB: Pillow refuses to inflate past 1 MiB"),
        one("exif_jpeg_60k", "jpg", with_exif(photo, "JPEG", 60_000), "ok", "EXIF filling its 64 KB segment"),
        one("exif_png_4mb", "png", with_exif(photo, "PNG", 4 * 2**20), "ok", "4 MiB eXIf chunk"),
        one("exif_webp_4mb", "webp", with_exif(photo, "WEBP", 4 * 2**20), "ok", "4 MiB EXIF chunk"),
        one("exif_corrupt", "jpg", corrupt_exif_jpeg(good), "ok", "IFD offset past the end: EXIF ignored"),
        one("jpeg_claims_100mp", "jpg", claims_size(good, 10_000, 10_000), "too_large",
            "SOF header claims 10000x10000: rejected before decoding"),
        one("png_claims_100mp", "png", png_claiming(10_000, 10_000), "too_large",
            "IHDR claims 10000x10000 RGB: rejected before decoding"),
        one("png_claims_20mp", "png", png_claiming(5_000, 4_000), "ok",
            "under the pixel limit with one row of data: Pillow decodes the rest as black"),
    )


def outcomes_of(data: bytes) -> tuple[dict[str, str], ShardError | None]:
    """key -> "ok" or the failure reason, for every sample and failure of a shard."""
    samples, failures, error = read(data)
    results = dict(zip((s.key for s in samples), account(samples, failures, error)))
    return results | {f.key: f.reason for f in failures}, error


def test_extra_hostile_cases_have_their_defined_outcomes():
    cases = extra_cases()
    started = time.perf_counter()
    got, error = outcomes_of(tar_with([m for case in cases for m in case.members]))
    assert error is None
    assert got == {c.key: c.expected for c in cases if c.expected != "skipped"}
    assert time.perf_counter() - started < 30  # 100 MP claims never decode; the rest are small


def test_exif_orientation_survives_a_giant_exif_block():
    sample = Sample("k", {"png": with_exif(sf.photo("chelsea", (64, 48)), "PNG", 4 * 2**20)}, "x")
    result = preprocess(sample, resolution=RESOLUTION)
    assert (result.width, result.height) == (48, 64)  # orientation 6 read from the 4 MiB block


def test_metadata_that_does_not_parse_is_dropped_not_the_sample():
    fields = {"jpg": sf.jpeg_bytes(sf.photo("coffee", (40, 30)))}
    for bad in (b"[" * 200_000, b"{not json", b"\xff\xfe{}", b'{"a": NaN'):
        result = preprocess(Sample("k", fields | {"json": bad}, "x"), resolution=RESOLUTION)
        assert isinstance(result, Preprocessed) and (result.metadata is None or bad == b'{"a": NaN')


def test_hostile_extras_commit_through_process_shard(tmp_path, tiny_model_path):
    """The extras in one shard, encoded and committed: odd keys and failure records survive
    Parquet and the JSON marker (``test_shard_job`` does the same for the hostile catalogue)."""
    members = [m for case in extra_cases() for m in case.members]
    path = tmp_path / "hostile.tar"
    path.write_bytes(tar_with(members))
    model = load_model(ModelConfig(path=tiny_model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=sf.HOSTILE_RESOLUTION,
                                                              min_size=sf.HOSTILE_MIN_SIZE),
                   OutputConfig(path=str(tmp_path / "out")), model, "fp32")
    with ThreadPoolExecutor(2) as pool:
        result = process_shard(str(path), "hostile", job, encoder, pool)
    expected = [(c.key, c.expected) for c in extra_cases() if c.expected != "skipped"]
    written = pq.read_table(tmp_path / "out" / "hostile.parquet").column("key").to_pylist()
    assert sorted(written) == sorted(k for k, o in expected if o == "ok")
    assert sorted((f["key"], f["reason"]) for f in result.failures) == sorted((k, o) for k, o in expected if o != "ok")
    marker = json.loads((tmp_path / "out" / "_vqpipe" / "shards" / "hostile.json").read_text())
    assert marker["rows"] == len(written) and marker["failed"] == len(result.failures)


@pytest.mark.slow
@pytest.mark.parametrize("size, make, expected", [
    ((10_000, 10_000), lambda size: sf.jpeg_bytes(sf.photo("astronaut", size), quality=80), "too_large"),
    ((10_000, 8_000), lambda size: sf.jpeg_bytes(sf.photo("astronaut", size), quality=80), "ok"),
    ((10_000, 8_000), lambda size: png_claiming(*size), "ok"),
], ids=["real_jpeg_100MP", "real_jpeg_80MP", "png_109_bytes_claiming_80MP"])
def test_huge_images(size, make, expected):
    """A real 100 MP photo is over Pillow's 89.5 MP limit: rejected from its header. A real
    80 MP JPEG decodes at 1/8 scale (draft mode). A 109-byte PNG claiming 80 MP is decoded in
    full (Pillow fills the rows it lacks with black): the costliest input per byte there is,
    bounded by the pixel limit at ~270 MB and a few seconds."""
    data = make(size)
    started = time.perf_counter()
    result = preprocess(Sample("big", {"jpg": data}, "x"), resolution=256)
    seconds = time.perf_counter() - started
    outcome = result.reason if isinstance(result, Failure) else "ok"
    print(f"\n{size[0]}x{size[1]}, {len(data):,} bytes: {outcome} in {seconds:.2f} s")
    assert outcome == expected and seconds < 20
