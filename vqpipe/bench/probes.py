"""Timed probes: model passes, image decoding per core, ``process_shard`` end to end."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vqpipe.bench.inputs import _preprocess, write_shard
from vqpipe.bench.report import Setup
from vqpipe.config import RunConfig
from vqpipe.encode import precision
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.records import Sample
from vqpipe.run.shard_job import ShardResult, make_settings, process_shard

MIN_TIMING_S = 0.2  # per timed repeat: a GPU batch takes microseconds, so repeat it this long
DECODE_SAMPLES = 256  # the decode ceiling is timed on at most this many images


# --- measurements -----------------------------------------------------------------------------

Probe = Callable[[], float]  # one timed measurement, warmed up already: returns img/s


def interleaved(probes: dict[str, Probe], repeats: int) -> dict[str, float]:
    """Median img/s per probe; each round runs every probe once, in turn."""
    rates: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(repeats):
        for name, probe in probes.items():
            rates[name].append(probe())
    return {name: statistics.median(r) for name, r in rates.items()}


def model_probes(x: torch.Tensor, encoder: TokenEncoder, setup: Setup) -> dict[str, Probe]:
    """Encode on device-resident input: as the worker's encoder runs it, plain fp32 eager in one
    pass, and (CPU) the encoder with torch on every core."""
    configured = encoder.encode_tensor
    variants = {"model": _threaded(configured, setup.torch_threads),
                "model_fp32_eager": _threaded(encoder.model.tokenize, setup.torch_threads)}
    if encoder.device.type == "cpu" and setup.torch_threads != setup.cores:
        variants["model_all_cores"] = _threaded(configured, setup.cores)
    return {name: _calls_probe(fn, x) for name, fn in variants.items()}


def precision_variants(encoder: TokenEncoder) -> dict[str, tuple[str, bool]]:
    """Probe name -> ``(precision, eager)`` of the model passes timed besides the configured one: on
    CUDA every precision, compiled (when the encoder is) and eager; on a CPU none (AMP is slower there,
    and bf16 convolutions take a ~30x slower path on CPUs without AVX512-BF16/AMX)."""
    if encoder.device.type != "cuda":
        return {}
    modes = (False, True) if encoder.compiled else (True,)
    return {f"model_{name}{'_eager' if eager and encoder.compiled else ''}": (name, eager)
            for name in precision.NAMES for eager in modes}


def precision_probes(x: torch.Tensor, encoder: TokenEncoder, setup: Setup) -> dict[str, Probe]:
    return {probe: _calls_probe(_threaded(lambda t, n=name, e=eager: encoder.encode_tensor(t, n, e),
                                          setup.torch_threads), x)
            for probe, (name, eager) in precision_variants(encoder).items()}


@torch.inference_mode()
def code_agreement(x: torch.Tensor, encoder: TokenEncoder) -> dict[str, float]:
    """Share of code positions equal to the model's eager fp32 codes on the same input, for the
    configured pass (``model``) and every precision variant."""
    reference = encoder.encode_tensor(x, "fp32", eager=True)[0]
    runs = {"model": (encoder.precision, False), **precision_variants(encoder)}
    return {probe: float((encoder.encode_tensor(x, name, eager)[0] == reference).float().mean())
            for probe, (name, eager) in runs.items()}


def model_input(samples: list[Sample], config: RunConfig, encoder: TokenEncoder) -> torch.Tensor:
    """One batch of the benchmark's own images, scaled and on the device. Real pixels, not noise:
    uniform noise took ~15% more CPU time per image than photos through the demo encoder."""
    pixels = [_preprocess(s, config).pixels for s in samples[:encoder.batch_size]]
    batch = np.stack([pixels[i % len(pixels)] for i in range(encoder.batch_size)])
    low, high = config.preprocess.value_range
    x = torch.from_numpy(batch).to(encoder.device).permute(0, 3, 1, 2).float() * ((high - low) / 255.0) + low
    return x.contiguous(memory_format=encoder.memory_format)


def _threaded(fn: Callable, threads: int) -> Callable:
    def run(x):
        torch.set_num_threads(threads)
        return fn(x)
    return run


def _calls_probe(fn: Callable, x: torch.Tensor) -> Probe:
    """Calls ``fn(x)`` often enough to last ``MIN_TIMING_S`` (a GPU batch takes microseconds)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def timed(n: int) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(n):
            fn(x)
        sync()
        return time.perf_counter() - started

    timed(2)  # warm-up, and compilation
    calls = max(1, min(1000, math.ceil(MIN_TIMING_S / max(timed(1), 1e-6))))
    return lambda: x.shape[0] * calls / timed(calls)


