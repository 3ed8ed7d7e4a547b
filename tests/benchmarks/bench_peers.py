"""vqpipe against the pipelines people write first: same shards, weights, resolution, batch size
and machine, variants interleaved, medians of ``--repeats``. Not a test; run:

    python tests/benchmarks/bench_peers.py [--shards 4] [--per-shard 96] [--size 512x384]
        [--repeats 3] [--model PATH] [--json OUT] [--memory]

Variants, each writing Parquet for every shard:

* naive: ``diffusers.VQModel`` fp32 eager, ``webdataset.WebDataset(url)`` with PIL decode, resize
  and crop in the main process, one batch at a time, ``pandas.DataFrame.to_parquet`` per shard.
* vqpipe in-process: ``process_shard`` per shard sized as a CPU-only worker of configs/demo.yaml
  (``ray.cpus_per_worker`` = all cores: that many decode threads, torch on every core, which
  ``TokenEncoder`` runs as one single-threaded stream per core). Model loaded and warm before the
  clock, as for naive.
* vqpipe compiled: the same with ``model.compile: true`` (inductor, weights frozen), compiled
  before the clock.
* Ray Data: ``read_webdataset`` (default decoder: full JPEG decode in the read tasks) ->
  ``map_batches`` (PIL resize/crop; Ray Data fuses it into the next operator) -> ``map_batches``
  with an actor pool of one (``concurrency=1``) of a callable class holding vqpipe's
  ``TokenEncoder`` (vqpipe's model code, so only the pipeline differs) -> ``write_parquet``.
* Ray Data + vqpipe.ray_data: ``read_webdataset(decoder=None)`` (raw bytes) -> ``map_batches`` with
  ``vqpipe.ray_data.Tokenize`` (vqpipe's preprocessing and ``TokenEncoder`` in one actor,
  an actor pool of one, one CPU as for Ray Data above) -> ``drop_failures`` -> ``write_parquet``: the
  recipe of the README's "Ray Data" section.
* vqpipe run: ``vqpipe.cli.main(["run", ...])``, the real command, on the same local Ray;
  ``vqpipe-run-2w`` uses ``ray.num_workers=2 ray.cpus_per_worker=1`` (two workers, one torch thread each).
  Ray is started once before any timing, its workers at normal priority; the Ray variants pay
  their actor start and model load inside the clock, the in-process variants load theirs outside it.

``--memory`` also runs a worker (``driver.ShardWorker``, without Ray) over 2 and over 20 small
shards, each in a fresh subprocess, and compares their peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shardfactory as sf  # noqa: E402
from vqpipe.config import load_config  # noqa: E402
from vqpipe.bench.measure import peak_rss_mb  # noqa: E402
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model, resolve_model_path  # noqa: E402
from vqpipe.run.shard_job import make_settings, process_shard  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
RESOLUTION, BATCH = 128, 16  # configs/demo.yaml
DEMO_LIKE = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                 vq_embed_dim=4, num_vq_embeddings=1024, norm_num_groups=8)
CORES = len(os.sched_getaffinity(0))
# A vqpipe worker on a CPU-only machine, as configs/demo.yaml sizes it: ray.cpus_per_worker = the
# machine's cores, so torch gets every core (Ray sets an actor's torch threads to its CPUs) and as
# many decode threads run beside it (decoding is ~3% of the model's CPU time here).
DECODE_THREADS = TORCH_THREADS = CORES
DEFAULT_TORCH_THREADS = torch.get_num_threads()


# --- inputs -----------------------------------------------------------------------------------

def make_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int]) -> list[str]:
    """LAION-layout shards of distinct JPEGs: random crops of the bundled photos at ``size``."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            img = _random_crop(sf.photo(PHOTOS[rng.integers(len(PHOTOS))]), rng).resize(size, Image.BICUBIC)
            members += [(f"{key}.jpg", sf.jpeg_bytes(img)), (f"{key}.txt", b"a photo"),
                        (f"{key}.json", json.dumps({"key": key}).encode())]
        urls.append(str(sf.write_tar(folder / f"shard-{s:05d}.tar", members)))
    return urls


