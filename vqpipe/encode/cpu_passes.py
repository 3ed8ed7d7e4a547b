"""How a CPU worker runs a batch through the encoder: in cache-sized passes, on single-threaded
streams.

Two things make a CPU slow on a batch that a GPU would take in one pass:

- *Cache.* oneDNN parallelises each convolution over its output pixels, so a larger batch adds no
  useful parallelism, only memory traffic once the activations outgrow the last-level cache. The
  demo encoder at 128 px (first stage 32 x 128 x 128 fp32, 2 MiB per image) ran 38 img/s in passes
  of 4 images and 26 img/s in one pass of 16 (2 cores, 32 MiB L3).
- *Synchronisation.* With every core inside each op, the many small ops (GroupNorm, SiLU, adds)
  end in a barrier that waits for the slowest thread, and a decode thread that takes a core
  stalls all of them. Streams -- one torch thread each, each running whole passes -- have no
  barriers: 42.5 img/s for passes of 2 on 2 streams vs 38.6 for the same passes one at a time on
  2 threads.

(``tests/benchmarks/bench_model.py --resolution 128 --micro-batches 4 2 --streams``.) On a GPU the whole batch goes in one pass, as configured.
"""

from __future__ import annotations

import math
import logging
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch

from vqpipe.torch_threads import single_threaded_pool, torch_threads_of

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# When the cache cannot be read (macOS, some containers): smaller than most server L3s, so the
# guess errs towards passes that still fit.
FALLBACK_CACHE_BYTES = 16 * 2**20
# A first-stage convolution keeps its input, its output and the residual branch live at once.
LIVE_ACTIVATIONS = 3
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache(root: Path = SYSFS_CACHE) -> tuple[int, int]:
    """``(bytes, CPUs sharing it)`` of CPU 0's largest cache as Linux reports it; else
    ``(FALLBACK_CACHE_BYTES, 1)``."""
    best = (FALLBACK_CACHE_BYTES, 1)
    found = False
    for index in root.glob("index*"):
        try:
            size = _parse_size((index / "size").read_text().strip())
            sharing = _count_cpus((index / "shared_cpu_list").read_text().strip())
        except (OSError, ValueError):
            continue
        if not found or size > best[0]:
            best, found = (size, sharing), True
    return best


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def _count_cpus(cpu_list: str) -> int:
    """``0-3,8-11`` -> 8."""
    count = 0
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def cache_per_stream(streams: int, cache: tuple[int, int] | None = None) -> int:
    """The share of the last-level cache one stream can count on: streams on CPUs that share a
    cache split it; beyond that many, the rest run under other caches."""
    size, sharing = cache if cache is not None else last_level_cache()
    return size // max(1, min(streams, sharing))


def cpu_micro_batch(batch_size: int, first_channels: int, height: int, width: int, cache_bytes: int) -> int:
    """Images per pass so the first stage's live fp32 activations fit ``cache_bytes``.

    The batch is cut into equal passes (16 with room for 5 -> 4 passes of 4, not 5+5+5+1), so a
    compiled encoder sees one shape. Never below 1: a single image that does not fit still runs.
    """
    per_image = LIVE_ACTIVATIONS * first_channels * height * width * 4
    fits = max(1, cache_bytes // per_image)
    passes = math.ceil(batch_size / fits)
    return math.ceil(batch_size / passes)


class Streams:
    """``streams`` threads that each run torch ops on one thread of their own
    (:func:`vqpipe.torch_threads.single_threaded_pool`)."""

    def __init__(self, streams: int):
        self.streams = streams
        self._pool = single_threaded_pool(streams, "vqpipe-encode")
        weakref.finalize(self, self._pool.shutdown, wait=False)
        self.single_threaded = all(n == 1 for n in torch_threads_of(self._pool, streams))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(item) ...]`` in order, computed on the streams under inference mode (a per-thread
        setting, so the caller's does not carry over)."""
        def run(item: T) -> R:
            with torch.inference_mode():
                return fn(item)

        return list(self._pool.map(run, items))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def start_streams(count: int) -> Streams | None:
    """``count`` streams, or None where one thread is all there is or this torch build cannot
    give each thread its own thread count (streams would then oversubscribe the cores)."""
    if count < 2:
        return None
    streams = Streams(count)
    if not streams.single_threaded:
        log.warning("torch cannot run single-threaded streams here: encoding on %d threads instead", count)
        streams.close()
        return None
    return streams