@torch.inference_mode()
def flops_per_image(model, x: torch.Tensor) -> float:
    # Counted on one image of the eager fp32 graph (a compiled graph hides its ops from the
    # counter); every op of the encoder and the codebook search is linear in the batch.
    with FlopCounterMode(display=False) as counter:
        model.tokenize(x[:1])
    return float(counter.get_total_flops())


def decode_probe(samples: list[Sample], config: RunConfig, fast: bool | None = None) -> Probe:
    """Single-thread preprocessing img/s (decode, orient, resize, crop): one core's worth;
    ``fast=False``: the Pillow path alone."""
    _preprocess(samples[0], config, fast)

    def probe() -> float:
        # This thread's CPU time, not the wall clock: on a shared machine the wall clock counts
        # other jobs' time slices too, and "per core" is what one core's seconds buy.
        started = time.thread_time()
        for sample in samples:
            _preprocess(sample, config, fast)
        return len(samples) / (time.thread_time() - started)
    return probe


class PipelineProbe:
    """``process_shard`` over the scratch shard with ``threads`` torch threads; keeps every run."""

    def __init__(self, url: str, job, encoder: TokenEncoder, pool: ThreadPoolExecutor, threads: int):
        self.url, self.job, self.encoder, self.pool, self.threads = url, job, encoder, pool, threads
        self.runs: list[tuple[float, ShardResult]] = []

    def __call__(self) -> float:
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        result = process_shard(self.url, f"t{self.threads}-{len(self.runs)}", self.job, self.encoder, self.pool)
        self.runs.append((result.rows / (time.perf_counter() - started), result))
        return self.runs[-1][0]

    def median_run(self) -> ShardResult:
        return sorted(self.runs, key=lambda run: run[0])[len(self.runs) // 2][1]


def pipeline_probes(samples: list[Sample], config: RunConfig, encoder: TokenEncoder, setup: Setup, tmp: Path,
                    pool: ThreadPoolExecutor) -> dict[str, PipelineProbe]:
    """The configured pipeline and (CPU) one with torch on every core, warmed on a small shard."""
    url = write_shard(tmp / "bench.tar", samples)
    warm = write_shard(tmp / "warm.tar", samples[:2 * encoder.batch_size])
    job = scratch_job(config, encoder, url, str(tmp / "out"))
    probes = {"pipeline": PipelineProbe(url, job, encoder, pool, setup.torch_threads)}
    if encoder.device.type == "cpu" and setup.torch_threads != setup.cores:
        probes["pipeline_all_cores"] = PipelineProbe(url, job, encoder, pool, setup.cores)
    torch.set_num_threads(setup.torch_threads)
    process_shard(warm, "warm", job, encoder, pool)  # model first-call costs (compilation) out of the clock
    return probes


def scratch_job(config: RunConfig, encoder: TokenEncoder, url: str, out: str):
    input_cfg = dataclasses.replace(config.input, urls=(url,), storage_options={})
    output = dataclasses.replace(config.output, path=out, storage_options={})
    return make_settings(input_cfg, config.preprocess, output, encoder.model, encoder.precision,
                         config.model.audit_samples)
