"""fsspec helpers for writing output that is either complete under its final name or absent.

Three ways to publish a file atomically, by filesystem:

- local: a dot-prefixed temp file in the same folder, fsync, ``os.replace``, fsync the folder;
- S3 (s3fs): ``open(..., autocommit=False)`` then ``commit()`` / ``discard()``. A plain
  ``with fs.open(path, "wb")`` completes the upload even when the body raises;
- anything else (``memory://``, ...): the bytes are buffered in memory and written with one
  ``pipe_file`` on success. memory:// ignores ``autocommit=False`` (the empty file appears at
  open), and other backends' transactions are unverified, so they get this path too.

Whole-object writes (``pipe_file``), reads of small objects, existence checks and listings are
retried after transient errors (:mod:`vqpipe.output.retry`): writing the same bytes again is harmless,
and a create-only write that finds the object made by its own earlier, unanswered attempt
recognises it by its bytes. S3 uploads are left to s3fs's own retries.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import IO, Any, Protocol

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from vqpipe.output import retry

# Backends verified to publish nothing before ``commit()``. Add one only after a test.
_TRANSACTIONAL = {"s3", "s3a"}


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path within it (protocol stripped)."""
    return fsspec.core.url_to_fs(url, **storage_options)


def protocols(fs: AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


class AtomicFile(Protocol):
    """A file being written that appears under its final name only at ``commit()``."""

    file: IO[bytes]

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def open_atomic(fs: AbstractFileSystem, path: str) -> AtomicFile:
    """Open ``path`` for writing; nothing is visible there until ``commit()``."""
    if is_local(fs):
        return _LocalAtomic(path)
    if protocols(fs) & _TRANSACTIONAL:
        return _DeferredAtomic(fs, path)
    return _BufferedAtomic(fs, path)


class _LocalAtomic:
    def __init__(self, path: str) -> None:
        self.path = path
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        # Dot prefix: pyarrow, duckdb globs and HF datasets all skip hidden files.
        self.tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        self.file: IO[bytes] = open(self.tmp, "xb")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(os.path.dirname(self.path))

    def discard(self) -> None:
        try:
            self.file.close()  # flushes its buffer: raises on a full disk, and the file must still go
        except OSError:
            pass  # the data is being thrown away; what matters is that its temp file is removed
        finally:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass  # already renamed or removed: nothing left to clean


class _DeferredAtomic:
    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.file: Any = fs.open(path, "wb", autocommit=False)

    def commit(self) -> None:
        try:
            self.file.close()  # uploads the last part; the object is still invisible
            self.file.commit()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self.file.discard()  # aborts the multipart upload, if one was started
        # close() or the finalizer would otherwise flush again and start a new multipart
        # upload that nobody aborts.
        self.file.closed = True


class _BufferedAtomic:
    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.file: IO[bytes] = io.BytesIO()

    def commit(self) -> None:
        data = self.file.getvalue()
        ensure_parent(self.fs, self.path)
        retry.call(lambda: self.fs.pipe_file(self.path, data), f"write {self.path}")

    def discard(self) -> None:
        self.file = io.BytesIO()


def write_create_only(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist; False if it already did.

    Atomic locally (``os.link`` fails on an existing name) and on S3 (a conditional PUT,
    ``If-None-Match: *``, which s3fs turns into FileExistsError; S3-compatible stores that
    ignore the header silently overwrite). Elsewhere fsspec checks ``exists`` and then
    writes: two writers racing inside that window can both return True.

    A transient error is retried. If a retry then finds the object, the lost attempt may
    have written it: it counts as ours when it holds exactly ``data`` (markers carry a
    commit timestamp, so another writer's bytes differ).
    """
    if is_local(fs):
        return _link_create_only(path, data)
    ensure_parent(fs, path)
    calls = 0

    def create() -> None:
        nonlocal calls
        calls += 1
        fs.pipe_file(path, data, mode="create")

    try:
        retry.call(create, f"create {path}")
    except FileExistsError:
        return calls > 1 and retry.call(lambda: fs.cat_file(path), f"read {path}") == data
    return True


def _link_create_only(path: str, data: bytes) -> bool:
    tmp = _LocalAtomic(path)
    try:
        tmp.file.write(data)
        tmp.file.flush()
        os.fsync(tmp.file.fileno())
        tmp.file.close()
        os.link(tmp.tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.discard()
    fsync_dir(os.path.dirname(path))
    return True


def fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; without it a crash can forget the new name.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_parent(fs: AbstractFileSystem, path: str) -> None:
    """Create the folder ``path`` goes in, where folders exist (a wrapped local filesystem, SFTP...):
    a ``pipe_file`` there fails under a missing folder. Object stores have no folders."""
    if not is_object_store(fs):
        parent = posixpath.dirname(path)
        retry.call(lambda: fs.makedirs(parent, exist_ok=True), f"mkdir {parent}")


def is_object_store(fs: AbstractFileSystem) -> bool:
    """S3 and kin: server-side copies, ETags, multipart uploads."""
    return bool(protocols(fs) & _TRANSACTIONAL)


def etag(fs: AbstractFileSystem, path: str) -> str | None:
    """The object's ETag on an object store (None elsewhere)."""
    if not is_object_store(fs):
        return None
    fs.invalidate_cache(path)
    info = retry.call(lambda: fs.info(path), f"info {path}")
    return str(info.get("ETag", "")).strip('"') or None


def exists(fs: AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists, asking again after transient errors.

    fsspec's own ``exists`` answers False on *any* error, so a dropped connection would read as
    "absent"; here only FileNotFoundError does, and an error that outlasts the retries is raised.
    """
    try:
        retry.call(lambda: fs.info(path), f"info {path}")
    except FileNotFoundError:
        return False
    return True


def read_json(fs: AbstractFileSystem, path: str) -> Any | None:
    """The JSON document at ``path``, or None if there is none; transient errors are retried."""
    try:
        return json.loads(retry.call(lambda: fs.cat_file(path), f"read {path}"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def glob(fs: AbstractFileSystem, pattern: str) -> dict[str, dict[str, Any]]:
    """``fs.glob(pattern, detail=True)`` that never mistakes a failed listing for an empty one.

    fsspec's generic walk *omits* folders whose listing raised, so one dropped connection would
    silently shrink a run's shard list or a reader's file list; ``on_error="raise"`` turns that off.
    s3fs's recursive (``**``) listing takes no ``on_error`` (TypeError) but raises its errors anyway.
    Transient errors are retried; a missing folder (or one under a regular file) matches nothing.
    """
    def once() -> dict[str, dict[str, Any]]:
        try:
            return fs.glob(pattern, detail=True, on_error="raise")
        except TypeError:
            return fs.glob(pattern, detail=True)

    try:
        return retry.call(once, f"glob {pattern}")
    except (FileNotFoundError, NotADirectoryError):  # a folder under a regular file holds nothing either
        return {}


def remove_file(fs: AbstractFileSystem, path: str) -> None:
    """Remove ``path``; already gone is fine (transient errors retried)."""
    try:
        retry.call(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass


def invalidate(fs: AbstractFileSystem, path: str) -> None:
    """Drop cached listings of ``path`` so the next listing sees other writers' files."""
    fs.invalidate_cache(path)


def sweep_incomplete_uploads(
    fs: AbstractFileSystem, prefix: str, older_than: timedelta = timedelta(hours=1)
) -> int:
    """Abort S3 multipart uploads under ``prefix`` started more than ``older_than`` ago.

    They are left by workers killed between opening and committing a file, and are billed
    until aborted. The age guard spares live writers; pass ``timedelta(0)`` only when no
    job is running. Returns how many were aborted; a no-op (0) on other filesystems.
    """
    if not protocols(fs) & _TRANSACTIONAL:
        return 0
    bucket, key, _ = fs.split_path(prefix)
    cutoff = datetime.now(timezone.utc) - older_than
    stale = [u for u in _multipart_uploads(fs, bucket, key) if u["Initiated"] <= cutoff]
    for upload in stale:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return len(stale)


def sweep_stale_temp_files(fs: AbstractFileSystem, folder: str, older_than: timedelta = timedelta(hours=1),
                           subfolders: tuple[str, ...] = ()) -> int:
    """Remove ``.NAME.UUID.tmp`` files a killed worker left in a local output folder (and in its
    ``subfolders``, relative: markers and records are written through temp files too).

    Readers never see them (dot prefix), but they take disk. The age guard spares live writers.
    Returns how many were removed; a no-op (0) off the local filesystem."""
    if not is_local(fs):
        return 0
    cutoff = time.time() - older_than.total_seconds()
    removed = 0
    for path in (folder, *(os.path.join(folder, sub) for sub in subfolders)):
        if not os.path.isdir(path):
            continue
        for entry in os.scandir(path):
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.stat().st_mtime <= cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole: a reader, or a disk that fills half way, never leaves a
    truncated file (a local write goes through a temp file; an object PUT is whole already)."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    target = _LocalAtomic(path)
    try:
        target.file.write(data)
    except BaseException:
        target.discard()
        raise
    target.commit()


def _multipart_uploads(fs: AbstractFileSystem, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = []
    markers: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
        uploads.extend(page.get("Uploads", []))
        if not page.get("IsTruncated"):
            return uploads
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