def _random_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = rng.uniform(0.6, 1.0)
    w, h = int(img.width * scale), int(img.height * scale)
    left, top = rng.integers(img.width - w + 1), rng.integers(img.height - h + 1)
    img = img.crop((left, top, left + w, top + h))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def model_folder(path: str | None, tmp: Path) -> str:
    """The shipped demo tokenizer when it exists, else a random one of the same architecture."""
    if path:
        return path
    demo = Path(resolve_model_path("demo"))
    if (demo / "config.json").exists():
        return str(demo)
    from vqpipe import VQModel

    torch.manual_seed(0)
    VQModel(**DEMO_LIKE).save_pretrained(str(tmp / "demo-like"))
    return str(tmp / "demo-like")


def write_config(tmp: Path, urls: list[str], model: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "bench.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "input": {"urls": urls}, "preprocess": {"resolution": RESOLUTION},
        "model": {"path": model, "batch_size": BATCH}, "output": {"path": str(tmp / "unused")},
        "ray": {"cpus_per_worker": DECODE_THREADS},
    }))
    return path


# --- naive loop -------------------------------------------------------------------------------

def naive_setup(model_path: str):
    import diffusers

    return diffusers.VQModel.from_pretrained(model_path).eval()


def naive_run(model, urls: list[str], out: Path) -> int:
    import pandas as pd
    import webdataset as wds

    torch.set_num_threads(DEFAULT_TORCH_THREADS)
    out.mkdir(parents=True)
    rows = 0
    for url in urls:
        records, keys, images = [], [], []
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            keys.append(sample["__key__"])
            images.append(pil_resize_crop(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            if len(images) == BATCH:
                records += naive_encode(model, keys, images)
                keys, images = [], []
        if images:
            records += naive_encode(model, keys, images)
        pd.DataFrame(records).to_parquet(out / f"{Path(url).stem}.parquet")
        rows += len(records)
    return rows


def pil_resize_crop(img: Image.Image) -> np.ndarray:
    scale = RESOLUTION / min(img.size)
    img = img.resize((max(RESOLUTION, round(img.width * scale)), max(RESOLUTION, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - RESOLUTION) // 2, (img.height - RESOLUTION) // 2
    return np.asarray(img.crop((left, top, left + RESOLUTION, top + RESOLUTION)))


def naive_encode(model, keys: list[str], images: list[np.ndarray]) -> list[dict]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        h = model.encode(x).latents
        codes = model.quantize(h)[2][2].reshape(len(keys), -1)
        latents = (h * model.config.scaling_factor).reshape(len(keys), -1)
    return [{"key": k, "codes": c.numpy(), "latents": z.half().numpy()} for k, c, z in zip(keys, codes, latents)]


# --- vqpipe in-process ------------------------------------------------------------------------

def vqpipe_setup(config_path: Path, compile: bool = False):
    config = load_config(config_path)
    model = load_model(config.model)
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", compile, BATCH, config.preprocess.value_range)
    pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="vqpipe-decode")
    return config, encoder, pool


def vqpipe_run(state, urls: list[str], out: Path) -> int:
    config, encoder, pool = state
    torch.set_num_threads(TORCH_THREADS)
    output = dataclasses.replace(config.output, path=str(out))
    job = make_settings(config.input, config.preprocess, output, encoder.model, "fp32")
    return sum(process_shard(url, Path(url).stem, job, encoder, pool).rows for url in urls)


# --- Ray Data ---------------------------------------------------------------------------------

class RayDataEncoder:
    """Ray Data's batch-inference pattern: the model lives in the actor (vqpipe's TokenEncoder)."""

    def __init__(self, model_path: str):
        from vqpipe.config import ModelConfig

        self.encoder = TokenEncoder(load_model(ModelConfig(path=model_path)), torch.device("cpu"), "fp32",
                                    False, BATCH, (-1.0, 1.0))

    def __call__(self, batch: dict) -> dict:
        encoded = self.encoder(np.stack(list(batch["pixels"])))
        n = len(batch["__key__"])
        return {"key": batch["__key__"], "codes": encoded.codes.reshape(n, -1),
                "latents": encoded.latents.reshape(n, -1).astype(np.float16)}


def ray_preprocess(batch: dict) -> dict:
    pixels = [pil_resize_crop(Image.fromarray(img).convert("RGB")) for img in batch["jpg"]]
    return {"__key__": batch["__key__"], "pixels": np.stack(pixels)}


def ray_data_run(model_path: str, urls: list[str], out: Path) -> int:
    import ray.data

    ds = ray.data.read_webdataset(urls)
    ds = ds.map_batches(ray_preprocess, batch_size=BATCH, batch_format="numpy")
    ds = ds.map_batches(RayDataEncoder, fn_constructor_args=(model_path,), batch_size=BATCH, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1))  # = concurrency=1, deprecated in Ray 2.51
    ds.write_parquet(str(out))
    import pyarrow.parquet as pq

    return pq.read_table(str(out), columns=["key"]).num_rows


def ray_data_vqpipe_run(model_path: str, urls: list[str], out: Path) -> int:
    import ray.data

    from vqpipe.ray_data import Tokenize, drop_failures

    ds = ray.data.read_webdataset(urls, decoder=None)
    ds = ds.map_batches(Tokenize, fn_constructor_kwargs={"model": model_path, "resolution": RESOLUTION,
                                                         "precision": "fp32", "batch_size": BATCH, "compile": False},
                        batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=1))
    ds.map_batches(drop_failures, batch_format="pyarrow").write_parquet(str(out))
    import pyarrow.parquet as pq

    return pq.read_table(str(out), columns=["key"]).num_rows


def vqpipe_cli_run(config_path: Path, out: Path, *overrides: str) -> int:
    from vqpipe.cli import main

    if main(["run", str(config_path), f"output.path={out / 'tokens'}", *overrides]) != 0:
        raise RuntimeError("vqpipe run failed")
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in (out / "tokens").glob("*.parquet"))


