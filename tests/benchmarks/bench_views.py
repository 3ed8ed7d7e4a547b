"""What views cost: one shard through ``process_shard`` in one worker with ``preprocess.views`` =
``[center]``, ``[center, hflip]`` and ``[ten_crop]``; time per image against ``[center]``, and the
cost of one more view.

    python tests/benchmarks/bench_views.py [--samples 64] [--size 640x480] [--repeats 3]

One decode thread and one torch thread, as bench_shard.py. The settings are run interleaved
(center, center+hflip, ten_crop, center, ...) so drift in a shared machine's load hits each alike;
the medians are reported. Targets (issue 16): [center, hflip] <= 2.1x and ten_crop <= 10.5x the
time per image of [center] -- the decode is shared, so only the model's share multiplies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shardfactory as sf  # noqa: E402
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig  # noqa: E402
from vqpipe.encode.encoder import TokenEncoder  # noqa: E402
from vqpipe.model.loading import load_model  # noqa: E402
from vqpipe.run.shard_job import make_settings, process_shard  # noqa: E402

RESOLUTION = 128
SETTINGS = {"center": ("center",), "center+hflip": ("center", "hflip"), "ten_crop": ("ten_crop",)}
TARGETS = {"center+hflip": 2.1, "ten_crop": 10.5}


def make_shard(folder: Path, n: int, size: tuple[int, int]) -> str:
    names = ("astronaut", "chelsea", "coffee", "rocket")
    members = []
    for i in range(n):
        members += [(f"{i:06d}.jpg", sf.jpeg_bytes(sf.photo(names[i % 4], size))), (f"{i:06d}.txt", b"a photo")]
    return str(sf.write_tar(folder / "bench.tar", members))


def one_run(url: str, views: tuple[str, ...], model, encoder: TokenEncoder, pool, out: Path, stem: str
            ) -> tuple[float, float, float]:
    """(wall s, decode CPU-s, encode s) of one shard."""
    job = make_settings(InputConfig(urls=(url,)), PreprocessConfig(resolution=RESOLUTION, views=views),
                        OutputConfig(path=str(out), latents=False), model, "fp32")
    started = time.perf_counter()
    result = process_shard(url, stem, job, encoder, pool)
    return time.perf_counter() - started, result.times.decode_s, result.times.encode_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model gets one core; the decode thread the other
    tmp = Path(tempfile.mkdtemp())
    url = make_shard(tmp, args.samples, tuple(int(v) for v in args.size.split("x")))
    model = load_model(ModelConfig(path="demo"))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, args.batch, (-1.0, 1.0))
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SETTINGS}
    with ThreadPoolExecutor(1) as pool:
        one_run(url, ("center",), model, encoder, pool, tmp / "warm", "warm")
        for r in range(args.repeats):
            for name, views in SETTINGS.items():
                runs[name].append(one_run(url, views, model, encoder, pool, tmp / f"{name}-{r}", "s"))
    report(runs, args)


def report(runs: dict[str, list[tuple[float, float, float]]], args) -> None:
    n = args.samples
    med = {name: [statistics.median(v[i] for v in values) for i in range(3)] for name, values in runs.items()}
    base = med["center"][0]
    print(f"{n} JPEGs {args.size} -> {RESOLUTION} px, demo model fp32, batch {args.batch}, one worker "
          f"(1 decode thread, 1 torch thread), medians of {args.repeats}\n")
    print("| views | V | ms / image | x [center] | target | decode ms / image | encode ms / view |")
    print("|---|---|---|---|---|---|---|")
    for name, views in SETTINGS.items():
        count = 10 if views == ("ten_crop",) else len(views)
        wall, decode, encode = med[name]
        target = f"<= {TARGETS[name]}x {'ok' if wall / base <= TARGETS[name] else 'OVER'}" if name in TARGETS else "-"
        print(f"| {name} | {count} | {1e3 * wall / n:.1f} | {wall / base:.2f} | {target} | {1e3 * decode / n:.1f} "
              f"| {1e3 * encode / n / count:.1f} |")
    extra = (med["ten_crop"][0] - base) / 9
    print(f"\none more view costs {1e3 * extra / n:.1f} ms per image (ten_crop vs center, per added view); "
          f"one decode costs {1e3 * med['center'][1] / n:.1f} ms")


if __name__ == "__main__":
    main()
