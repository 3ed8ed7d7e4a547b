"""PlainTarStream against tarfile's own stream mode: the same members, bytes, errors and end, on
real shards and on every kind of damage (differential fuzzing: tarfile is the reference)."""

from __future__ import annotations

import io
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardfactory as sf
from vqpipe.input.tar_stream import PlainTarStream, TarfileStream, open_tar_stream


def _members() -> list[tuple[str, bytes | None]]:
    jpeg = sf.jpeg_bytes(sf.photo("chelsea", (48, 36)))
    return [("a/000.jpg", jpeg), ("a/000.txt", b"a cat"), ("a/000.json", b'{"i": 0}'), ("dir", None),
            ("a/001.jpg", jpeg[:1000]), ("a/001.txt", b""), ("a/002.txt", b"x" * 512)]


def _tar(members, fmt=tarfile.USTAR_FORMAT, extra=()) -> bytes:
    return sf.tar_bytes(members, format=fmt, extra=extra)


def drain(open_stream, data: bytes, read_every: int = 1) -> list:
    """What a reader makes of ``data``: (name, type, size, bytes read) per member, then how it
    ended (the recorded end, or the error raised and its message)."""
    out: list = []
    try:
        stream = open_stream(io.BytesIO(data))
        for i, info in enumerate(stream):
            read = stream.read(info) if info.isreg() and i % read_every == 0 else None
            out.append((info.name, info.type, info.size, read))
        out.append(("end", type(stream.end).__name__, str(stream.end)))
    except (tarfile.TarError, EOFError, OSError) as e:
        out.append(("raised", type(e).__name__, str(e)))
    return out


def reference(f):
    return TarfileStream(f, "r|*")


def test_a_plain_shard_takes_the_fast_reader_and_reads_as_tarfile_does():
    data = _tar(_members())
    assert isinstance(open_tar_stream(io.BytesIO(data)), PlainTarStream)
    got = drain(open_tar_stream, data)
    assert got == drain(reference, data)
    assert [m[0] for m in got[:-1]] == [name for name, _ in _members()]
    assert got[0][3] == _members()[0][1] and got[-1][:2] == ("end", "EOFHeaderError")


def test_compressed_and_pax_and_gnu_shards_read_through_tarfile():
    long = "k" * 150 + "/000.jpg"
    for data in (sf.tar_bytes(_members(), gzip=True), _tar(_members() + [(long, b"long")], tarfile.PAX_FORMAT),
                 _tar(_members() + [(long, b"long")], tarfile.GNU_FORMAT),
                 _tar([("ü/000.txt", b"utf8")] + _members(), tarfile.PAX_FORMAT)):
        got = drain(open_tar_stream, data)
        assert got == drain(reference, data)
        assert got[-1][:2] == ("end", "EOFHeaderError")
    assert drain(open_tar_stream, data)[0][0] == "ü/000.txt"


def test_links_unknown_types_and_skipped_members_move_as_tarfile_moves():
    link = tarfile.TarInfo("a/003.lnk")
    link.type, link.linkname = tarfile.SYMTYPE, "a/000.jpg"
    odd = tarfile.TarInfo("a/004.odd")
    odd.type, odd.size = b"Z", 700  # unknown type: tarfile skips its data as a regular file's
    data = _tar(_members(), extra=[(link, None), (odd, b"z" * 700)])
    for every in (1, 2, 3):  # members not read are skipped, not parsed as headers
        assert drain(open_tar_stream, data, every) == drain(reference, data, every)


def test_empty_zero_and_garbage_streams_fail_as_tarfile_fails():
    for data in (b"", b"\0" * 512, b"\0" * 10240, b"not a tar at all" * 40, b"x" * 100):
        assert drain(open_tar_stream, data) == drain(reference, data), data[:20]


_SHARD = _tar(_members())
_CASE = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_CASE
@given(st.integers(0, len(_SHARD)), st.integers(1, 3))
def test_cut_anywhere(cut, every):
    data = _SHARD[:cut]
    assert drain(open_tar_stream, data, every) == drain(reference, data, every)


@_CASE
@given(st.lists(st.tuples(st.integers(0, len(_SHARD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(1, 3), st.booleans())
def test_bytes_changed_anywhere(changes, every, in_headers):
    data = bytearray(_SHARD)
    headers = [o for o in range(0, len(_SHARD), 512) if _SHARD[o:o + 512].strip(b"\0")]
    for position, value in changes:
        # Aim most changes at header blocks (names, sizes, types, checksums), where the readers differ.
        where = headers[position % len(headers)] + position % 512 if in_headers else position
        data[where] = value
    data = bytes(data)
    assert drain(open_tar_stream, data, every) == drain(reference, data, every)


def _with_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) & 0o777777)


@_CASE
@given(st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 6), st.integers(1, 3), st.sampled_from([None, b"0", b"5", b"2", b"x", b"L", b"g", b"S", b"Z"]))
def test_valid_headers_with_odd_fields(changes, which, every, kind):
    """Headers that pass their checksum but say odd things (sizes, types, names, numbers)."""
    data = bytearray(_SHARD)
    headers = [o for o in range(0, len(_SHARD), 512) if _SHARD[o:o + 512].strip(b"\0")]
    start = headers[which % len(headers)]
    block = bytearray(data[start:start + 512])
    for position, value in changes:
        if not 148 <= position < 156:
            block[position] = value
    if kind is not None:
        block[156:157] = kind
    _with_checksum(block)
    data[start:start + 512] = block
    data = bytes(data)
    assert drain(open_tar_stream, data, every) == drain(reference, data, every)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 511), st.sampled_from(b"0123456789 /\0\x80\xffabc+-_x5")), max_size=12),
       st.sampled_from([b"0", b"\0", b"5", b"1"]))
def test_the_everyday_header_parse_is_frombufs(changes, kind):
    """Wherever the quick parse answers, it answers what tarfile.TarInfo.frombuf does."""
    from vqpipe.input.tar_stream import _plain_regular
    block = bytearray(_SHARD[:512])
    for position, value in changes:
        block[position] = value
    block[156:157] = kind
    _with_checksum(block)
    quick = _plain_regular(bytes(block))
    if quick is not None:
        ref = tarfile.TarInfo.frombuf(bytes(block), tarfile.ENCODING, "surrogateescape")
        assert (quick.name, quick.type, quick.size) == (ref.name, ref.type, ref.size)
