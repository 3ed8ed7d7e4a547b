"""Where the JPEG fast path's time goes: the Pillow path, the fast path, and libjpeg-turbo's
DCT-scaled decode alone (the floor no resampler can beat), per image on one thread.

    python tests/benchmarks/bench_jpeg_floor.py --jpeg-size 1024x768 [--jpeg-quality 90]

Uses ``vqpipe bench``'s benchmark images (the demo shards' photos, re-encoded), CPU seconds
(``time.thread_time``), variants interleaved, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import simplejpeg

from vqpipe.bench.cli import _jpeg_size
from vqpipe.bench.inputs import _preprocess, bench_samples
from vqpipe.config import load_config
from vqpipe.input.jpeg_decode import draft_scale


def decode_alone(data: bytes, resolution: int) -> None:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = draft_scale(width, height, resolution)
    simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale))


def ms_per_image(fn, items) -> float:
    started = time.thread_time()
    for item in items:
        fn(item)
    return 1e3 * (time.thread_time() - started) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--jpeg-size", default="1024x768")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config, [f"preprocess.resolution={args.resolution}"])
    samples, source = bench_samples(config, args.samples, _jpeg_size(args.jpeg_size), args.jpeg_quality)
    variants = {"pillow path": lambda s: _preprocess(s, config, fast=False),
                "fast path": lambda s: _preprocess(s, config, fast=True),
                "decode alone": lambda s: decode_alone(s.fields["jpg"], args.resolution)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(ms_per_image(fn, samples))
    print(f"{source}; {args.resolution}px, one thread, medians of {args.repeats} (ms/img)")
    for name, values in times.items():
        print(f"  {name:13s} {statistics.median(values):6.2f}")


if __name__ == "__main__":
    main()
