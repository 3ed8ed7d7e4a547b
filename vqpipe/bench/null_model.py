"""``vqpipe bench CONFIG --null-model``: the worker's pipeline with a model that costs nothing.

:class:`NullEncoder` is the configured :class:`~vqpipe.encode.TokenEncoder` (same upload, same
NaN check, same copy back) whose forward pass returns zero codes and latents of the model's
shapes, preallocated on the device. What ``process_shard`` then measures is everything the
pipeline adds around the model: shard reading, image decoding on the decode threads, batching,
upload, Parquet writing and the commit. Reported: img/s, img/s per decode thread, the main
thread's own CPU time per image (the consumer: batching, upload, writing; ``time.thread_time``),
and the decode stage's wall time per image (above the per-core figure when the threads wait for
a core or the GIL).
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vqpipe.bench.inputs import write_shard
from vqpipe.bench.probes import scratch_job
from vqpipe.config import RunConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.records import Sample
from vqpipe.run.shard_job import process_shard


class NullEncoder(TokenEncoder):
    """A TokenEncoder whose model pass is free: zeros of the right shapes and dtypes."""

    def __init__(self, *args, resolution: int, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.model.config
        side = resolution // cfg.downsample_factor
        self._codes = torch.zeros(self.batch_size, side, side, dtype=torch.int64, device=self.device)
        self._latents = torch.zeros(self.batch_size, cfg.embed_dim, side, side, device=self.device)

    def encode_tensor(self, x: torch.Tensor, precision: str | None = None,
                      eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        return self._codes[:n], self._latents[:n]


@dataclass
class NullFigures:
    img_s: float
    img_s_per_decode_thread: float
    main_thread_ms_per_img: float  # CPU time of the thread that runs process_shard, per image
    decode_ms_per_img: float  # StageTimes.decode_s per image: wall time summed over the decode threads
    rows: int
    decode_threads: int
    samples: int
    repeats: int
    images: str


def null_encoder(config: RunConfig, model, device: torch.device) -> NullEncoder:
    m = config.model
    return NullEncoder(model, device, m.precision, False, m.batch_size, config.preprocess.value_range,
                       m.micro_batch, resolution=config.preprocess.resolution)


def run_null_bench(config: RunConfig, images: list[Sample], source: str, encoder: NullEncoder,
                   decode_threads: int, repeats: int) -> NullFigures:
    """Median over ``repeats`` runs of ``process_shard`` on a scratch shard of ``images``."""

    runs = []
    with tempfile.TemporaryDirectory(prefix="vqpipe-bench-null-") as tmp, \
            ThreadPoolExecutor(decode_threads, thread_name_prefix="vqpipe-decode") as pool:
        url = write_shard(Path(tmp) / "bench.tar", images)
        job = scratch_job(config, encoder, url, str(Path(tmp) / "out"))
        process_shard(url, "warm", job, encoder, pool)
        for i in range(repeats):
            cpu, started = time.thread_time(), time.perf_counter()
            result = process_shard(url, f"run-{i}", job, encoder, pool)
            runs.append((result.rows / (time.perf_counter() - started), time.thread_time() - cpu, result))
    img_s, main_cpu, result = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    rows = max(result.rows, 1)
    return NullFigures(img_s, img_s / decode_threads, 1e3 * main_cpu / rows, 1e3 * result.times.decode_s / rows,
                       result.rows, decode_threads, len(images), repeats, source)


def format_null_report(f: NullFigures, config_path: str) -> str:
    return "\n".join([
        f"vqpipe bench {config_path} --null-model: {f.samples} samples, {f.decode_threads} decode thread(s), "
        f"medians of {f.repeats}", f"images: {f.images}", "",
        "| figure | value |", "|---|---:|",
        f"| pipeline, model replaced by zeros (img/s) | {f.img_s:.1f} |",
        f"| img/s per decode thread | {f.img_s_per_decode_thread:.1f} |",
        f"| main thread CPU per image (ms) | {f.main_thread_ms_per_img:.3f} |",
        f"| decode wall time per image, summed over decode threads (ms) | {f.decode_ms_per_img:.3f} |",
        f"| rows written | {f.rows} |",
    ])

