"""``vqpipe bench CONFIG --null-model``: the worker's pipeline with a model that costs nothing.

:class:`NullEncoder` is the configured :class:`~vqpipe.encode.TokenEncoder` (same staging, same
upload, same NaN check, same copy back) whose forward pass returns zero codes and latents of the
model's shapes, preallocated on the device. What ``process_shard`` then measures is everything
the pipeline adds around the model: shard reading, image decoding on the decode threads,
batching, upload, Parquet writing and the commit -- the CPU half of a GPU worker.

On a CPU device the uint8 -> float scaling of the model's input is device work like the model
itself (a GPU worker runs it on the GPU after a uint8 upload), so the null encoder copies the
batch into a device-side uint8 buffer, as the upload would, and skips the scaling.

Reported: img/s, img/s per decode thread, and the CPU time per image of each thread
(``time.thread_time``): the main thread (batching, upload, handing rows to the writer), the
shard-reading thread (tar parsing), the decode threads (summed) and the Parquet writing thread.
The reading, main and writing threads are one each per worker process, so the slowest of them
is the ceiling one process can feed whatever its core count; everything summed is what a worker
needs in cores per image/s.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqpipe.bench.inputs import write_shard
from vqpipe.bench.probes import DECODE_SAMPLES, decode_probe, scratch_job
from vqpipe.config import RunConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.records import Sample
from vqpipe.run.shard_job import process_shard
from vqpipe.torch_threads import single_threaded_pool


class NullEncoder(TokenEncoder):
    """A TokenEncoder whose model pass is free: zeros of the right shapes and dtypes."""

    def __init__(self, *args, resolution: int, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.model.config
        side = resolution // cfg.downsample_factor
        self._codes = torch.zeros(self.batch_size, side, side, dtype=torch.int64, device=self.device)
        self._latents = torch.zeros(self.batch_size, cfg.embed_dim, side, side, device=self.device)
        self._uploaded: torch.Tensor | None = None

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu":
            return super()._to_device(pixels)  # the upload is the host's work, the scaling the GPU's
        if isinstance(pixels, torch.Tensor):
            return pixels.permute(0, 3, 1, 2)  # decoded on the device already (preprocess.decoder: gpu)
        if self._uploaded is None or self._uploaded.shape[1:] != pixels.shape[1:] or len(self._uploaded) < len(pixels):
            self._uploaded = torch.empty((max(len(pixels), self.batch_size), *pixels.shape[1:]), dtype=torch.uint8)
        uploaded = self._uploaded[:len(pixels)]
        np.copyto(uploaded.numpy(), pixels)  # one memcpy, as the DMA would be: no OpenMP team
        return uploaded.permute(0, 3, 1, 2)

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
    read_cpu_ms_per_img: float = 0.0  # the shard-reading thread
    decode_cpu_ms_per_img: float = 0.0  # summed over the decode threads
    write_cpu_ms_per_img: float = 0.0  # the Parquet writing thread
    process_cpu_ms_per_img: float = 0.0  # every thread of the process
    decode_ceiling_img_s: float = 0.0  # one thread's decode rate per CPU-second, timed between the runs

    @property
    def efficiency(self) -> float:
        """The pipeline against its decode threads' ceiling (issue 17's floor: 0.9)."""
        ceiling = self.decode_ceiling_img_s * self.decode_threads
        return self.img_s / ceiling if ceiling else 0.0

    @property
    def serial_ceiling_img_s(self) -> float:
        """What one process can feed with unlimited cores: its slowest one-per-process thread."""
        slowest = max(self.main_thread_ms_per_img, self.read_cpu_ms_per_img, self.write_cpu_ms_per_img)
        return 1e3 / slowest if slowest else float("inf")


def null_encoder(config: RunConfig, model, device: torch.device) -> NullEncoder:
    m = config.model
    return NullEncoder(model, device, m.precision, False, m.batch_size, config.preprocess.value_range,
                       m.micro_batch, resolution=config.preprocess.resolution)


def run_null_bench(config: RunConfig, images: list[Sample], source: str, encoder: NullEncoder,
                   decode_threads: int, repeats: int) -> NullFigures:
    """Median over ``repeats`` runs of ``process_shard`` on a scratch shard of ``images``, each run
    after a timing of the per-core decode ceiling (so the machine's drift hits both alike).

    On a CPU device the main thread runs its torch ops (the NaN check) on one thread, as a GPU
    worker's host would: its device work is the GPU's, and an OpenMP team of the machine's size
    would spin on the cores the decode threads need."""
    runs = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vqpipe-bench-null-") as tmp, \
            single_threaded_pool(decode_threads, "vqpipe-decode") as pool:
        if encoder.device.type == "cpu":
            torch.set_num_threads(1)
        url = write_shard(Path(tmp) / "bench.tar", images)
        job = scratch_job(config, encoder, url, str(Path(tmp) / "out"))
        process_shard(url, "warm", job, encoder, pool)
        ceiling = decode_probe(images[:DECODE_SAMPLES], config)
        ceilings = []
        for i in range(repeats):
            ceilings.append(ceiling())
            cpu, process_cpu, started = time.thread_time(), time.process_time(), time.perf_counter()
            result = process_shard(url, f"run-{i}", job, encoder, pool)
            runs.append((result.rows / (time.perf_counter() - started), time.thread_time() - cpu,
                         time.process_time() - process_cpu, result))
        torch.set_num_threads(threads)
    img_s, main_cpu, process_cpu, result = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    rows, times = max(result.rows, 1), result.times
    per_image = 1e3 / rows
    return NullFigures(img_s, img_s / decode_threads, main_cpu * per_image, times.decode_s * per_image,
                       result.rows, decode_threads, len(images), repeats, source,
                       read_cpu_ms_per_img=times.read_cpu_s * per_image,
                       decode_cpu_ms_per_img=times.decode_cpu_s * per_image,
                       write_cpu_ms_per_img=times.write_cpu_s * per_image,
                       process_cpu_ms_per_img=process_cpu * per_image,
                       decode_ceiling_img_s=statistics.median(ceilings))


def format_null_report(f: NullFigures, config_path: str) -> str:
    return "\n".join([
        f"vqpipe bench {config_path} --null-model: {f.samples} samples, {f.decode_threads} decode thread(s), "
        f"medians of {f.repeats}", f"images: {f.images}", "",
        "| figure | value |", "|---|---:|",
        f"| pipeline, model replaced by zeros (img/s) | {f.img_s:.1f} |",
        f"| img/s per decode thread | {f.img_s_per_decode_thread:.1f} |",
        f"| per-core decode ceiling, timed between the runs (img/s per CPU-second) | {f.decode_ceiling_img_s:.1f} |",
        f"| efficiency: pipeline / (ceiling x {f.decode_threads} decode thread(s)) | {f.efficiency:.2f} |",
        f"| CPU ms per image: main thread (batching, upload, handing rows over) | {f.main_thread_ms_per_img:.3f} |",
        f"| CPU ms per image: shard-reading thread (tar parsing) | {f.read_cpu_ms_per_img:.3f} |",
        f"| CPU ms per image: decode threads, summed | {f.decode_cpu_ms_per_img:.3f} |",
        f"| CPU ms per image: Parquet writing thread | {f.write_cpu_ms_per_img:.3f} |",
        f"| CPU ms per image: the whole process | {f.process_cpu_ms_per_img:.3f} |",
        f"| decode wall time per image, summed over decode threads (ms) | {f.decode_ms_per_img:.3f} |",
        f"| one process's ceiling: its slowest single thread (img/s) | {f.serial_ceiling_img_s:.0f} |",
        f"| rows written | {f.rows} |",
    ])
