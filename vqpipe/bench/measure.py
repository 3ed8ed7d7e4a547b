"""``run_bench``: one worker's model ceiling, decode ceiling and pipeline, measured in interleaved rounds."""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

from vqpipe.bench.inputs import bench_samples
from vqpipe.bench.probes import (
    DECODE_SAMPLES,
    code_agreement,
    precision_variants,
    precision_probes,
    decode_probe,
    flops_per_image,
    interleaved,
    model_input,
    model_probes,
    pipeline_probes,
)
from vqpipe.bench.report import (
    PEAK_TFLOPS,
    BenchReport,
    ModelFigures,
    PipelineFigures,
    PrecisionFigures,
    Setup,
    _peak_kind,
    advice,
    peak_device,
)
from vqpipe.config import ConfigError, RunConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model, pick_device
from vqpipe.run.shard_job import ShardResult
from vqpipe.torch_threads import single_threaded_pool


def run_bench(config: RunConfig, samples: int, repeats: int, jpeg_size: tuple[int, int] | None = None,
              torch_threads: int | None = None, jpeg_quality: int = 90) -> BenchReport:
    """Measure the ceilings and the pipeline in interleaved rounds (so drift on a shared machine
    hits them alike) and derive the efficiency; restores torch's thread count."""
    images, source = bench_samples(config, samples, jpeg_size, jpeg_quality)
    encoder = _encoder(config)
    setup = _setup(config, encoder, samples, repeats, source, torch_threads)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vqpipe-bench-") as tmp, \
            single_threaded_pool(setup.decode_threads, "vqpipe-decode") as pool:
        try:
            x = model_input(images, config, encoder)
            pipelines = pipeline_probes(images, config, encoder, setup, Path(tmp), pool)
            decode_images = images[:DECODE_SAMPLES]
            probes = {**model_probes(x, encoder, setup), **precision_probes(x, encoder, setup),
                      "decode": decode_probe(decode_images, config),
                      "decode_pillow": decode_probe(decode_images, config, fast=False), **pipelines}
            rates = interleaved(probes, repeats)
            flops = flops_per_image(encoder.model, x)
            agreement = code_agreement(x, encoder)
        finally:
            torch.set_num_threads(threads_before)
    report = _report(setup, rates, flops, pipelines["pipeline"].median_run(), agreement["model"])
    report.precisions = [PrecisionFigures(name, eager, rates[probe], agreement[probe])
                         for probe, (name, eager) in precision_variants(encoder).items()]
    return report


def _report(setup: Setup, rates: dict[str, float], flops: float, median_run: ShardResult,
            agreement: float) -> BenchReport:
    peaks = PEAK_TFLOPS.get(peak_device(setup.device_name) or "") if setup.device.startswith("cuda") else None
    kind = _peak_kind(setup.precision) if peaks else None
    model = ModelFigures(rates["model"], rates["model_fp32_eager"], rates.get("model_all_cores"), flops,
                         flops * rates["model"] / 1e12, peaks[kind] if peaks else None, kind, agreement)
    times = {k: round(v, 3) for k, v in dataclasses.asdict(median_run.times).items()}
    pipeline = PipelineFigures(rates["pipeline"], median_run.rows, times, rates.get("pipeline_all_cores"))
    decode = rates["decode"] * setup.decode_threads
    report = BenchReport(setup, model, rates["decode"], pipeline, rates["decode_pillow"],
                         pipeline.img_s / min(model.img_s, decode), "model" if model.img_s <= decode else "decode")
    report.advice = advice(report)
    report.peak_rss_mb = peak_rss_mb()
    if setup.device.startswith("cuda"):
        report.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return report


def peak_rss_mb() -> float:
    """This process's peak resident set (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def load_bench_model(config: RunConfig):
    try:
        return load_model(config.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path {config.model.path!r} cannot be read: {err}") from None


def _encoder(config: RunConfig) -> TokenEncoder:
    return TokenEncoder.from_config(load_bench_model(config), pick_device(), config)


def _setup(config: RunConfig, encoder: TokenEncoder, samples: int, repeats: int, source: str,
           torch_threads: int | None) -> Setup:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = config.decode_threads
    cuda = encoder.device.type == "cuda"
    if torch_threads is None:
        # As in a CPU-only worker: Ray sets an actor's torch threads to its CPUs (ray.cpus_per_worker,
        # clamped to the machine), and the decode threads run beside them (decoding is a few percent
        # of the model's CPU time at demo sizes, so taking cores from torch for it measured slower).
        torch_threads = torch.get_num_threads() if cuda else max(1, min(cores, config.ray.cpus_per_worker))
    name = torch.cuda.get_device_name(encoder.device) if cuda else _cpu_name()
    return Setup(str(encoder.device), name, cores, threads, torch_threads, encoder.precision, encoder.compiled,
                 config.preprocess.resolution, encoder.batch_size, samples, repeats, source, os.getloadavg()[0],
                 _cpu_passes(encoder, config.preprocess.resolution, torch_threads))


def _cpu_passes(encoder: TokenEncoder, resolution: int, torch_threads: int) -> str | None:
    if encoder.device.type != "cpu":
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)  # the encoder runs a stream per torch thread of its caller
    try:
        return encoder.describe(resolution)
    finally:
        torch.set_num_threads(before)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
