"""process_shard: one shard in, one committed Parquet out, exactly once, without Ray."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import shardfactory as sf
from vqpipe import faults
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model
from vqpipe.records import ShardError
from vqpipe.run.shard_job import make_settings, process_shard
from vqpipe.output.sink import committed_stems, read_marker


def _setup(model_path, out, resolution=sf.HOSTILE_RESOLUTION, batch_size=4, **output):
    model = load_model(ModelConfig(path=model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=resolution, min_size=sf.HOSTILE_MIN_SIZE),
                   OutputConfig(path=str(out), **output), model, "fp32")
    return model, encoder, job


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def test_hostile_shard_outcomes(tmp_path, tiny_model_path, pool):
    shard = sf.write_tar(tmp_path / "hostile.tar", sf.hostile_members())
    _, encoder, job = _setup(tiny_model_path, tmp_path / "out")
    result = process_shard(str(shard), "hostile", job, encoder, pool)
    assert result.committed
    table = pq.read_table(tmp_path / "out" / "hostile.parquet")
    written = set(table.column("key").to_pylist())
    failed = {(f["key"], f["reason"]) for f in result.failures}
    expected = sf.expected_outcomes()
    assert written == {k for k, o in expected if o == "ok"}
    assert failed == {(k, o) for k, o in expected if o != "ok"}
    assert table.num_rows == result.rows == len(written)  # no duplicates
    marker = read_marker(str(tmp_path / "out"), "hostile", {})
    assert marker["rows"] == table.num_rows and marker["failed"] == len(result.failures)
    assert marker["failures_by_reason"]["decode_error"] >= 2
    assert set(marker["times"]) >= {"read_s", "decode_s", "encode_s", "write_s", "wait_s"}


def test_exact_size_png_codes_equal_direct_model_codes(tmp_path, tiny_model_path, pool):
    res = 32
    images = [sf.photo(name, (res, res)) for name in ("astronaut", "chelsea", "coffee", "rocket", "coffee")]
    members = []
    for i, img in enumerate(images):
        members += [(f"{i:04d}.png", sf.png_bytes(img)), (f"{i:04d}.txt", f"caption {i}".encode())]
    shard = sf.write_tar(tmp_path / "exact.tar", members)
    model, encoder, job = _setup(tiny_model_path, tmp_path / "out", resolution=res, latent_dtype="float16")
    process_shard(str(shard), "exact", job, encoder, pool)
    table = pq.read_table(tmp_path / "out" / "exact.parquet")
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        codes, latents = model.tokenize(x)
    np.testing.assert_array_equal(fixed_list_to_numpy(table.column("codes")), codes.numpy())
    stored = fixed_list_to_numpy(table.column("latents"))
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), latents.numpy(), rtol=1e-3, atol=1e-3)
    assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(5)]
    assert table.column("width").to_pylist() == [res] * 5
    meta = json.loads(table.schema.metadata[b"vqpipe"])
    assert meta["weights_sha256"] == model.weights_sha256 and meta["codes_shape"] == [16, 16]


@pytest.mark.parametrize("name, members, reason", [
    ("truncated", "truncate", "truncated_tar"),
    ("missing", None, "missing_shard"),
])
def test_shard_level_errors_publish_nothing(tmp_path, tiny_model_path, pool, name, members, reason):
    path = tmp_path / f"{name}.tar"
    if members == "truncate":
        data = sf.tar_bytes([m for i in range(6) for m in sf.good_members(f"k{i}")])
        path.write_bytes(data[: len(data) * 2 // 3])
    _, encoder, job = _setup(tiny_model_path, tmp_path / "out", batch_size=2)
    with pytest.raises(ShardError) as err:
        process_shard(str(path), name, job, encoder, pool)
    assert err.value.reason == reason
    out = tmp_path / "out"
    assert not list(out.glob("*.parquet")) and committed_stems(str(out), {}) == set()


def test_empty_tar_commits_zero_rows(tmp_path, tiny_model_path, pool):
    shard = sf.write_tar(tmp_path / "empty.tar", [])
    _, encoder, job = _setup(tiny_model_path, tmp_path / "out")
    result = process_shard(str(shard), "empty", job, encoder, pool)
    assert result.committed and result.rows == 0
    assert pq.read_table(tmp_path / "out" / "empty.parquet").num_rows == 0


def test_crash_after_batches_leaves_nothing_then_retry_commits(tmp_path, tiny_model_path, pool, monkeypatch):
    members = [m for i in range(10) for m in sf.good_members(f"k{i:02d}", name="coffee")]
    shard = sf.write_tar(tmp_path / "crash.tar", members)
    _, encoder, job = _setup(tiny_model_path, tmp_path / "out", batch_size=3)
    flag = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, json.dumps([{"stem": "crash", "after_batches": 2, "action": "raise",
                                                 "once": str(flag)}]))
    with pytest.raises(faults.InjectedFault):
        process_shard(str(shard), "crash", job, encoder, pool)
    out = tmp_path / "out"
    assert flag.exists() and not list(out.glob("*.parquet")) and not list(out.glob(".*"))
    assert committed_stems(str(out), {}) == set()
    result = process_shard(str(shard), "crash", job, encoder, pool)  # the retry
    assert result.committed and result.rows == 10
    assert pq.read_table(out / "crash.parquet").column("key").to_pylist() == [f"k{i:02d}" for i in range(10)]


def test_second_attempt_of_committed_shard_does_not_publish(tmp_path, tiny_model_path, pool):
    shard = sf.write_tar(tmp_path / "s.tar", sf.good_members("a") + sf.good_members("b"))
    _, encoder, job = _setup(tiny_model_path, tmp_path / "out")
    first = process_shard(str(shard), "s", job, encoder, pool)
    data = tmp_path / "out" / "s.parquet"
    stat = data.stat()
    second = process_shard(str(shard), "s", job, encoder, pool)
    assert first.committed and not second.committed
    assert data.stat().st_mtime_ns == stat.st_mtime_ns


def test_memory_filesystem_round_trip(tmp_path, tiny_model_path, pool):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/in/mem.tar", sf.tar_bytes(sf.good_members("a") + sf.good_members("b", name="rocket")))
    _, encoder, job = _setup(tiny_model_path, "memory://out-rt", latents=False)
    result = process_shard("memory://in/mem.tar", "mem", job, encoder, pool)
    assert result.committed and result.rows == 2
    with fs.open("/out-rt/mem.parquet", "rb") as f:
        table = pq.read_table(f)
    assert "latents" not in table.column_names and fixed_list_to_numpy(table.column("codes")).shape == (2, 32, 32)
    assert committed_stems("memory://out-rt", {}) == {"mem"}


def test_max_pixels_skips_oversized_images_with_their_reason(tmp_path, tiny_model_path, pool):
    members = [("small.png", sf.png_bytes(sf.photo("coffee", (64, 48)))),
               ("claims80mp.png", sf.bomb_png(8_000, 10_000)),
               ("large.png", sf.png_bytes(sf.photo("rocket", (400, 300))))]
    shard = sf.write_tar(tmp_path / "sizes.tar", members)
    model = load_model(ModelConfig(path=tiny_model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 4, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=32, max_pixels=100_000),
                   OutputConfig(path=str(tmp_path / "out")), model, "fp32")
    result = process_shard(str(shard), "sizes", job, encoder, pool)
    assert result.committed and result.rows == 1
    assert sorted((f["key"], f["reason"]) for f in result.failures) == [("claims80mp", "too_large"),
                                                                      ("large", "too_large")]
    assert pq.read_table(tmp_path / "out" / "sizes.parquet").column("key").to_pylist() == ["small"]


def test_float16_overflow_fails_only_the_overflowing_samples(tmp_path, tiny_model_path, pool):
    names = ("astronaut", "chelsea", "coffee", "rocket")
    members = [m for i, name in enumerate(names * 2) for m in sf.good_members(f"s{i}", name=name)]
    shard = sf.write_tar(tmp_path / "photos.tar", members)
    model, encoder, job = _setup(tiny_model_path, tmp_path / "f32", resolution=32, latent_dtype="float32")
    process_shard(str(shard), "photos", job, encoder, pool)
    table = pq.read_table(tmp_path / "f32" / "photos.parquet")
    peaks = dict(zip(table.column("key").to_pylist(),
                     np.abs(fixed_list_to_numpy(table.column("latents"))).reshape(len(table), -1).max(axis=1)))
    low, high = sorted(set(peaks.values()))[1:3]
    cut = float(np.sqrt(low * high))  # between two photos' peaks, far from either
    # latents are h * scaling_factor: scale them so that peaks above the cut pass float16's 65504
    model = load_model(ModelConfig(path=tiny_model_path, scaling_factor=model.config.scaling_factor * 65504 / cut))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 4, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=32),
                        OutputConfig(path=str(tmp_path / "f16"), latent_dtype="float16"), model, "fp32")
    result = process_shard(str(shard), "photos", job, encoder, pool)
    written = set(pq.read_table(tmp_path / "f16" / "photos.parquet", columns=["key"]).column("key").to_pylist())
    assert written == {k for k, p in peaks.items() if p < cut} and 0 < len(written) < len(peaks)
    failed = [f for f in result.failures if f["reason"] == "latent_overflow"]
    assert {f["key"] for f in failed} == set(peaks) - written
    assert all("set output.latent_dtype: float32" in f["message"] for f in failed)