def ray_torch_threads() -> int:
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


# --- memory -----------------------------------------------------------------------------------

def worker_peak_rss(config_path: Path, shards: int, out: Path) -> dict:
    """Run in a subprocess: one ShardWorker (no Ray) over ``shards`` shards; its peak RSS in MiB."""
    from vqpipe.run.driver import ShardWorker

    config = load_config(config_path, [f"output.path={out}"])
    worker = ShardWorker(config)
    urls = list(config.input.urls)[:shards]
    rss = []
    for i, url in enumerate(urls):
        worker.process(url, f"m{i:05d}")
        rss.append(peak_rss_mb())
    return {"shards": len(urls), "peak_rss_mb": rss[-1], "peak_after_each": [round(r) for r in rss]}


def memory_check(tmp: Path, model: str, size: tuple[int, int]) -> dict:
    urls = make_shards(tmp / "small", 20, 16, size)
    config = write_config(tmp / "small", urls, model)
    runs = {}
    for n in (2, 20):
        code = ("import json, sys; sys.path.insert(0, 'tests/benchmarks'); from pathlib import Path; "
                "import bench_peers as b; "
                f"print(json.dumps(b.worker_peak_rss(Path({str(config)!r}), {n}, Path({str(tmp / f'mem{n}')!r}))))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2])
        runs[n] = json.loads(done.stdout.strip().splitlines()[-1])
    runs["ratio_20_vs_2"] = runs[20]["peak_rss_mb"] / runs[2]["peak_rss_mb"]
    return runs


# --- main -----------------------------------------------------------------------------------

VARIANTS = ("naive", "vqpipe", "vqpipe-compiled", "ray-data", "ray-data-vqpipe", "vqpipe-run", "vqpipe-run-2w")
DEFAULT_VARIANTS = "naive,vqpipe,ray-data,ray-data-vqpipe,vqpipe-run"
ON_RAY = ("ray-data", "ray-data-vqpipe", "vqpipe-run", "vqpipe-run-2w")  # start actors and load the model inside the clock
FLOORS = {("vqpipe", "naive"): 1.5, ("vqpipe-compiled", "naive"): 1.5, ("vqpipe", "ray-data"): 1.2,
          ("vqpipe-run", "ray-data"): 1.2, ("ray-data-vqpipe", "ray-data"): 1.0,
          ("vqpipe-run-2w", "naive"): 1.5, ("vqpipe-run-2w", "ray-data"): 1.2}


def time_variants(variants: dict, repeats: int, tmp: Path, urls: list[str], one: str) -> dict[str, dict]:
    """Per variant: rows, median seconds and img/s; one round runs every variant once, in turn.
    A Ray variant also runs a one-image shard each round: its start-up (actors, model load, first
    batch), subtracted from that round's time for ``steady_img_s``. CPU s/img counts the whole
    machine (Ray's processes included, which idle beside the in-process variants too)."""
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}  # seconds, cpu, start-up
    rows: dict[str, int] = {}
    for r in range(repeats):
        for name, run in variants.items():
            startup = _timed(run, tmp / f"one-{name}-{r}", [one])[0] if name in ON_RAY else 0.0
            seconds, cpu, rows[name] = _timed(run, tmp / f"out-{name}-{r}", urls)
            runs[name].append((seconds, cpu / rows[name], startup))
            print(f"  {name} run {r}: {rows[name]} rows in {seconds:.1f} s (start-up {startup:.1f} s)", flush=True)
    return {name: _summary(name, rows[name], r) for name, r in runs.items()}


