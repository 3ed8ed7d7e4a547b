"""Read one WebDataset tar shard as a stream of :class:`~vqpipe.records.Sample`.

The shard is streamed (:mod:`vqpipe.input.tar_stream`: plain tars member by member, anything
else through ``tarfile``'s ``r|*``) straight from fsspec: never downloaded whole, never
extracted. Members are grouped into samples by key, following
img2dataset/webdataset: ``a/b/000008.v2.jpg`` is key ``a/b/000008``, field ``v2.jpg``.
Each member is read whole into memory -- fine for images, and bounded by
``max_member_bytes`` for hostile ones. A dropped connection mid-shard is retried where it
broke (:class:`~vqpipe.output.retry.RetryingReader`), not from the start of the shard.

Per-member and per-sample problems go to ``on_failure`` and the stream goes on; a problem
with the shard itself raises :class:`~vqpipe.records.ShardError`, after the samples read so
far were yielded -- the caller must then discard the shard's partial output.
"""

from __future__ import annotations

import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from vqpipe.input.tar_stream import PlainTarStream, TarfileStream, open_tar_stream
from vqpipe.records import Failure, Sample, ShardError
from vqpipe.output.retry import RetryingReader

OnFailure = Callable[[Failure], None]
TarStream = PlainTarStream | TarfileStream

# Far above any real image member; stops one hostile member from taking the worker's memory.
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20


def iter_samples(
    url: str,
    storage_options: dict[str, Any],
    on_failure: OnFailure,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Sample]:
    """Yield the samples of the shard at ``url`` in tar order.

    Outcomes: a member with an absolute path, a ``..`` component or no extension is
    skipped as ``bad_member_name``; a key seen earlier in the shard is dropped as
    ``duplicate_key`` (the first sample wins); a repeated field within a sample keeps the
    first; a member over ``max_member_bytes`` drops its sample as ``too_large``;
    directories and links are skipped. An empty but valid tar yields nothing.

    Raises ShardError: ``missing_shard``; ``truncated_tar`` (including a stream that ends
    without the tar end-of-archive block -- the sample being read then is not yielded);
    ``corrupt_tar`` (bad header, bad compression, or a zero-byte object); ``read_error``
    (an I/O error that outlasted the per-read retries, or a permanent one such as a folder).
    """
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        with RetryingReader(lambda: fs.open(path, "rb"), url) as f:
            yield from _group(_open_stream(f, url), url, on_failure, max_member_bytes)
    except FileNotFoundError as e:
        raise ShardError("missing_shard", f"{url}: {e}") from e
    except (EOFError, tarfile.ReadError) as e:
        truncated = isinstance(e, EOFError) or "unexpected end" in str(e)
        reason = "truncated_tar" if truncated else "corrupt_tar"
        raise ShardError(reason, f"{url}: {e}") from e
    except (tarfile.CompressionError, zlib.error, lzma.LZMAError) as e:
        raise ShardError("corrupt_tar", f"{url}: {e}") from e
    except OSError as e:
        # gzip.BadGzipFile is an OSError too: name it corrupt, not an I/O failure.
        reason = "corrupt_tar" if "gzip" in type(e).__name__.lower() else "read_error"
        raise ShardError(reason, f"{url}: {e}") from e


def _open_stream(f: RetryingReader, url: str) -> TarStream:
    try:
        return open_tar_stream(f)
    except TypeError as e:
        # CPython's gzip header parser calls ord() on the empty read of a stream cut inside the
        # header (found by tests/test_fuzz.py); nothing else in here can raise TypeError.
        raise ShardError("truncated_tar", f"{url}: gzip header cut short ({e})") from e


def _check_end(stream: TarStream, url: str) -> None:
    """``TarFile.next`` treats a stream that simply runs out (no header, or half a header) after
    the first member as a normal end, so a shard cut at a member boundary would pass as
    complete. Only an all-zero header block (``EOFHeaderError``) is a real end."""
    end = stream.end
    if isinstance(end, tarfile.EOFHeaderError):
        return
    if isinstance(end, tarfile.InvalidHeaderError):
        raise ShardError("corrupt_tar", f"{url}: {end}")
    raise ShardError("truncated_tar", f"{url}: stream ended without the end-of-archive block")


@dataclass(frozen=True)
class _Member:
    key: str
    field: str
    info: tarfile.TarInfo


def _named_members(tar: TarStream, on_failure: OnFailure) -> Iterator[_Member]:
    for info in tar:
        if not info.isreg():
            continue
        split = split_member_name(info.name)
        if isinstance(split, str):
            on_failure(Failure(_printable(info.name), "bad_member_name", split))
            continue
        yield _Member(split[0], split[1], info)


def split_member_name(name: str) -> tuple[str, str] | str:
    """``(key, field)`` for a tar member name, or the reason it is rejected.

    Key: the path up to the first dot of the base name; field: the rest, lowercased. A name
    that is not UTF-8 (``tarfile`` hands its bytes over as lone surrogates) is rejected: such
    a key could not be written as a Parquet string.
    """
    if not name.isascii() and _printable(name) != name:
        return f"member name {_printable(name)!r} is not UTF-8"
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        return f"unsafe member path {name!r}"
    dirname, base = posixpath.split(posixpath.normpath(name))
    stem, dot, field = base.partition(".")
    if not stem or not dot or not field:
        return f"member {name!r} has no key or no extension"
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, field.lower()


def _printable(name: str) -> str:
    """``name`` with undecodable bytes spelled ``\\xe9``, so it can go into JSON and Parquet."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: spell it out as well
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Pending:
    key: str
    fields: dict[str, bytes]
    failure: Failure | None = None


def _group(
    tar: TarStream, url: str, on_failure: OnFailure, max_member_bytes: int
) -> Iterator[Sample]:
    seen: set[str] = set()
    pending: _Pending | None = None
    for m in _named_members(tar, on_failure):
        if pending is None or m.key != pending.key:
            if pending is not None:
                yield from _finish(pending, url, on_failure)
            pending = _start(m.key, seen)
        if pending.failure is None and m.field not in pending.fields:
            _add(pending, m, tar, max_member_bytes)
    # Before the last sample: in a cut stream it may be missing fields that never arrived.
    _check_end(tar, url)
    if pending is not None:
        yield from _finish(pending, url, on_failure)


def _start(key: str, seen: set[str]) -> _Pending:
    if key in seen:
        message = f"key {key!r} appears again after other samples; the first one is kept"
        return _Pending(key, {}, Failure(key, "duplicate_key", message))
    seen.add(key)
    return _Pending(key, {})


def _add(pending: _Pending, m: _Member, tar: TarStream, max_member_bytes: int) -> None:
    if m.info.size > max_member_bytes:
        message = f"member {m.info.name!r} is {m.info.size} bytes (> {max_member_bytes})"
        pending.failure = Failure(m.key, "too_large", message)
        return
    # Must be read now: in stream mode the data is gone once the next member is fetched.
    pending.fields[m.field] = tar.read(m.info)


def _finish(pending: _Pending, url: str, on_failure: OnFailure) -> Iterator[Sample]:
    if pending.failure is not None:
        on_failure(pending.failure)
    else:
        yield Sample(pending.key, pending.fields, url)
