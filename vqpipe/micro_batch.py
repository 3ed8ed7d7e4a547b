"""How many images one forward pass of the encoder takes on a CPU.

A CPU has no batch-level parallelism to feed: oneDNN parallelises each convolution over its
output pixels, and a batch only adds memory traffic once the activations outgrow the last-level
cache. The demo encoder at 128 px (first stage 32 x 128 x 128 fp32, 2 MiB per image) ran 38 img/s
in forward passes of 4 images and 26 img/s in one pass of 16, on 2 cores with a 32 MiB L3
(``tests/benchmarks/bench_model.py --resolution 128 --micro-batches 8 4 2``). On a GPU the whole
batch goes in one pass, as configured.
"""

from __future__ import annotations

import math
from pathlib import Path

# When the cache size cannot be read (macOS, some containers): smaller than most server L3s, so
# the guess errs towards passes that still fit.
FALLBACK_CACHE_BYTES = 16 * 2**20
# A first-stage convolution keeps its input, its output and the residual branch live at once.
LIVE_ACTIVATIONS = 3


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the largest cache of CPU 0 as Linux reports it, else :data:`FALLBACK_CACHE_BYTES`."""
    sizes = []
    for index in root.glob("index*"):
        try:
            sizes.append(_parse_size((index / "size").read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def cpu_micro_batch(batch_size: int, first_channels: int, height: int, width: int,
                    cache_bytes: int | None = None) -> int:
    """Images per forward pass so the first stage's live fp32 activations fit the cache.

    The batch is cut into equal passes (16 with room for 5 -> 4 passes of 4, not 5+5+5+1), so a
    compiled encoder sees one shape. Never below 1: a single image that does not fit still runs.
    """
    cache = cache_bytes if cache_bytes is not None else last_level_cache_bytes()
    per_image = LIVE_ACTIVATIONS * first_channels * height * width * 4
    fits = max(1, cache // per_image)
    passes = math.ceil(batch_size / fits)
    return math.ceil(batch_size / passes)