def _timed(run, out: Path, urls: list[str]) -> tuple[float, float, int]:
    cpu_before, started = _cpu_seconds(), time.perf_counter()
    rows = run(out, urls)
    return time.perf_counter() - started, _cpu_seconds() - cpu_before, rows


def _summary(name: str, rows: int, runs: list[tuple[float, float, float]]) -> dict:
    seconds = statistics.median(r[0] for r in runs)
    summary = {"rows": rows, "seconds": seconds, "img_s": rows / seconds, "all_seconds": [round(r[0], 2) for r in runs],
               "cpu_s_per_img": statistics.median(r[1] for r in runs)}
    if name in ON_RAY:
        summary["startup_s"] = statistics.median(r[2] for r in runs)
        summary["steady_img_s"] = statistics.median(rows / max(r[0] - r[2], 1e-3) for r in runs)
    return summary


def _cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (/proc/stat: user, nice, system, irq, softirq), so Ray's
    workers count however they exit (summing a process tree lost workers that exited unreaped
    during the next variant). Meaningful on an otherwise idle machine, as every figure here is."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def compare(args, tmp: Path, names: list[str]) -> dict:
    import ray
    import ray.data

    from vqpipe.run.driver import start_embedded_ray

    size = tuple(int(v) for v in args.size.split("x"))
    urls = make_shards(tmp / "shards", args.shards, args.per_shard, size)
    one = make_shards(tmp / "one", 1, 1, size)[0]
    model = model_folder(args.model, tmp)
    config = write_config(tmp, urls, model)
    naive_model, state = naive_setup(model), vqpipe_setup(config)
    vqpipe_run(state, urls[:1], tmp / "warm")  # first-call costs out of the clock, as for naive
    compiled = vqpipe_setup(config, compile=True) if "vqpipe-compiled" in names else None
    if compiled:
        vqpipe_run(compiled, urls[:1], tmp / "warm-compiled")  # compilation (~25 s) out of the clock
    # Ray starts its workers at nice 15; on a machine shared with other jobs that starves both Ray
    # variants against the in-process ones, so they run at normal priority here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    started = time.perf_counter()
    start_embedded_ray()
    ray_start = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False
    variants = {
        "naive": lambda out, u: naive_run(naive_model, u, out),
        "vqpipe": lambda out, u: vqpipe_run(state, u, out),
        "vqpipe-compiled": lambda out, u: vqpipe_run(compiled, u, out),
        "ray-data": lambda out, u: ray_data_run(model, u, out),
        "ray-data-vqpipe": lambda out, u: ray_data_vqpipe_run(model, u, out),
        "vqpipe-run": lambda out, u: vqpipe_cli_run(write_config(out, u, model), out),
        "vqpipe-run-2w": lambda out, u: vqpipe_cli_run(write_config(out, u, model), out, "ray.num_workers=2",
                                                       "ray.cpus_per_worker=1"),
    }
    print(f"{args.shards} shards x {args.per_shard} JPEGs {args.size} -> {RESOLUTION}px, batch {BATCH}, "
          f"model {model}, {CORES} cores; Ray started in {ray_start:.1f} s (outside every clock)", flush=True)
    try:
        results = time_variants({k: variants[k] for k in names}, args.repeats, tmp, urls, one)
        threads = {"naive": DEFAULT_TORCH_THREADS, "vqpipe": TORCH_THREADS,
                   "ray_workers_num_cpus_1": ray_torch_threads()}
    finally:
        ray.shutdown()
    return {"model": model, "ray_start_s": round(ray_start, 2), "variants": results, "torch_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=96)
    parser.add_argument("--size", default="512x384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="diffusers-format folder (default: the demo tokenizer)")
    parser.add_argument("--only", default=DEFAULT_VARIANTS, help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--memory", action="store_true", help="also compare worker peak RSS, 2 vs 20 shards")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    names = [n for n in VARIANTS if n in args.only.split(",")]
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": args.shards,
              "per_shard": args.per_shard, "size": args.size, "cores": CORES, "repeats": args.repeats,
              "load_avg": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="vqpipe-peers-") as name:
        tmp = Path(name)
        if args.memory:  # first: its subprocesses then inherit no Ray settings from this one
            size = tuple(int(v) for v in args.size.split("x"))
            result["memory"] = memory_check(tmp, model_folder(args.model, tmp), size)
        if names:
            result.update(compare(args, tmp, names))
    print_table(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


def print_table(result: dict) -> None:
    v = result.get("variants", {})
    if v:
        print(f"\nload average at start: {result['load_avg']:.1f} on {result['cores']} cores")
        print("| pipeline | img/s (wall) | median s | runs (s) | start-up s | img/s without start-up | "
              "CPU s/img (whole machine) |\n|---|---:|---:|---|---:|---:|---:|")
        for name, r in v.items():
            cpu = f"{r['cpu_s_per_img']:.3f}"
            startup = f"{r['startup_s']:.1f} | {r['steady_img_s']:.1f}" if name in ON_RAY else "- | -"
            print(f"| {name} | {r['img_s']:.1f} | {r['seconds']:.1f} | {r['all_seconds']} | {startup} | {cpu} |")
        for (ours, peer), floor in FLOORS.items():
            if ours in v and peer in v:
                print(_ratio_line(v, ours, peer, floor))
        print(f"torch threads: {result['torch_threads']}")
    if "memory" in result:
        m = result["memory"]
        print(f"worker peak RSS: 2 shards {m[2]['peak_rss_mb']:.0f} MiB, 20 shards {m[20]['peak_rss_mb']:.0f} MiB "
              f"(x{m['ratio_20_vs_2']:.3f}); peak after each shard: {m[20]['peak_after_each']}")


def _ratio_line(v: dict, ours: str, peer: str, floor: float) -> str:
    wall = v[ours]["img_s"] / v[peer]["img_s"]
    text = f"{ours} / {peer} = {wall:.2f}x wall (floor {floor}x: {'met' if wall >= floor else 'MISSED'})"
    if peer in ON_RAY:
        steady = v[ours].get("steady_img_s", v[ours]["img_s"]) / v[peer]["steady_img_s"]
        text += f", {steady:.2f}x without Ray start-up ({'met' if steady >= floor else 'MISSED'})"
    return text


if __name__ == "__main__":
    main()
