"""Load and memory: many shards, big shards, a slow sink.

Worker memory is sampled from ``/proc`` while the run goes (resident set of each ``ShardWorker``
of this session's Ray) and read from the commit markers (``peak_rss_mb``: the worker's peak when
it committed that shard); the driver's from ``tracemalloc`` around `vqpipe run`. The figures are
printed (``pytest tests/test_load.py -m slow -s``). Only the back-pressure case runs by default.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import shardfactory as sf
from runfiles import write_config, written_keys
from vqpipe import cli
from vqpipe.run import shard_job
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model
from vqpipe.output.sink import ShardWriter

RESOLUTION = 16  # tiny images keep thousands of samples fast; the bookkeeping is the same


def tiny_shard(path: Path, keys: list[str], with_failure: bool = True) -> Path:
    """One 24x24 JPEG and a caption per key (four photos in turn), plus a sample without an image."""
    images = [sf.jpeg_bytes(sf.photo(name, (24, 24))) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.jpg", images[i % 4]), (f"{key}.txt", f"caption {key}".encode())]
    if with_failure:
        members.append((f"{path.stem}-noimage.txt", b"no image"))
    return sf.write_tar(path, members)


class WorkerMemory:
    """Samples the resident set of this session's ``ShardWorker`` processes (children of its
    raylet; other Ray clusters on the machine are ignored) every 0.2 s, in a thread."""

    def __init__(self) -> None:
        from ray._private.worker import global_worker

        self.raylet = global_worker.node.all_processes["raylet"][0].process.pid
        self.samples: dict[int, list[float]] = collections.defaultdict(list)  # pid -> MB, in time order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                status = _read(f"/proc/{pid}/status")
                ours = f"\nPPid:\t{self.raylet}\n" in status
                if ours and _read(f"/proc/{pid}/cmdline").startswith("ray::ShardWorker"):
                    self.samples[int(pid)].append(int(status.split("VmRSS:")[1].split()[0]) / 1024)

    def halves(self) -> dict[int, tuple[float, float]]:
        """pid -> (highest RSS in the first half of its samples, in the second half), in MB."""
        return {pid: (max(s[: len(s) // 2]), max(s[len(s) // 2:])) for pid, s in self.samples.items() if len(s) >= 10}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process ended meanwhile
        return ""


def markers(out: Path) -> list[dict]:
    """Commit markers in commit order."""
    found = [json.loads(p.read_text()) for p in (out / "_vqpipe" / "shards").glob("*.json")]
    return sorted(found, key=lambda m: m["committed_at"])


@pytest.fixture
def one_torch_thread():
    """On a 2-core runner also running decode threads, torch's second intra-op thread makes small
    batches 5-20x slower (threads spin for each other); this test is about the sink, not torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_slow_sink_holds_back_reading_and_decoding(tmp_path, tiny_model_path, monkeypatch):
    """With a writer 10x slower than decoding, samples read (and decoded) ahead of the rows
    written stay within the prefetch bound -- not the shard's length."""
    n, batch = 400, 4
    keys = [f"{i:05d}" for i in range(n)]
    shard = tiny_shard(tmp_path / "slow.tar", keys, with_failure=False)
    counts = {"read": 0, "decoded": 0, "written": 0}
    ahead = {"read": 0, "decoded": 0}
    real_iter, real_preprocess, real_write = shard_job.iter_samples, shard_job.preprocess, ShardWriter.write

    def counted_iter(*args, **kwargs):
        for sample in real_iter(*args, **kwargs):
            counts["read"] += 1
            yield sample

    def counted_preprocess(*args, **kwargs):
        result = real_preprocess(*args, **kwargs)
        counts["decoded"] += 1
        return result

    def slow_write(self, keys, *args, **kwargs):
        for stage in ahead:
            ahead[stage] = max(ahead[stage], counts[stage] - counts["written"])
        time.sleep(0.02)
        real_write(self, keys, *args, **kwargs)
        counts["written"] += len(keys)

    monkeypatch.setattr(shard_job, "iter_samples", counted_iter)
    monkeypatch.setattr(shard_job, "preprocess", counted_preprocess)
    monkeypatch.setattr(ShardWriter, "write", slow_write)
    model = load_model(ModelConfig(path=tiny_model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch, (-1.0, 1.0))
    job = shard_job.make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=RESOLUTION),
                             OutputConfig(path=str(tmp_path / "out")), model, "fp32")
    with ThreadPoolExecutor(2) as pool:
        result = shard_job.process_shard(str(shard), "slow", job, encoder, pool)
    assert result.rows == counts["written"] == n
    # The promise for batch 4: a read-ahead of two batches plus 8 (16), the item in the producer's
    # hand, a batch being assembled and the batch being written: 25 samples, out of a 400-sample shard.
    bound = 25
    print(f"\nslow sink: at most {ahead['read']} samples read and {ahead['decoded']} decoded ahead of the "
          f"rows written (bound {bound}, shard {n})")
    assert ahead["read"] <= bound and ahead["decoded"] <= bound
    marker = json.loads((tmp_path / "out" / "_vqpipe" / "shards" / "slow.json").read_text())
    assert marker["peak_rss_mb"] > 0


