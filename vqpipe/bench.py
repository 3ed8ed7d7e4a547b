"""``vqpipe bench CONFIG``: how fast one worker runs on this machine, and what holds it back.

With the config's model, resolution and batch size, on the device a worker would use:

* model ceiling: the worker's encoder (codes + latents; on a CPU in cache-sized passes on
  single-threaded streams) on tensors already on the device, at the configured precision/compile,
  plus plain ``VQModel.tokenize`` fp32 eager on the whole batch for reference, and the FLOPs;
* decode ceiling: image preprocessing (JPEG decode, resize, crop) per CPU core, single thread,
  and the same through the Pillow path only (``preprocess(fast=False)``), the figure before the
  JPEG fast path;
* pipeline: ``process_shard`` over N samples (a scratch shard built from the input's first
  shards) into a scratch folder, model loaded and compiled beforehand;

then efficiency = pipeline / min(model, decode x decode threads) and the bottleneck. Prints a
table; ``--json OUT`` appends one line per run, so OUT is a history in which regressions show.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from vqpipe import __version__
from vqpipe.config import ConfigError, RunConfig, load_config
from vqpipe.encode import TokenEncoder, load_model, pick_device
from vqpipe.images import preprocess
from vqpipe.records import Failure, Sample, ShardError
from vqpipe.shard_job import ShardResult, make_job, process_shard
from vqpipe.shards import iter_samples
from vqpipe.urls import expand_urls

# Dense (no sparsity) datasheet peaks in TFLOP/s: tensor-core bf16 and TF32, and plain fp32.
# Order matters: the first name found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
}
MIN_TIMING_S = 0.2  # per timed repeat: a GPU batch takes microseconds, so repeat it this long
DECODE_SAMPLES = 256  # the decode ceiling is timed on at most this many images


@dataclass
class Setup:
    device: str
    device_name: str
    cores: int
    decode_threads: int
    torch_threads: int  # torch's intra-op threads in the pipeline (and the CPU model ceiling)
    precision: str
    compiled: bool
    resolution: int
    batch_size: int
    samples: int
    repeats: int
    images: str  # where the benchmark images came from
    load_avg: float  # 1-minute load average at the start: above `cores`, other jobs share the CPUs
    cpu_passes: str | None = None  # how a CPU encoder runs a batch (TokenEncoder.describe)


@dataclass
class ModelFigures:
    img_s: float  # configured precision/compile, torch_threads threads on CPU
    fp32_eager_img_s: float
    all_cores_img_s: float | None  # CPU only: torch on every core
    flops_per_image: float
    achieved_tflops: float
    peak_tflops: float | None  # datasheet peak for the precision, known CUDA devices only
    peak_kind: str | None


@dataclass
class PipelineFigures:
    img_s: float
    rows: int
    stage_times_s: dict  # of the median run; decode_s is summed over the decode threads
    all_cores_img_s: float | None  # CPU only: torch on every core, beside the decode threads


@dataclass
class BenchReport:
    setup: Setup
    model: ModelFigures
    decode_img_s_per_core: float
    pipeline: PipelineFigures
    decode_pillow_img_s_per_core: float  # the Pillow path alone: what decode_img_s_per_core was before
    efficiency: float
    bottleneck: str  # "model" or "decode"
    advice: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated, CUDA only


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="measure model, image-decoding and pipeline throughput of one "
                                                 "worker on this machine")
    _arguments(parser)
    parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqpipe bench", description=__doc__.splitlines()[0])
    _arguments(parser)
    try:
        return cmd_bench(parser.parse_args(argv))
    except ConfigError as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return 2


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: model.batch_size=128")
    parser.add_argument("--samples", type=int, default=256, metavar="N", help="images through the pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (medians are shown)")
    parser.add_argument("--jpeg-size", metavar="WxH", help="re-encode the input's photos as WxH JPEGs first")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q",
                        help="JPEG quality of --jpeg-size re-encoding (LAION's pre-resized 256 px shards: 95)")
    parser.add_argument("--torch-threads", type=int, metavar="T",
                        help="torch threads for the pipeline (CPU default: cores - decode threads)")
    parser.add_argument("--json", metavar="OUT", help="append one JSON line per run to this history file")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the per-core decode ceiling, fast path and Pillow path (no model is loaded)")
    parser.add_argument("--null-model", action="store_true",
                        help="only the pipeline, with the model replaced by free zeros: what reading, decoding, "
                             "batching, upload and writing cost (see vqpipe/bench_null.py)")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.repeats < 1:
        raise ConfigError("--samples and --repeats must be >= 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ConfigError("--torch-threads must be >= 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {args.jpeg_quality} must be in 1..100")
    config = load_config(args.config, args.overrides)
    if args.decode_only:
        return _decode_bench(config, args)
    if args.null_model:
        return _null_bench(config, args)
    report = run_bench(config, args.samples, args.repeats, _jpeg_size(args.jpeg_size), args.torch_threads,
                       args.jpeg_quality)
    print(format_report(report, args.config))
    if args.json:
        append_history(args.json, report, args.config, args.overrides)
    return 0


def _decode_bench(config: RunConfig, args: argparse.Namespace) -> int:
    images, source = bench_samples(config, args.samples, _jpeg_size(args.jpeg_size), args.jpeg_quality)
    images = images[:DECODE_SAMPLES]
    rates = interleaved({"fast": decode_probe(images, config, fast=True), "pillow": decode_probe(images, config, fast=False)},
                        args.repeats)
    print(f"vqpipe bench {args.config} --decode-only: {config.preprocess.resolution}px, {len(images)} images, "
          f"one thread, medians of {args.repeats}\nimages: {source}\n\n| path | img/s per core | ms/img |\n|---|---:|---:|")
    for name, label in (("pillow", "Pillow path only (before)"), ("fast", "with the JPEG fast path")):
        print(f"| {label} | {rates[name]:.1f} | {1e3 / rates[name]:.2f} |")
    print(f"| speed-up | {rates['fast'] / rates['pillow']:.2f}x | |")
    return 0


def _null_bench(config: RunConfig, args: argparse.Namespace) -> int:
    from vqpipe import bench_null

    images, source = bench_samples(config, args.samples, _jpeg_size(args.jpeg_size), args.jpeg_quality)
    encoder = bench_null.null_encoder(config, _model(config), pick_device())
    figures = bench_null.run_null_bench(config, images, source, encoder, decode_threads(config), args.repeats)
    print(bench_null.format_null_report(figures, args.config))
    return 0


def _jpeg_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--jpeg-size {text!r} is not WxH (e.g. 512x384)") from None
    if width < 1 or height < 1:
        raise ConfigError(f"--jpeg-size {text!r} must be positive")
    return width, height


def run_bench(config: RunConfig, samples: int, repeats: int, jpeg_size: tuple[int, int] | None = None,
              torch_threads: int | None = None, jpeg_quality: int = 90) -> BenchReport:
    """Measure the ceilings and the pipeline in interleaved rounds (so drift on a shared machine
    hits them alike) and derive the efficiency; restores torch's thread count."""
    images, source = bench_samples(config, samples, jpeg_size, jpeg_quality)
    encoder = _encoder(config)
    setup = _setup(config, encoder, samples, repeats, source, torch_threads)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vqpipe-bench-") as tmp, \
            ThreadPoolExecutor(setup.decode_threads, thread_name_prefix="vqpipe-decode") as pool:
        try:
            x = model_input(images, config, encoder)
            pipelines = pipeline_probes(images, config, encoder, setup, Path(tmp), pool)
            decode_images = images[:DECODE_SAMPLES]
            probes = {**model_probes(x, encoder, setup), "decode": decode_probe(decode_images, config),
                      "decode_pillow": decode_probe(decode_images, config, fast=False), **pipelines}
            rates = interleaved(probes, repeats)
            flops = flops_per_image(encoder.model, x)
        finally:
            torch.set_num_threads(threads_before)
    return _report(setup, rates, flops, pipelines["pipeline"].median_run())


