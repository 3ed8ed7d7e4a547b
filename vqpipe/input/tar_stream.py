"""A tar stream's members and their bytes, read with a few Python calls per member.

``tarfile``'s stream mode (``r|*``) cost 0.2-0.35 ms of CPU per LAION sample (three members:
``jpg``, ``txt``, ``json``) on the one thread that reads a worker's shard, all of it holding the
GIL: its ``_Stream`` buffer, seeks and file objects are Python code run per 512-byte block. Most
shards are plain uncompressed tars of regular files, and for those :class:`PlainTarStream` reads
each header with one ``read`` and parses it with ``tarfile``'s own ``TarInfo.frombuf`` (so every
field, checksum and encoding rule is tarfile's), then hands the member's bytes over with one more.

Anything else is left to ``tarfile`` itself, so its behaviour stays the reference:

- a compressed stream (gzip, bzip2, xz magic) or anything but a valid header first is read by
  ``tarfile.open(mode="r|*")`` from the start (:class:`TarfileStream`);
- a header that needs more than one block (pax ``x``/``g``, GNU long names, sparse files) hands
  the rest of the stream, from that header on, to ``tarfile.open(mode="r|")``.

The errors are tarfile's, raised at the same points: ``tarfile.ReadError`` ("empty file",
"bad checksum", "unexpected end of data", ...) for a bad first header or a stream cut inside a
member, and a ``tarfile.HeaderError`` recorded in ``end`` (not raised) for a later header that
ends the stream: an all-zero block (a real end), a cut or a bad one (the caller decides).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import IO

BLOCK = tarfile.BLOCKSIZE
# Headers whose member tarfile builds from several blocks: the rest of the stream is its to read.
_MULTI_BLOCK = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE,
                tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_SKIP_CHUNK = 2**20


def open_tar_stream(f: IO[bytes]) -> PlainTarStream | TarfileStream:
    """The reader for the stream ``f`` (read forward only, from its start). Raises what
    ``tarfile.open(fileobj=f, mode="r|*")`` raises for a stream it cannot start reading."""
    first = _read_exact(f, BLOCK)
    if _compressed(first) or not _plain_header(first):
        return TarfileStream(_Prefixed(first, f), "r|*")
    return PlainTarStream(f, first)


class TarfileStream:
    """``tarfile``'s stream mode behind the same three calls as :class:`PlainTarStream`."""

    def __init__(self, f: IO[bytes], mode: str):
        self._tar = tarfile.open(fileobj=f, mode=mode, tarinfo=_EndRecording)

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        for info in self._tar:
            self._tar.members = []  # a streaming TarFile remembers every member it saw; stay flat
            yield info

    def read(self, info: tarfile.TarInfo) -> bytes:
        data = self._tar.extractfile(info)
        if data is None:  # unreachable for regular members; keeps the type checker honest
            raise RuntimeError(f"no data for regular member {info.name!r}")
        return data.read()

    @property
    def end(self) -> tarfile.HeaderError | None:
        return getattr(self._tar, _EndRecording.ATTR, None)


class _EndRecording(tarfile.TarInfo):
    """Records why tarfile's member stream stopped (``TarFile.next`` swallows it)."""

    ATTR = "_vqpipe_end"

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            setattr(tar, cls.ATTR, e)
            raise


