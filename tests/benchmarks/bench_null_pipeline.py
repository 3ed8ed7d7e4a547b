"""One worker's null-model pipeline, for comparing two checkouts of vqpipe on the same images.

    PYTHONPATH=/path/to/checkout python tests/benchmarks/bench_null_pipeline.py 256x256 95 2048 2

(JPEG size, quality, images, decode threads.) Unlike `vqpipe bench --null-model`, it only uses
what older checkouts have too: `process_shard` with the null encoder on a scratch shard of the
demo shards' photos re-encoded, plain decode threads where the checkout has no single-threaded
pool. Prints img/s, the main thread's and the whole process's CPU per image (median of 3 runs),
and the tar reading alone per sample.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vqpipe.bench import null_model
from vqpipe.bench.inputs import bench_samples, write_shard
from vqpipe.bench.measure import load_bench_model
from vqpipe.bench.probes import scratch_job
from vqpipe.config import load_config
from vqpipe.input.shards import iter_samples
from vqpipe.model.loading import pick_device
from vqpipe.run.shard_job import process_shard


def main(size: str, quality: int, n: int, threads: int) -> None:
    config = load_config("configs/demo.yaml", ["preprocess.resolution=256"])
    width, height = (int(v) for v in size.split("x"))
    images, _ = bench_samples(config, n, (width, height), quality)
    encoder = null_model.null_encoder(config, load_bench_model(config), pick_device())
    tmp = tempfile.mkdtemp(prefix="vqpipe-null-")
    url = write_shard(Path(tmp) / "bench.tar", images)
    job = scratch_job(config, encoder, url, str(Path(tmp) / "out"))
    tars = []
    for _ in range(3):
        cpu = time.thread_time()
        read = list(iter_samples(url, {}, on_failure=print))
        tars.append(1e3 * (time.thread_time() - cpu) / len(read))
    try:
        from vqpipe.torch_threads import single_threaded_pool
        pool = single_threaded_pool(threads, "vqpipe-decode")
    except ImportError:  # a checkout from before it
        pool = ThreadPoolExecutor(threads)
    process_shard(url, "warm", job, encoder, pool)
    runs = []
    for i in range(3):
        cpu, process_cpu, started = time.thread_time(), time.process_time(), time.perf_counter()
        result = process_shard(url, f"run-{i}", job, encoder, pool)
        runs.append((result.rows / (time.perf_counter() - started), 1e3 * (time.thread_time() - cpu) / result.rows,
                     1e3 * (time.process_time() - process_cpu) / result.rows))
    img_s, main_ms, process_ms = sorted(runs)[1]
    print(f"{size} q{quality}, {threads} decode threads: {img_s:.0f} img/s, main thread {main_ms:.3f} ms/img, "
          f"process {process_ms:.3f} ms/img, tar reading alone {statistics.median(tars):.3f} ms/sample")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