def _report(setup: Setup, rates: dict[str, float], flops: float, median_run: ShardResult) -> BenchReport:
    peaks = PEAK_TFLOPS.get(peak_device(setup.device_name) or "") if setup.device.startswith("cuda") else None
    kind = _peak_kind(setup.precision) if peaks else None
    model = ModelFigures(rates["model"], rates["model_fp32_eager"], rates.get("model_all_cores"), flops,
                         flops * rates["model"] / 1e12, peaks[kind] if peaks else None, kind)
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


def _model(config: RunConfig):
    try:
        return load_model(config.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path {config.model.path!r} cannot be read: {err}") from None


def decode_threads(config: RunConfig) -> int:
    workers = config.preprocess.decode_workers
    return config.ray.cpus_per_worker if workers == "auto" else workers


def _encoder(config: RunConfig) -> TokenEncoder:
    return TokenEncoder(_model(config), pick_device(), config.model.precision, config.model.compile,
                        config.model.batch_size, config.preprocess.value_range, config.model.micro_batch)


def _setup(config: RunConfig, encoder: TokenEncoder, samples: int, repeats: int, source: str,
           torch_threads: int | None) -> Setup:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = decode_threads(config)
    cuda = encoder.device.type == "cuda"
    if torch_threads is None:
        # As in a CPU-only worker: Ray sets an actor's torch threads to its CPUs (ray.cpus_per_worker,
        # clamped to the machine), and the decode threads run beside them (decoding is a few percent
        # of the model's CPU time at demo sizes, so taking cores from torch for it measured slower).
        torch_threads = torch.get_num_threads() if cuda else max(1, min(cores, config.ray.cpus_per_worker))
    name = torch.cuda.get_device_name(encoder.device) if cuda else _cpu_name()
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[encoder.autocast_dtype]
    return Setup(str(encoder.device), name, cores, threads, torch_threads, precision, encoder.compiled,
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


# --- benchmark images -------------------------------------------------------------------------

def bench_samples(config: RunConfig, n: int, jpeg_size: tuple[int, int] | None,
                  jpeg_quality: int = 90) -> tuple[list[Sample], str]:
    """``n`` samples cycling over the decodable images of the input's first shard(s), read until
    ``n`` are found; re-encoded as ``jpeg_size`` JPEGs when asked. Returns them and a description."""
    found: list[Sample] = []
    skipped: list[Failure] = []
    shards = 0
    for url in expand_urls(list(config.input.urls), config.input.storage_options):
        shards += 1
        try:
            for sample in iter_samples(url, config.input.storage_options, on_failure=skipped.append):
                result = _preprocess(sample, config)
                if isinstance(result, Failure):
                    skipped.append(result)
                else:
                    found.append(sample)
                if len(found) >= n:
                    break
        except ShardError as err:
            raise ConfigError(f"input.urls: {err}") from None
        if len(found) >= n:
            break
    if not found:
        raise ConfigError(f"input.urls: no decodable image in {shards} shard(s) of {list(config.input.urls)}")
    if jpeg_size:
        found = [s for s in (_as_jpeg(s, config, jpeg_size, jpeg_quality) for s in found)
                 if not isinstance(_preprocess(s, config), Failure)]
        if not found:
            raise ConfigError(f"--jpeg-size {jpeg_size[0]}x{jpeg_size[1]}: every image fails preprocessing "
                              f"(preprocess.min_size={config.preprocess.min_size})")
    samples = [Sample(f"{i:08d}", found[i % len(found)].fields, "bench") for i in range(n)]
    size = f", re-encoded as {jpeg_size[0]}x{jpeg_size[1]} JPEG q{jpeg_quality}" if jpeg_size else ""
    return samples, f"{len(found)} distinct images from {shards} input shard(s){size} ({len(skipped)} unusable skipped)"


def _preprocess(sample: Sample, config: RunConfig, fast: bool | None = None):
    """As a worker preprocesses (``fast`` None: the config's ``preprocess.fast_jpeg``)."""
    cfg = config.preprocess
    return preprocess(sample, config.input.image_keys, cfg.resolution, cfg.min_size, max_pixels=cfg.max_pixels,
                      fast=cfg.fast_jpeg if fast is None else fast)


def _as_jpeg(sample: Sample, config: RunConfig, size: tuple[int, int], quality: int = 90) -> Sample:
    key = next(k for k in config.input.image_keys if k in sample.fields)
    with Image.open(io.BytesIO(sample.fields[key])) as img:
        buf = io.BytesIO()
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    fields = {k: v for k, v in sample.fields.items() if k not in config.input.image_keys}
    return Sample(sample.key, {**fields, key: buf.getvalue()}, sample.source)


def write_shard(path: Path, samples: list[Sample]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.fields.items():
                info = tarfile.TarInfo(f"{sample.key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


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


def _peak_kind(precision: str) -> str:
    if precision in ("bf16", "fp16"):
        return "bf16"
    # Convolutions dominate, and cuDNN runs fp32 convolutions in TF32 unless told otherwise.
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def peak_device(device_name: str) -> str | None:
    """``NVIDIA A100-SXM4-80GB`` -> ``A100``; whole words only, so an L40S is not an L4."""
    words = set(device_name.replace("-", " ").split())
    return next((key for key in PEAK_TFLOPS if words.issuperset(key.split())), None)


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
    precision = str(encoder.autocast_dtype or "fp32").replace("torch.", "")
    return make_job(input_cfg, config.preprocess, output, encoder.model, precision)


# --- report -----------------------------------------------------------------------------------

def advice(r: BenchReport) -> list[str]:
    s, decode = r.setup, r.decode_img_s_per_core
    need = r.model.img_s / decode  # decode cores that keep the model busy
    where = "GPU" if s.device.startswith("cuda") else "worker"
    lines = []
    if r.bottleneck == "decode":
        lines.append(f"decode-bound: {need:.1f} decode cores per {where} needed at this model; you gave "
                     f"{s.decode_threads} (preprocess.decode_workers / ray.cpus_per_worker)")
    else:
        lines.append(f"model-bound: {s.decode_threads} decode thread(s) could feed {decode * s.decode_threads:.0f}"
                     f" img/s, the model takes {r.model.img_s:.1f}; {need:.2f} decode cores would do")
        if where == "GPU" and (s.precision == "fp32" or not s.compiled):
            lines.append("model.precision=bf16 and model.compile=true usually raise the model ceiling")
    if where == "worker":
        lines.append(_cpu_advice(r))
    if s.load_avg > s.cores:
        lines.append(f"the machine was busy (load average {s.load_avg:.1f} on {s.cores} cores): other jobs "
                     "shared the CPUs, so these figures are low and noisy")
    if r.efficiency < 0.8:
        lines.append(f"the pipeline reaches {r.efficiency:.0%} of its bound: see stage times (wait_s = model "
                     "starved of images; read_s = shard reading; write_s = Parquet)")
    return lines


def _cpu_advice(r: BenchReport) -> str:
    s = r.setup
    text = (f"CPU only: the model and the decoders share {s.cores} cores; torch ran on {s.torch_threads} "
            f"thread(s) beside {s.decode_threads} decode thread(s)")
    if r.pipeline.all_cores_img_s is not None:
        better = "faster" if r.pipeline.all_cores_img_s > r.pipeline.img_s else "slower"
        text += (f"; with torch on all {s.cores} cores the pipeline ran {r.pipeline.all_cores_img_s:.1f} img/s "
                 f"({better})")
    return text


def format_report(r: BenchReport, config_path: str) -> str:
    s, m, p = r.setup, r.model, r.pipeline
    eager = "compiled" if s.compiled else "eager"
    cpu = s.device == "cpu"
    on = f", {s.torch_threads} torch thread(s)" if cpu else ""
    peak = f" of {m.peak_tflops:g} {m.peak_kind} peak ({m.achieved_tflops / m.peak_tflops:.0%})" if m.peak_tflops else ""
    rows = [
        (f"model ceiling ({s.precision}, {eager}{on}{', ' + s.cpu_passes if s.cpu_passes else ''})", m.img_s,
         f"{m.flops_per_image / 1e9:.2f} GFLOP/img, {m.achieved_tflops:.3g} TFLOP/s{peak}"),
        (f"model fp32 eager{on}", m.fp32_eager_img_s, "reference: VQModel.tokenize, the batch in one pass"),
    ]
    if m.all_cores_img_s is not None:
        rows.append((f"model, torch on all {s.cores} cores", m.all_cores_img_s, "no decoding beside it"))
    rows += [
        ("decode, per core (1 thread)", r.decode_img_s_per_core, "JPEG decode + resize + crop, per CPU-second"),
        ("decode, per core, Pillow path only", r.decode_pillow_img_s_per_core,
         f"preprocess(fast=False), as before the JPEG fast path; fast path: "
         f"{r.decode_img_s_per_core / r.decode_pillow_img_s_per_core:.2f}x"),
        (f"decode x {s.decode_threads} thread(s)", r.decode_img_s_per_core * s.decode_threads, "ideal scaling"),
        (f"pipeline (process_shard, {s.decode_threads} decode{on})", p.img_s, f"{p.rows} rows -> Parquet"),
    ]
    if p.all_cores_img_s is not None:
        rows.append((f"pipeline, torch on all {s.cores} cores", p.all_cores_img_s, "decode threads oversubscribed"))
    head = (f"vqpipe bench {config_path}: {s.device} ({s.device_name}), {s.cores} cores, torch {torch.__version__}, "
            f"{s.resolution}px, batch {s.batch_size}, {s.samples} samples, medians of {s.repeats}\n"
            f"images: {s.images}\n")
    table = ["| stage | img/s | notes |", "|---|---:|---|"] + [f"| {a} | {b:.1f} | {c} |" for a, b, c in rows]
    table.append(f"| efficiency | {r.efficiency:.2f} | pipeline / min(model, decode x {s.decode_threads}); "
                 f"bottleneck: {r.bottleneck} |")
    times = ", ".join(f"{k} {v:.2f}" for k, v in p.stage_times_s.items())
    return "\n".join([head, *table, "", f"stage times of the median run (s): {times}",
                      f"peak RSS: {r.peak_rss_mb:.0f} MiB" + (f", peak GPU memory: {r.peak_gpu_mb:.0f} MiB"
                                                              if r.peak_gpu_mb is not None else ""), *r.advice])


def append_history(path: str, report: BenchReport, config_path: str, overrides: list[str]) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "vqpipe_version": __version__,
              "torch_version": torch.__version__, "config": str(config_path), "overrides": list(overrides),
              **dataclasses.asdict(report)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
