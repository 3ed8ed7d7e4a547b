"""Ordered parallel map: order kept, errors surface where they happened, memory bounded."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vqpipe.input.prefetch import PrefetchStats, ordered_parallel_map


def test_keeps_order_when_later_items_finish_first():
    def slow_square(x):
        time.sleep(0.01 * (x % 3))
        return x * x

    with ThreadPoolExecutor(4) as pool:
        assert list(ordered_parallel_map(slow_square, range(50), pool, max_pending=8)) == [x * x for x in range(50)]


def test_runs_items_concurrently():
    # Four items that each wait at a barrier of four can only finish if they run at the same time:
    # a serial map would time out on the first.
    barrier = threading.Barrier(4, timeout=10)

    def meet(x):
        barrier.wait()
        return x

    with ThreadPoolExecutor(4) as pool:
        assert list(ordered_parallel_map(meet, range(8), pool, max_pending=4)) == list(range(8))


def test_source_error_surfaces_after_earlier_results():
    def source():
        yield 1
        yield 2
        raise OSError("shard truncated")

    got = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="truncated"):
        for value in ordered_parallel_map(lambda x: x, source(), pool, max_pending=4):
            got.append(value)
    assert got == [1, 2]


def test_bounded_read_ahead():
    pulled = []
    lock = threading.Lock()

    def source():
        for i in range(1000):
            with lock:
                pulled.append(i)
            yield i

    stats = PrefetchStats()
    with ThreadPoolExecutor(2) as pool:
        results = ordered_parallel_map(lambda x: x, source(), pool, max_pending=5, stats=stats)
        assert next(results) == 0
        time.sleep(0.2)
        # queue of 5 + one item in the producer's hand + the one consumed
        assert len(pulled) <= 8
        results.close()


def test_stats_count_source_and_wait_time():
    def slow_source():
        for i in range(3):
            time.sleep(0.05)
            yield i

    def slow_fn(x):
        time.sleep(0.1)
        return x

    stats = PrefetchStats()
    with ThreadPoolExecutor(1) as pool:
        assert list(ordered_parallel_map(slow_fn, slow_source(), pool, max_pending=2, stats=stats)) == [0, 1, 2]
    # three 50 ms pulls from the source; the consumer waits for three 100 ms results on one thread
    assert stats.source_s >= 0.15
    assert stats.wait_s >= 0.25