class PlainTarStream:
    """An uncompressed tar of single-block headers, read member by member.

    Iterating yields each member's ``TarInfo``; ``read(info)`` returns the current member's bytes
    (members not read are skipped). ``end`` says why the headers stopped."""

    def __init__(self, f: IO[bytes], first: bytes):
        self._f, self._first = f, first
        self._unread = 0  # bytes of the current member's data (and padding) not consumed yet
        self._current: tarfile.TarInfo | None = None
        self._handed_over: TarfileStream | None = None
        self.end: tarfile.HeaderError | None = None

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        offset = 0
        block = self._first
        while True:
            try:
                info = _plain_regular(block) or tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError as e:
                if offset == 0:  # what TarFile.next raises for a bad first header
                    raise tarfile.ReadError("empty file" if isinstance(e, tarfile.EmptyHeaderError) else str(e)) \
                        from None
                self.end = e
                return
            if info.type in _MULTI_BLOCK:
                self._handed_over = TarfileStream(_Prefixed(block, self._f), "r|")
                yield from self._handed_over
                self.end = self._handed_over.end
                return
            info.offset, info.offset_data = offset, offset + BLOCK
            if info.isdir():
                info.name = info.name.rstrip("/")
            # tarfile skips data after regular members and unknown types, not after links or dirs.
            carries_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
            padded = -(-info.size // BLOCK) * BLOCK if carries_data else 0
            self._current, self._unread = info, padded
            yield info
            offset += BLOCK + padded
            block = self._next_header()

    def read(self, info: tarfile.TarInfo) -> bytes:
        if self._handed_over is not None:
            return self._handed_over.read(info)
        if info is not self._current or self._unread != -(-info.size // BLOCK) * BLOCK:
            raise RuntimeError(f"member {info.name!r} is not the one being read")
        data = _read_exact(self._f, info.size)
        self._unread -= len(data)
        if len(data) < info.size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def _next_header(self) -> bytes:
        """The block after the current member: skips what is left of its data and padding, in
        the same read as the header when that is only the padding."""
        if self._unread > _SKIP_CHUNK:
            self._skip(self._unread)
        chunk = _read_exact(self._f, self._unread + BLOCK)
        if len(chunk) < self._unread:
            raise tarfile.ReadError("unexpected end of data")
        block, self._unread = chunk[self._unread:], 0
        return block

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._f.read(min(n, _SKIP_CHUNK))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            n -= len(chunk)
        self._unread = 0


_OCTAL = re.compile(rb" *[0-7]* *")
_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode, ids, mtime, dev


def _plain_regular(block: bytes) -> tarfile.TarInfo | None:
    """The TarInfo ``tarfile.TarInfo.frombuf`` makes of an everyday header (a regular file or a
    directory, plain octal numbers, the unsigned checksum), a few times faster; None for anything
    else, which ``frombuf`` itself then parses (or rejects) as the reference."""
    kind = block[156:157]
    if len(block) != BLOCK or kind not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        return None
    size, checksum = _octal(block[124:136]), _octal(block[148:156])
    if size is None or checksum is None or checksum != 256 + sum(block[:148]) + sum(block[156:]):
        return None
    if any(_octal(block[a:b]) is None for a, b in _NUMBERS):
        return None
    name = block[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE  # old V7 tars mark a directory so
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    info = tarfile.TarInfo(prefix + "/" + name if prefix else name)
    info.type, info.size = kind, size
    return info


def _octal(field: bytes) -> int | None:
    """``tarfile.nti`` for plain octal fields (digits between spaces, NUL-ended); None for the
    rest (base-256, signs, underscores...), which only frombuf judges."""
    if field[:1] in (b"\x80", b"\xff"):
        return None
    digits = field.split(b"\0", 1)[0]
    if not _OCTAL.fullmatch(digits):
        return None
    return int(digits.strip() or b"0", 8)


def _compressed(block: bytes) -> bool:
    """The magic numbers tarfile's ``r|*`` tests the first block for (``_StreamProxy``)."""
    return (block.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
            or (block[0:3] == b"BZh" and block[4:10] == b"1AY&SY"))


def _plain_header(block: bytes) -> bool:
    """Whether ``block`` is a header this module reads itself (else tarfile reads the stream)."""
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False  # including an empty or all-zero stream: tarfile says what it is
    return info.type not in _MULTI_BLOCK


def _read_exact(f: IO[bytes], n: int) -> bytes:
    """``n`` bytes, or fewer at the end of the stream (a read may return less before it)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class _Prefixed:
    """A forward-only file: ``prefix`` (bytes already read), then the rest of ``f``."""

    def __init__(self, prefix: bytes, f: IO[bytes]):
        self._prefix, self._f = prefix, f

    def read(self, size: int = -1) -> bytes:
        if not self._prefix:
            return self._f.read(size)
        if size < 0:
            data, self._prefix = self._prefix + self._f.read(), b""
            return data
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(data) < size:
            data += self._f.read(size - len(data))
        return data
