"""The bench report: what was measured, the figures, the advice, and how they are printed and kept."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqpipe import __version__

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
    code_agreement: float = 1.0  # configured pass vs eager fp32, on the same input: share of equal codes


@dataclass
class PrecisionFigures:
    """One more precision timed (CUDA): its speed and how many of fp32's codes it keeps."""

    precision: str
    eager: bool
    img_s: float
    code_agreement: float


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
    precisions: list[PrecisionFigures] = field(default_factory=list)  # CUDA: every precision, same input


def _peak_kind(precision: str) -> str:
    if precision in ("bf16", "fp16"):
        return "bf16"  # the same tensor-core peak on the devices listed
    # vqpipe's fp32 turns TF32 off (vqpipe.encode.precision): its codes are the model's own.
    return "tf32" if precision == "tf32" else "fp32"


def peak_device(device_name: str) -> str | None:
    """``NVIDIA A100-SXM4-80GB`` -> ``A100``; whole words only, so an L40S is not an L4."""
    words = set(device_name.replace("-", " ").split())
    return next((key for key in PEAK_TFLOPS if words.issuperset(key.split())), None)


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
            lines.append("model.precision=auto (fp16 on CUDA) and model.compile=true usually raise the model ceiling")
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
         f"{m.flops_per_image / 1e9:.2f} GFLOP/img, {m.achieved_tflops:.3g} TFLOP/s{peak}; "
         f"{_agree(m.code_agreement)}"),
        (f"model fp32 eager{on}", m.fp32_eager_img_s, "reference: VQModel.tokenize, the batch in one pass"),
    ]
    rows += [(f"model {p.precision} ({'eager' if p.eager else 'compiled'})", p.img_s, _agree(p.code_agreement))
             for p in r.precisions]
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


def _agree(share: float) -> str:
    return f"codes agree with fp32 on {share:.2%}"


def append_history(path: str, report: BenchReport, config_path: str, overrides: list[str]) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "vqpipe_version": __version__,
              "torch_version": torch.__version__, "config": str(config_path), "overrides": list(overrides),
              **dataclasses.asdict(report)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
