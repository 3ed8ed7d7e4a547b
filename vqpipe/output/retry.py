"""Per-operation retries for storage calls that are safe to repeat.

Object stores drop connections and time out now and then; one such hiccup should cost a
fraction of a second, not a whole shard attempt (the driver's ``ray.max_retries`` is the next
line of defence, for failures that outlast these retries). Only idempotent operations go through
here: opening a shard and reading a byte range of it, writing a whole object, listing,
``info``/``exists``. Appends and multipart uploads are not retried piecewise.

Backoff is exponential with full jitter (AWS's "Exponential Backoff And Jitter"): attempt ``n``
sleeps ``uniform(0, min(max_s, base_s * 2**n))``, so workers that failed together do not retry
together.
"""

from __future__ import annotations

import errno
import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# OSErrors that say something true about the object, which asking again will not change.
PERMANENT_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# A full disk or an exhausted quota stays full for the seconds a retry waits; so does a read-only mount.
STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PERMANENT_ERRNOS = (*STORAGE_FULL_ERRNOS, errno.EROFS)

_jitter = random.Random()  # a private generator: never touch (or depend on) the global one


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # calls in all, the first included
    base_s: float = 0.1
    max_s: float = 5.0

    def delay(self, failures: int) -> float:
        """Seconds to sleep after the ``failures``-th failed call."""
        return _jitter.uniform(0.0, min(self.max_s, self.base_s * 2 ** (failures - 1)))


DEFAULT_POLICY = RetryPolicy()


def is_transient(err: BaseException) -> bool:
    """Connection resets, timeouts and other I/O errors are worth another try; a missing or
    forbidden object, and anything that is not an ``OSError``, are not."""
    return (isinstance(err, OSError) and not isinstance(err, PERMANENT_ERRORS)
            and err.errno not in PERMANENT_ERRNOS)


def is_storage_full(err: BaseException) -> bool:
    """No space left on the device, or the quota is spent: no shard can be written until it is freed."""
    return isinstance(err, OSError) and err.errno in STORAGE_FULL_ERRNOS


def call(fn: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """``fn()``, called again after transient errors up to ``policy.attempts`` times in all
    (:data:`DEFAULT_POLICY` when None, looked up per call); the last error (or any permanent one)
    is raised. ``what`` names the operation in logs."""
    policy = policy or DEFAULT_POLICY
    failures = 0
    while True:
        try:
            return fn()
        except OSError as err:
            failures += 1
            if not is_transient(err) or failures >= policy.attempts:
                raise
            delay = policy.delay(failures)
            log.warning("%s failed (%s: %s), retry %d/%d in %.2f s", what, type(err).__name__, err, failures,
                        policy.attempts - 1, delay)
            time.sleep(delay)


class RetryingReader(io.RawIOBase):
    """A read-only, forward-reading file that survives transient read errors.

    After a failed ``read`` it reopens the object with ``opener`` and continues from the offset
    it has handed out so far (seeking, or skipping on unseekable streams), so the caller sees
    one unbroken stream. The offset is counted here, never asked of the failed file: a read
    that died half way may have moved it.
    """

    def __init__(self, opener: Callable[[], IO[bytes]], what: str, policy: RetryPolicy | None = None) -> None:
        super().__init__()
        self._opener, self._what, self._policy = opener, what, policy
        self._offset = 0
        self._file: IO[bytes] | None = call(opener, f"open {what}", policy)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = call(lambda: self._read_once(size), f"read {self._what}", self._policy)
        self._offset += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read_once(self, size: int) -> bytes:
        if self._file is None:
            self._file = self._reopen()
        try:
            return self._file.read(size)
        except OSError:
            self._drop()
            raise

    def _reopen(self) -> IO[bytes]:
        f = self._opener()
        try:
            if f.seekable():
                f.seek(self._offset)
            else:
                _skip(f, self._offset)
        except BaseException:
            f.close()
            raise
        return f

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as err:  # the connection is already broken; the next read reopens
                log.debug("closing %s after a failed read: %s", self._what, err)

    def close(self) -> None:
        self._drop()
        super().close()


def _skip(f: IO[bytes], n: int, chunk: int = 2**20) -> None:
    while n > 0:
        data = f.read(min(n, chunk))
        if not data:
            raise EOFError(f"the object is shorter than the {n} bytes still to skip")
        n -= len(data)
