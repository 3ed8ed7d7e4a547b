"""The pipeline's parts before and after issue 17's changes, each pair timed interleaved in one
process (CPU time, medians of 5), on the demo shards' photos re-encoded as JPEGs:

    python tests/benchmarks/bench_pipeline_parts.py [WxH Q]   (default 256x256 95)

- decode on 2 threads: a plain ThreadPoolExecutor vs ``single_threaded_pool`` (img/s, process CPU);
- tar reading: tarfile's stream mode vs ``tar_stream`` (ms per sample);
- Parquet, 1 024 rows of random float32 4x64x64 latents: with vs without min/max statistics;
- float16 latents: a numpy cast plus the elementwise overflow check vs ``narrow_rows``;
- the NaN check on a batch of 64: ``isfinite().all()`` vs the row-sum reduction.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vqpipe.bench.inputs import bench_samples, write_shard
from vqpipe.config import load_config
from vqpipe.encode.encoder import _finite_rows
from vqpipe.input import shards, tar_stream
from vqpipe.input.images import preprocess
from vqpipe.output.arrays import narrow_rows, to_fixed_list_array
from vqpipe.torch_threads import single_threaded_pool

REPEATS = 5


def interleaved(pairs: dict[str, tuple]) -> None:
    """``{name: (before, after)}``, each a callable returning one figure; medians, in turn."""
    for name, (before, after) in pairs.items():
        got = {"before": [], "after": []}
        for _ in range(REPEATS):
            got["before"].append(before())
            got["after"].append(after())
        b, a = statistics.median(got["before"]), statistics.median(got["after"])
        print(f"| {name} | {b:.4g} | {a:.4g} |")


def main(size: tuple[int, int], quality: int) -> None:
    config = load_config("configs/demo.yaml", ["preprocess.resolution=256"])
    images, _ = bench_samples(config, 1024 if size[0] * size[1] <= 256 * 256 else 256, size, quality)
    url = write_shard(Path(tempfile.mkdtemp()) / "bench.tar", images)
    samples = list(shards.iter_samples(url, {}, on_failure=print))
    plain, single = ThreadPoolExecutor(2), single_threaded_pool(2, "bench-decode")  # made at torch's default

    def decode(pool, figure):
        def run():
            cpu, started = time.process_time(), time.perf_counter()
            list(pool.map(lambda s: preprocess(s, resolution=256), samples))
            return len(samples) / (time.perf_counter() - started) if figure == "img/s" else \
                1e3 * (time.process_time() - cpu) / len(samples)
        return run

    def reading(opener):
        def run():
            original, shards.open_tar_stream = shards.open_tar_stream, opener
            try:
                cpu = time.thread_time()
                n = sum(1 for _ in shards.iter_samples(url, {}, on_failure=print))
                return 1e3 * (time.thread_time() - cpu) / n
            finally:
                shards.open_tar_stream = original
        return run

    rows = 1024
    latents = np.random.default_rng(0).standard_normal((rows, 4, 64, 64)).astype(np.float32)
    table = pa.table({"latents": to_fixed_list_array(latents, pa.float32())})

    def parquet(statistics_on):
        def run():
            cpu = time.process_time()
            pq.write_table(table, io.BytesIO(), compression="zstd", use_dictionary=False,
                           write_statistics=statistics_on, row_group_size=rows)
            return 1e3 * (time.process_time() - cpu) / rows
        return run

    def numpy_narrowing():
        cpu = time.thread_time()
        with np.errstate(over="ignore"):
            cast = latents.astype(np.float16)
            (np.isfinite(latents) & ~np.isfinite(latents.astype(np.float16))).reshape(rows, -1).any(axis=1)
        to_fixed_list_array(cast, pa.float16())
        return 1e3 * (time.thread_time() - cpu) / rows

    def torch_narrowing():
        cpu = time.thread_time()
        narrow_rows(latents, pa.float16())
        return 1e3 * (time.thread_time() - cpu) / rows

    batch = torch.from_numpy(latents[:64])

    def nan_check(fn):
        def run():
            cpu = time.thread_time()
            for _ in range(20):
                fn(batch)
            return 1e3 * (time.thread_time() - cpu) / (20 * 64)
        return run

    print(f"| part | before | after |\n|---|---:|---:|")
    # With torch's default thread count (a Ray actor's: its CPUs), as the plain pool's threads had it.
    interleaved({
        f"decode, 2 threads (torch default {torch.get_num_threads()}), img/s": (decode(plain, "img/s"),
                                                                                 decode(single, "img/s")),
        "decode, 2 threads, process CPU ms per image": (decode(plain, "cpu"), decode(single, "cpu")),
    })
    torch.set_num_threads(1)  # the host-side ops as a GPU worker's main thread runs them
    interleaved({
        "tar reading, CPU ms per sample": (reading(lambda f: tar_stream.TarfileStream(tar_stream._Prefixed(b"", f), "r|*")),
                                           reading(tar_stream.open_tar_stream)),
        "Parquet latents, CPU ms per image": (parquet(True), parquet(False)),
        "float16 narrowing, CPU ms per image": (numpy_narrowing, torch_narrowing),
        "NaN check, CPU ms per image": (nan_check(lambda x: torch.isfinite(x).flatten(1).all(dim=1)),
                                        nan_check(_finite_rows)),
    })


if __name__ == "__main__":
    size = tuple(int(v) for v in sys.argv[1].split("x")) if len(sys.argv) > 1 else (256, 256)
    main(size, int(sys.argv[2]) if len(sys.argv) > 2 else 95)
