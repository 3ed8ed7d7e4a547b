"""Ordered, bounded parallel map: keeps the decode pool busy while the model runs.

A producer thread pulls items from the (I/O-bound) source iterator and submits ``fn(item)`` to
the pool; the consumer receives results in source order. At most ``max_pending`` results wait,
so memory stays flat however long the shard is.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


@dataclass
class PrefetchStats:
    source_s: float = 0.0  # time spent pulling items from the source (shard reading)
    source_cpu_s: float = 0.0  # the producer thread's CPU time: tar parsing holds the GIL, decoding need not
    wait_s: float = 0.0  # time the consumer waited for a result that was not ready


class _SourceFailed:
    def __init__(self, error: BaseException):
        self.error = error


def ordered_parallel_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor, max_pending: int,
                         stats: PrefetchStats | None = None) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computed on ``pool``.

    An exception raised by the source iterator is re-raised in the consumer after the results
    before it; an exception inside ``fn`` is re-raised when its result is reached.
    """
    stats = stats or PrefetchStats()
    pending: queue.Queue = queue.Queue(maxsize=max_pending)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(fn, items, pool, pending, stop, stats), daemon=True,
                                name="vqpipe-prefetch")
    producer.start()
    try:
        while True:
            started = time.perf_counter()
            entry = pending.get()
            if entry is _DONE:
                return
            if isinstance(entry, _SourceFailed):
                raise entry.error
            result = entry.result()
            stats.wait_s += time.perf_counter() - started
            yield result
    finally:
        stop.set()
        _drain(pending)
        producer.join(timeout=30)


def _produce(fn, items, pool: Executor, pending: queue.Queue, stop: threading.Event, stats: PrefetchStats) -> None:
    iterator = iter(items)
    cpu = time.thread_time()
    try:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                break
            finally:
                stats.source_s += time.perf_counter() - started
            _put(pending, pool.submit(fn, item), stop)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(pending, _SourceFailed(error), stop)
        return
    finally:
        close = getattr(iterator, "close", None)
        if close is not None and stop.is_set():
            close()
        stats.source_cpu_s = time.thread_time() - cpu
    _put(pending, _DONE, stop)


def _put(pending: queue.Queue, entry, stop: threading.Event) -> None:
    # Poll so an abandoned consumer (stop set) never leaves this thread blocked on a full queue.
    while not stop.is_set():
        try:
            pending.put(entry, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(pending: queue.Queue) -> None:
    while True:
        try:
            entry = pending.get_nowait()
        except queue.Empty:
            return
        if isinstance(entry, Future):
            entry.cancel()
