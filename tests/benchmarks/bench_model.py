"""Encode throughput: diffusers' VQModel (eager fp32) vs vqpipe's fast path, and codebook search
vs ``argmin(cdist)``. Not a test (pytest does not collect ``bench_*.py``); run:

    python tests/benchmarks/bench_model.py [--resolution 256] [--batch 16] [--repeats 5]
        [--micro-batches 8 4 2 1] [--streams]

Prints a Markdown table for the README. Timings are medians over ``--repeats`` runs after a
warm-up, interleaving the variants so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources

import torch

from vqpipe import VQModel
from vqpipe.encode.cpu_passes import Streams
from vqpipe.model.quantizer import nearest_codes

LDM_F4 = dict(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=3,
              num_vq_embeddings=8192)


def models(names: list[str]) -> dict[str, dict]:
    available = {"ldm-f4": ("LDM-f4 (128-256-512, 2 layers, 8192 codes)", lambda: LDM_F4),
                 "demo": ("demo tokenizer (f4, 32-64-64, 1024 codes)", lambda: VQModel.from_pretrained(
                     str(resources.files("vqpipe") / "assets" / "demo-vq")).config.to_dict())}
    return {available[n][0]: available[n][1]() for n in names}


def variants(config: dict, bf16: bool = True, micro_batches: tuple[int, ...] = (), streams: bool = False):
    import diffusers

    torch.manual_seed(0)
    reference = diffusers.VQModel(**config).eval()
    ours = VQModel(**config).eval()
    ours.load_state_dict(reference.state_dict())
    # As the pipeline's TokenEncoder runs it: channels_last, and on CPU inductor with frozen weights.
    ours.to(memory_format=torch.channels_last)
    compiled = torch.compile(ours.tokenize, dynamic=False, options={"freezing": True})
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731

    def diffusers_fp32(x):
        h = reference.encode(x).latents
        return reference.quantize(h)[2][2], h * reference.config.scaling_factor

    fns = {
        "diffusers eager fp32": diffusers_fp32,
        "vqpipe eager fp32": lambda x: ours.tokenize(cl(x)),
        "vqpipe eager bf16": lambda x: ours.tokenize(cl(x), autocast_dtype=torch.bfloat16),
        "vqpipe compiled fp32": lambda x: compiled(cl(x)),
        "vqpipe compiled bf16": lambda x: compiled(cl(x), autocast_dtype=torch.bfloat16),
    }
    # The same batch in several forward passes, as TokenEncoder runs it on a CPU (vqpipe.encode.cpu_passes).
    pool = Streams(torch.get_num_threads()) if streams else None
    for n in micro_batches:
        fns[f"diffusers eager fp32, passes of {n}"] = _in_passes(diffusers_fp32, n)
        fns[f"vqpipe eager fp32, passes of {n}"] = _in_passes(fns["vqpipe eager fp32"], n)
        fns[f"vqpipe compiled fp32, passes of {n}"] = _in_passes(fns["vqpipe compiled fp32"], n)
        if pool:  # as TokenEncoder runs an uncompiled encoder on a CPU
            fns[f"vqpipe eager fp32, passes of {n} on {pool.streams} streams"] = (
                lambda x, n=n, pool=pool: pool.map(lambda part: ours.tokenize(cl(part)), x.split(n)))
    return {k: f for k, f in fns.items() if bf16 or "bf16" not in k}


def _in_passes(fn, n: int):
    return lambda x: [fn(part) for part in x.split(n)]


def time_variants(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)  # warm-up (and compilation)
        for _ in range(repeats):
            for name, fn in fns.items():
                started = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - started)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def bench_quantizer(repeats: int) -> list[tuple[int, float, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in (16384, 65536):
        codebook = torch.randn(k, 8, generator=gen)
        z = torch.randn(16 * 32 * 32, 8, generator=gen)
        fast, ref = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            nearest_codes(z, codebook)
            fast.append(time.perf_counter() - started)
            started = time.perf_counter()
            torch.cdist(z, codebook).argmin(1)
            ref.append(time.perf_counter() - started)
        rows.append((k, statistics.median(fast) * 1e3, statistics.median(ref) * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["demo", "ldm-f4"], choices=["demo", "ldm-f4"])
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip bf16 (CPUs without AVX512-BF16/AMX run bf16 convolutions ~30x slower than fp32)")
    parser.add_argument("--micro-batches", nargs="*", type=int, default=[],
                        help="also time each batch split into forward passes of these sizes")
    parser.add_argument("--streams", action="store_true",
                        help="also run those passes on single-threaded streams, one per torch thread")
    args = parser.parse_args()
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.resolution}px, batch {args.batch}\n")
    for name, config in models(args.models).items():
        fns = variants(config, not args.no_bf16, tuple(args.micro_batches), args.streams)
        rates = time_variants(fns, x, args.repeats)
        base = rates["diffusers eager fp32"]
        print(f"| {name} | img/s | vs diffusers |\n|---|---|---|")
        for variant, rate in rates.items():
            print(f"| {variant} | {rate:.2f} | {rate / base:.2f}x |")
        print()
    print("| codebook | vqpipe search (ms) | argmin(cdist) (ms) | speed-up |\n|---|---|---|---|")
    for k, fast, ref in bench_quantizer(args.repeats):
        print(f"| {k} x 8, 16384 vectors | {fast:.1f} | {ref:.1f} | {ref / fast:.1f}x |")


if __name__ == "__main__":
    main()
