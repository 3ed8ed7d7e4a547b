"""Thread pools whose threads each run torch ops on one thread of their own.

torch's intra-op thread count is an OpenMP setting of each calling thread, initialised from a
process-wide default on the thread's first op. A decode thread left at the default (the actor's
CPU count) may turn a large resize into an OpenMP team of that many threads beside the model's;
one thread per image per decode thread is all the parallelism decoding needs. (Measured on 2
cores: 4% less CPU per 1024x768 image, within noise at 256 px: tests/benchmarks/bench_pipeline_parts.py.)
The pool's threads fix their own count to 1; the default (and so every other thread, the
caller's and any made later included) is left as it was.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def single_threaded_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, all started now, each with one torch thread."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    ready = threading.Barrier(threads)
    before = torch.get_num_threads()
    # One task per thread, held at the barrier until all have started: every thread is set up.
    list(pool.map(lambda _: _one_thread(ready), range(threads)))
    torch.set_num_threads(before)  # setting a thread's count also moved the process default
    return pool


def torch_threads_of(pool: ThreadPoolExecutor, threads: int) -> list[int]:
    """Each of the pool's ``threads`` threads' torch thread count (for checks and tests)."""
    ready = threading.Barrier(threads)
    return list(pool.map(lambda _: _threads_here(ready), range(threads)))


def _one_thread(ready: threading.Barrier) -> None:
    torch.get_num_threads()  # the thread's first torch call initialises it from the default...
    torch.set_num_threads(1)  # ...so set it after, or that initialisation would undo this
    ready.wait(timeout=60)


def _threads_here(ready: threading.Barrier) -> int:
    ready.wait(timeout=60)
    return torch.get_num_threads()