def small_shards(folder: Path, n: int) -> list[str]:
    keys = []
    for s in range(n):
        shard_keys = [f"{s:03d}-{i}" for i in range(3)]
        tiny_shard(folder / f"shard-{s:05d}.tar", shard_keys)
        keys += shard_keys
    return keys


def run_traced(config: Path, monkeypatch) -> tuple[int, int]:
    """`vqpipe run` with the driver's Python heap traced: (peak, still held when the driver's loop
    ends -- the outcome of every shard included), in bytes above the start."""
    from vqpipe.run import driver

    held = {}
    real_run = driver.Driver.run

    def run(self):
        outcome = real_run(self)
        held["bytes"] = tracemalloc.get_traced_memory()[0]
        return outcome

    monkeypatch.setattr(driver.Driver, "run", run)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        assert cli.main(["run", str(config), "model.batch_size=8"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - start, held["bytes"] - start


@pytest.mark.slow
def test_200_small_shards(tmp_path, tiny_model_path, ray_cluster, monkeypatch):
    """200 shards of 3 samples: every sample once, worker memory flat from the first shards to the
    last, and a driver that holds ~2 KiB per shard (the 200-shard run against a 50-shard one, after a
    10-shard run has paid for what a first run in a process loads once)."""
    runs = {}
    for n in (10, 50, 200):
        keys = small_shards(tmp_path / f"in{n}", n)
        out = tmp_path / f"out{n}"
        config = write_config(tmp_path, tiny_model_path, str(tmp_path / f"in{n}" / "shard-*.tar"), out,
                              preprocess={"resolution": RESOLUTION})
        started = time.time()
        with WorkerMemory() as memory:
            runs[n] = run_traced(config, monkeypatch)
        wall = time.time() - started
        got = written_keys(out)
        assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    per_shard = (runs[200][1] - runs[50][1]) / 150
    peaks = [m["peak_rss_mb"] for m in markers(out)]
    first, last = max(peaks[:20]), max(peaks[-20:])
    halves = memory.halves()
    print(f"\n200 shards in {wall:.0f} s: worker peak RSS {first:.0f} MB after the first 20 shards, "
          f"{last:.0f} MB after the last 20; RSS per worker, first half / second half of the run: "
          f"{[(round(a), round(b)) for a, b in halves.values()]} MB; driver Python heap peak "
          f"{runs[200][0] / 2**20:.1f} MB, {per_shard / 1024:.1f} KiB held per shard")
    assert halves and all(b - a < 48 for a, b in halves.values())
    assert last - first < 64  # a leak of even 1 MB per shard would show as 180 MB here
    assert runs[200][0] < 64 * 2**20 and per_shard < 8 * 1024


@pytest.mark.slow
def test_large_shards(tmp_path, tiny_model_path, ray_cluster):
    """One worker, a 200-sample shard then five of 5000: its resident memory in the second half of
    the run is what it was in the first half."""
    sizes = (200,) + (5000,) * 5
    keys = []
    for s, size in enumerate(sizes):
        shard_keys = [f"{s}-{i:05d}" for i in range(size)]
        tiny_shard(tmp_path / "in" / f"shard-{s:05d}.tar", shard_keys)
        keys += shard_keys
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          preprocess={"resolution": RESOLUTION}, ray={"num_workers": 1, "shard_timeout_s": 600})
    started = time.time()
    with WorkerMemory() as memory:
        assert cli.main(["run", str(config), "model.batch_size=256"]) == 0
    wall = time.time() - started
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    by_stem = {m["stem"]: m for m in markers(out)}
    peaks = [by_stem[f"shard-{s:05d}"]["peak_rss_mb"] for s in range(len(sizes))]
    (first, second), = memory.halves().values()
    print(f"\nlarge shards {list(sizes)} in {wall:.0f} s: worker RSS at most {first:.0f} MB in the first half "
          f"of the run, {second:.0f} MB in the second; peak RSS after each shard {[round(p) for p in peaks]} MB")
    # The peak (a high-water mark) can step up a few times by 20-50 MB: glibc keeps a malloc arena
    # per thread, and another thread of the worker may run the next big batch. Resident memory has
    # no trend; a leak of 4 KB per sample would add 50 MB between the halves.
    assert second - first < 48
    assert peaks[-1] - peaks[1] < 128
