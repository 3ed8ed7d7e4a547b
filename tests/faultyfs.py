"""``faulty://``: an fsspec filesystem that wraps another one and fails a fraction of its calls.

For tests of transient storage faults. Options (as ``storage_options``)::

    {"target_protocol": "memory" | "file", "rate": 0.05, "seed": 0,
     "ops": ["open", "read", "write", "list"], "always": ["shard-00003"], "where": "everywhere"}

``rate`` is the chance that one call of a kind in ``ops`` fails: ``open`` (opening a file),
``read`` (one ``read()`` of an open file, or ``cat_file``), ``write`` (``pipe_file``, ``rm_file``) and
``list`` (``ls`` / ``info``, hence ``exists``). The error is a ``ConnectionResetError``,
``TimeoutError`` or ``OSError(EIO)``, and the failure is the awkward kind: a failed read may
have consumed part of the stream, and a failed write may have reached the store before its
answer was lost. Every call on a path containing one of ``always`` fails: a permanent outage.
Faults are drawn from a generator seeded with ``seed`` (one per filesystem instance; fsspec
caches instances, so equal options share one). ``"where": "workers"`` injects them only in
processes started by :func:`run_cli`'s Ray workers, sparing the driver's own bookkeeping.

Paths are the target's: ``faulty:///tmp/x/a.tar`` over ``file`` is ``/tmp/x/a.tar``.
``FaultyFileSystem.injected`` counts the faults of this process; with ``FAULTYFS_LOG`` set in
the environment, each fault also appends a line ``PID driver|worker OP ERROR PATH`` to that file
(to count across Ray workers).

Importing the module registers the protocol. Ray workers import it through the runtime env's
``worker_process_setup_hook`` (``faultyfs.register``); see :func:`run_cli`.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOL = "faulty"
LOG_ENV = "FAULTYFS_LOG"
WORKER_ENV = "FAULTYFS_IN_WORKER"  # set in the Ray workers' environment by run_cli
ALL_OPS = ("open", "read", "write", "list")


class FaultyFileSystem(AbstractFileSystem):
    protocol = PROTOCOL
    root_marker = "/"
    injected: collections.Counter = collections.Counter()  # op -> faults injected in this process

    def __init__(self, target_protocol: str = "memory", target_options: dict | None = None, rate: float = 0.05,
                 seed: int = 0, ops: tuple[str, ...] | list[str] = ALL_OPS, always: tuple[str, ...] | list[str] = (),
                 where: str = "everywhere", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if where not in ("everywhere", "workers"):
            raise ValueError(f"where must be 'everywhere' or 'workers', got {where!r}")
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.rate, self.ops, self.always = rate, frozenset(ops), tuple(always)
        self.armed = where == "everywhere" or bool(os.environ.get(WORKER_ENV))
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len(PROTOCOL) + 3:] if path.startswith(f"{PROTOCOL}://") else path
        return "/" + path.strip("/")

    # -- fault injection ------------------------------------------------------------------------

    def maybe_fail(self, op: str, path: str) -> None:
        if not self.armed:
            return
        if any(marker in path for marker in self.always):
            self._raise(op, path, OSError(errno.EIO, f"injected permanent outage: {op} {path}"))
        if op not in self.ops:
            return
        with self._lock:
            if self._rng.random() >= self.rate:
                return
            kind = self._rng.choice((ConnectionResetError, TimeoutError, OSError))
        error = (OSError(errno.EIO, f"injected I/O error: {op} {path}") if kind is OSError
                 else kind(f"injected {kind.__name__}: {op} {path}"))
        self._raise(op, path, error)

    def coin(self, p: float = 0.5) -> bool:
        with self._lock:
            return self._rng.random() < p

    def _raise(self, op: str, path: str, error: OSError) -> None:
        FaultyFileSystem.injected[op] += 1
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a") as f:
                role = "worker" if os.environ.get(WORKER_ENV) else "driver"
                f.write(f"{os.getpid()} {role} {op} {type(error).__name__} {path}\n")
        raise error

    # -- the calls vqpipe makes -----------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any):
        self.maybe_fail("list", path)
        return self.target.ls(path, detail=detail, **kwargs)  # the target's paths are ours too

    def info(self, path: str, **kwargs: Any) -> dict:
        self.maybe_fail("list", path)
        return self.target.info(path, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self.maybe_fail("read", path)
        return self.target.cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        lost_answer = self.coin()
        if not lost_answer:
            self.maybe_fail("write", path)
        self.target.pipe_file(path, value, mode=mode, **kwargs)
        if lost_answer:
            self.maybe_fail("write", path)  # it reached the store, but the caller hears an error

    def _open(self, path: str, mode: str = "rb", block_size=None, autocommit: bool = True, cache_options=None,
              **kwargs: Any):
        self.maybe_fail("open", path)
        f = self.target.open(path, mode, **kwargs)
        return _FaultyReader(self, path, f) if "r" in mode else f

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.target.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.target.mkdir(path, create_parents=create_parents, **kwargs)

    def rm_file(self, path: str) -> None:
        lost_answer = self.coin()
        if not lost_answer:
            self.maybe_fail("write", path)
        self.target.rm_file(path)
        if lost_answer:
            self.maybe_fail("write", path)  # removed, but the caller hears an error

    def _rm(self, path: str) -> None:
        self.target.rm(path)

    def rmdir(self, path: str) -> None:
        self.target.rmdir(path)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class _FaultyReader:
    """A file open for reading whose ``read`` calls fail at the filesystem's rate, sometimes
    after consuming part of the request."""

    def __init__(self, fs: FaultyFileSystem, path: str, f) -> None:
        self.fs, self.path, self.f = fs, path, f

    def read(self, size: int = -1) -> bytes:
        try:
            self.fs.maybe_fail("read", self.path)
        except OSError:
            if size and size > 1 and self.fs.coin():
                self.f.read(size // 2)  # half the bytes went by before the connection broke
            raise
        return self.f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return self.f.seekable()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def __enter__(self) -> _FaultyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register() -> None:
    """Make ``faulty://`` known to fsspec in this process (Ray's worker setup hook calls this)."""
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


register()


def run_cli(argv: list[str]) -> int:
    """``vqpipe`` with ``faulty://`` known in the driver and in every Ray worker.

    Starts the embedded Ray itself, as the CLI would, plus a job runtime env that puts this
    folder on the workers' path and registers the protocol in each of them."""
    import ray

    from vqpipe import cli

    here = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p), WORKER_ENV: "1"}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "faultyfs.register"})
    try:
        return cli.main(argv)
    finally:
        ray.shutdown()


if __name__ == "__main__":  # python tests/faultyfs.py run CONFIG [overrides]
    sys.exit(run_cli(sys.argv[1:]))
