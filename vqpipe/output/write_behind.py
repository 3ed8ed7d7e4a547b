"""A shard's Parquet writing on a thread of its own, so the model never waits for it.

Encoding a 1 024-row group of codes and latents costs 0.3-0.4 ms of CPU per row (nested-list
levels, statistics, compression; measured with `vqpipe bench --null-model`), and it happens in
bursts: a worker whose main thread wrote its own row groups left the GPU idle for the whole
burst every 1 024 rows. pyarrow releases the GIL while it encodes, so a second thread overlaps
that work with the next batches' decode and encode.

Order and exactly-once stay the writer's: the rows go to :class:`~vqpipe.output.sink.ShardWriter`
in the order they were handed over, by one thread; ``commit`` and ``abort`` first wait for every
write handed over (at most ``max_pending`` batches are in flight, so memory stays bounded), and a
write that failed re-raises in the caller at the next call, before anything can be committed.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from vqpipe.output.sink import CommitResult, ShardWriter


class WriteBehind:
    """``ShardWriter``'s write / commit / abort, with the writes run on a background thread."""

    def __init__(self, writer: ShardWriter, max_pending: int = 2) -> None:
        self.writer = writer
        self.max_pending = max_pending
        self.busy_s = 0.0  # time the thread spent writing (not waiting)
        self.cpu_s = 0.0  # its CPU time: the encoding runs without the GIL, but on a core
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vqpipe-write")
        self._pending: collections.deque[Future] = collections.deque()

    @property
    def layout(self):
        return self.writer.layout

    def write(self, **columns: Any) -> None:
        """Hand one batch of rows over (the arrays must not be changed afterwards)."""
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()  # bounds memory; re-raises a failed write
        self._reraise_done()
        self._pending.append(self._pool.submit(self._timed_write, columns))

    def commit(self, marker: dict[str, Any]) -> CommitResult:
        """Wait for every write handed over (re-raising a failed one: the caller then aborts), then
        commit as ``ShardWriter.commit`` does."""
        self.drain()
        self._pool.shutdown(wait=True)
        return self.writer.commit(marker)

    def abort(self) -> None:
        """Discard the attempt, after the writes in flight have stopped touching it. Idempotent."""
        wait(self._pending)  # their errors do not matter any more: the attempt is thrown away
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self.writer.abort()

    def _timed_write(self, columns: dict[str, Any]) -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            self.writer.write(**columns)
        finally:
            self.busy_s += time.perf_counter() - started
            self.cpu_s += time.thread_time() - cpu

    def _reraise_done(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every write handed over; re-raises the first that failed."""
        while self._pending:
            self._pending.popleft().result()
