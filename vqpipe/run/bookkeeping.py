"""Failure records written and removed off the driver's loop: a storage call (with its retries)
must not hold up the hand-out of shards at a hundred commits a second."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from vqpipe.config import RunConfig
from vqpipe.output.folder import remove_json, write_json
from vqpipe.output.retry import is_storage_full

log = logging.getLogger(__name__)


class Records:
    """One background thread, so records of one shard are written and removed in order."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vqpipe-records")
        self._pending: list[tuple[str, Future]] = []
        self.errors: list[str] = []
        self.storage_full: str | None = None  # the first write that found no space

    def write(self, relative: str, data: dict) -> None:
        self._track(f"write {relative}", self._pool.submit(write_json, self.config, relative, data))

    def remove(self, relative: str) -> None:
        self._track(f"remove {relative}", self._pool.submit(remove_json, self.config, relative))

    def _track(self, what: str, future: Future) -> None:
        self._pending = [(w, f) for w, f in self._pending if not self._settled(w, f)]
        self._pending.append((what, future))

    def _settled(self, what: str, future: Future) -> bool:
        if not future.done():
            return False
        err = future.exception()
        if err is not None:
            self.errors.append(f"{what}: {type(err).__name__}: {err}")
            if is_storage_full(err) and self.storage_full is None:
                self.storage_full = f"{what}: {type(err).__name__}: {err}"
            log.warning("could not %s: %s: %s", what, type(err).__name__, err)
        return True

    def close(self) -> None:
        """Wait for every record still being written."""
        self._pool.shutdown(wait=True)
        for what, future in self._pending:
            self._settled(what, future)
        self._pending = []
