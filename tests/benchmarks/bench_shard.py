"""One shard through ``process_shard`` vs the sum of its parts, and thread vs process decode pools.

    python tests/benchmarks/bench_shard.py [--samples 192] [--size 1024x768] [--repeats 3]

Decode runs on one pool worker and the model on one torch thread, so the two stages own a core
each on a 2-core machine: the overlap should hide the smaller of them
(wall <= 1.1 x max(decode, model) + write).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shardfactory as sf  # noqa: E402
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig  # noqa: E402
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model  # noqa: E402
from vqpipe.input.images import preprocess  # noqa: E402
from vqpipe.run.shard_job import make_settings, process_shard  # noqa: E402
from vqpipe.input.shards import iter_samples  # noqa: E402
from vqpipe.output.sink import ShardWriter  # noqa: E402

RESOLUTION = 128


def make_shard(folder: Path, n: int, size: tuple[int, int]) -> str:
    names = ("astronaut", "chelsea", "coffee", "rocket")
    members = []
    for i in range(n):
        img = sf.photo(names[i % 4], size)
        members += [(f"{i:06d}.jpg", sf.jpeg_bytes(img)), (f"{i:06d}.txt", b"a photo")]
    return str(sf.write_tar(folder / "bench.tar", members))


def parts(url: str, job, encoder: TokenEncoder, out: str) -> dict[str, float]:
    started = time.perf_counter()
    samples = list(iter_samples(url, {}, on_failure=lambda f: None))
    read = time.perf_counter() - started
    started = time.perf_counter()
    pre = [preprocess(s, job.input.image_keys, RESOLUTION, 0) for s in samples]
    decode = time.perf_counter() - started
    pixels = np.stack([p.pixels for p in pre])
    started = time.perf_counter()
    encoded = [encoder(pixels[i:i + encoder.batch_size]) for i in range(0, len(pixels), encoder.batch_size)]
    model = time.perf_counter() - started
    writer = ShardWriter(out, "parts", job.layout, job.metadata, {})
    started = time.perf_counter()
    for i, e in enumerate(encoded):
        batch = pre[i * encoder.batch_size:(i + 1) * encoder.batch_size]
        writer.write([p.key for p in batch], [url] * len(batch), e.codes, e.latents, [p.caption for p in batch],
                     [p.metadata for p in batch], [p.width for p in batch], [p.height for p in batch])
    writer.commit({})
    write = time.perf_counter() - started
    return {"read": read, "decode": decode, "model": model, "write": write}


def whole(url: str, job, encoder: TokenEncoder, pool, stem: str) -> float:
    started = time.perf_counter()
    process_shard(url, stem, job, encoder, pool)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)  # the model gets one core; the decode pool the other
    tmp = Path(tempfile.mkdtemp())
    url = make_shard(tmp, args.samples, size)
    model = load_model(ModelConfig(path="demo"))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, args.batch, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=(url,)), PreprocessConfig(resolution=RESOLUTION),
                   OutputConfig(path=str(tmp / "out")), model, "fp32")
    runs: dict[str, list[float]] = {"read": [], "decode": [], "model": [], "write": [], "threads": [],
                                    "processes": []}
    with ThreadPoolExecutor(1) as threads, ProcessPoolExecutor(1) as processes:
        whole(url, job, encoder, processes, "warm")  # start the process pool outside the timing
        for r in range(args.repeats):
            for k, v in parts(url, job, encoder, str(tmp / f"parts{r}")).items():
                runs[k].append(v)
            runs["threads"].append(whole(url, job, encoder, threads, f"t{r}"))
            runs["processes"].append(whole(url, job, encoder, processes, f"p{r}"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    bound = 1.1 * max(med["read"] + med["decode"], med["model"]) + med["write"]
    print(f"{args.samples} JPEGs {args.size} -> {RESOLUTION}px, batch {args.batch}, demo model fp32, "
          f"medians of {args.repeats}\n")
    print("| stage | seconds | img/s |\n|---|---|---|")
    for k in ("read", "decode", "model", "write"):
        print(f"| {k} alone | {med[k]:.2f} | {args.samples / med[k]:.1f} |")
    print(f"| sum of parts | {sum(med[k] for k in ('read', 'decode', 'model', 'write')):.2f} | |")
    for k in ("threads", "processes"):
        print(f"| process_shard, 1 decode {k[:-1] if k == 'threads' else 'process'} | {med[k]:.2f} | "
              f"{args.samples / med[k]:.1f} |")
    print(f"\nbound 1.1 x max(read+decode, model) + write = {bound:.2f} s; "
          f"threads {'within' if med['threads'] <= bound else 'OVER'} it")


if __name__ == "__main__":
    main()
