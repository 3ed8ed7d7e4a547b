"""Real storage: `vqpipe run` / `decode` / `inspect` against an S3 endpoint (moto's server on
127.0.0.1), a killed driver resumed on S3, and transient storage faults (``faultyfs``) that
per-operation retries absorb -- without Ray through ``process_shard``, and through the CLI."""

from __future__ import annotations

import io
import json
import re
import logging
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import faultyfs
import shardfactory as sf
from s3server import CREDENTIALS, S3Bucket, moto_endpoint, s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from runfiles import make_shards, slow_driver, write_config, written_keys
from vqpipe import cli
from vqpipe.output import retry
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model
from vqpipe.records import ShardError
from vqpipe.run.shard_job import make_settings, process_shard
from vqpipe.input.urls import shard_stem
from vqpipe.output.sink import committed_stems, read_marker

TESTS = Path(__file__).parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def s3_options(bucket) -> dict:
    """The endpoint and credentials, as a user would put them in the config."""
    return {k: v for k, v in bucket.storage_options.items() if k != "skip_instance_cache"}


def upload(bucket, folder: Path, prefix: str) -> None:
    for path in sorted(folder.glob("*.tar")):
        bucket.client.put_object(Bucket=bucket.name, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def tables_by_stem(url: str, options: dict) -> dict[str, object]:
    """Tables by shard name: the stem without the hash of its URL, which differs between stores."""
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache(root)
    out = {}
    for path in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(path, "rb") as f:
            out[re.sub(r"-[0-9a-f]{8}$", "", Path(path).stem)] = pq.read_table(f)
    return out


def objects(bucket, prefix: str) -> dict[str, tuple[str, object]]:
    """key -> (ETag, LastModified) of every object under ``prefix``."""
    listing = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing}


# -- a real S3 endpoint ----------------------------------------------------------------------------

@dataclass
class S3Run:
    """One `vqpipe run` (then `decode`, `inspect`) with input and output on S3: three good shards and
    a truncated one, credentials in ``storage_options`` and in the environment."""

    bucket: S3Bucket
    options: dict
    config: Path
    out: str
    keys: list[str]
    reference: dict[str, pa.Table]  # stem -> the same shard through process_shard on local files
    exit_codes: dict[str, int]  # command -> exit status
    stdout: dict[str, str]  # command -> what it printed
    printed: str  # everything the commands printed (stdout and stderr) and logged
    secrets: tuple[str, ...]


SECRET = f"vqpipe-secret-{uuid.uuid4().hex}"
ENV_SECRET = f"vqpipe-env-secret-{uuid.uuid4().hex}"


_runs: dict[str, S3Run] = {}  # the one S3Run of this test process


@pytest.fixture(scope="session")
def s3_run(tmp_path_factory, tiny_model_path, ray_cluster) -> S3Run:
    """Shared by the S3 and security tests (a Ray run costs tens of seconds on a CI runner).
    Importing the fixture into another module defines it there again, hence the cache."""
    if "s3" not in _runs:
        _runs["s3"] = _s3_run(tmp_path_factory.mktemp("s3run"), tiny_model_path)
    return _runs["s3"]


def _s3_run(tmp: Path, tiny_model_path: str) -> S3Run:
    options = {"key": "AKIAVQPIPETEST", "secret": SECRET,
               "client_kwargs": {"endpoint_url": moto_endpoint(), "region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=moto_endpoint(), **CREDENTIALS)
    name = f"run-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    bucket = S3Bucket(name, f"s3://{name}", options, client)
    keys = make_shards(tmp / "in", 3, per_shard=4)
    data = sf.tar_bytes([m for i in range(4) for m in sf.good_members(f"t{i}")])
    (tmp / "in" / "shard-00003.tar").write_bytes(data[: len(data) // 2])
    upload(bucket, tmp / "in", "in")
    out = f"{bucket.url}/out"
    # float32 latents: the random tiny model's codewords are close-packed, and float16 storage
    # flips a few of its codes (0.1% here), under `decode`'s consistency floor, which is set for
    # trained tokenizers; what this test is about is reading and writing through S3.
    config = write_config(tmp, tiny_model_path, f"{bucket.url}/in/shard-{{00000..00003}}.tar", out,
                          input={"storage_options": options},
                          output={"storage_options": options, "latent_dtype": "float32"}, ray={"max_retries": 2})
    commands = {"run": ["run", str(config)], "decode": ["decode", str(config), "--num-samples", "6"],
                "inspect": ["inspect", out, "--json", "--storage-options", json.dumps(options)]}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "AKIAVQPIPEENV")
        env.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
        codes, stdout, printed = run_commands(commands)
    encoder, job = _job(tiny_model_path, str(tmp / "reference"), {}, batch_size=2, latent_dtype="float32")
    with ThreadPoolExecutor(1) as pool:
        for s in range(3):
            url = str(tmp / "in" / f"shard-{s:05d}.tar")
            process_shard(url, shard_stem(url), job, encoder, pool)
    return S3Run(bucket, options, config, out, keys, tables_by_stem(str(tmp / "reference"), {}), codes, stdout,
                 printed, (SECRET, ENV_SECRET))


def run_commands(commands: dict[str, list[str]]) -> tuple[dict[str, int], dict[str, str], str]:
    """Run ``vqpipe`` commands in this process: (exit codes, each one's stdout, everything printed
    and logged at INFO and above, by any logger)."""
    printed, codes, stdout = io.StringIO(), {}, {}
    handler = logging.StreamHandler(printed)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with redirect_stderr(printed):
            for name, argv in commands.items():
                with redirect_stdout(io.StringIO()) as captured:
                    codes[name] = cli.main(argv)
                stdout[name] = captured.getvalue()
                printed.write(stdout[name])
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return codes, stdout, printed.getvalue()


def test_s3_run_writes_what_a_local_run_writes(s3_run):
    assert s3_run.exit_codes["run"] == 1  # the truncated shard failed; the others committed
    remote = tables_by_stem(s3_run.out, s3_run.options)
    assert sorted(remote) == sorted(s3_run.reference) == [f"shard-{s:05d}" for s in range(3)]
    for stem, table in remote.items():
        mine = s3_run.reference[stem]
        assert table.column("key").to_pylist() == mine.column("key").to_pylist()
        for column in ("codes", "latents"):
            np.testing.assert_array_equal(fixed_list_to_numpy(table.column(column)),
                                          fixed_list_to_numpy(mine.column(column)))
        assert set(table.column("source").to_pylist()) == {f"{s3_run.bucket.url}/in/{stem}.tar"}
    got = [k for t in remote.values() for k in t.column("key").to_pylist()]
    assert sorted(got) == sorted(s3_run.keys) and len(got) == len(set(got))
    assert {re.sub(r"-[0-9a-f]{8}$", "", s) for s in committed_stems(s3_run.out, s3_run.options)} == set(remote)
    stem = shard_stem(f"{s3_run.bucket.url}/in/shard-00001.tar")
    assert read_marker(s3_run.out, stem, s3_run.options)["failures_by_reason"] == {"no_image": 1}
    failed = json.loads(_get(s3_run.bucket, f"out/_vqpipe/failed/{shard_stem(f'{s3_run.bucket.url}/in/shard-00003.tar')}.json"))
    assert "truncated_tar" in failed["error"] and failed["attempts"] == 2
    assert s3_run.bucket.client.list_multipart_uploads(Bucket=s3_run.bucket.name).get("Uploads", []) == []
    manifest = json.loads(_get(s3_run.bucket, "out/_vqpipe/run.json"))
    assert manifest["status"] == "failed" and manifest["totals"]["samples_written"] == len(s3_run.keys)


def test_decode_reads_tokens_and_source_shards_from_s3(s3_run):
    assert s3_run.exit_codes["decode"] == 0, s3_run.stdout["decode"]
    assert "lineage" in s3_run.stdout["decode"]
    assert "out/_vqpipe/decode/report.html" in objects(s3_run.bucket, "out/_vqpipe/decode/")


def test_inspect_summarises_an_s3_output(s3_run):
    assert s3_run.exit_codes["inspect"] == 0
    stats = json.loads(s3_run.stdout["inspect"])
    assert stats["rows"] == len(s3_run.keys) and stats["shards"]["committed"] == 3
    assert stats["shards"]["failed_by_reason"] == {"truncated_tar": 1}
    assert stats["shards"]["failed_samples_by_reason"] == {"no_image": 3}


def _get(bucket, key: str) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


@pytest.mark.slow
def test_killed_driver_resumes_exactly_once_on_s3(tmp_path, tiny_model_path, s3_bucket, ray_cluster):
    keys = make_shards(tmp_path / "in", 5, per_shard=3)
    upload(s3_bucket, tmp_path / "in", "in")
    options = s3_options(s3_bucket)  # no skip_instance_cache: listings may be cached, as for a user
    out = f"{s3_bucket.url}/out"
    config = write_config(tmp_path, tiny_model_path, f"{s3_bucket.url}/in/shard-{{00000..00004}}.tar", out,
                          input={"storage_options": options}, output={"storage_options": options},
                          ray={"num_workers": 1})
    fs, root = fsspec.core.url_to_fs(out, **options)
    with slow_driver(config, [f"shard-{s:05d}" for s in range(5)]):
        deadline = time.time() + 180
        while time.time() < deadline and len(objects(s3_bucket, "out/_vqpipe/shards/")) < 1:
            time.sleep(0.2)
        # A listing cached in this process now, before the driver commits more, must not fool the rerun.
        cached = fs.ls(f"{root}/_vqpipe/shards", detail=False)
        while time.time() < deadline and len(objects(s3_bucket, "out/_vqpipe/shards/")) < max(2, len(cached) + 1):
            time.sleep(0.2)
        assert len(objects(s3_bucket, "out/_vqpipe/shards/")) >= 2, "the driver committed nothing in time"
    markers = objects(s3_bucket, "out/_vqpipe/shards/")
    committed = {f"out/{Path(k).stem}.parquet" for k in markers}
    before = {k: v for k, v in objects(s3_bucket, "out/").items() if k in committed}
    assert len(cached) < len(markers) and 2 <= len(before) < 5

    assert cli.main(["run", str(config)]) == 0
    after = objects(s3_bucket, "out/")
    assert {k: after[k] for k in before} == before  # committed objects untouched (same ETag, same time)
    assert {k: after[k] for k in markers} == markers
    got = [k for t in tables_by_stem(out, options).values() for k in t.column("key").to_pylist()]
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    manifest = json.loads(fs.cat_file(f"{root}/_vqpipe/run.json"))
    assert manifest["totals"]["shards_skipped"] == len(before)


# -- transient faults ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _job(model_path: str, out: str, options: dict, batch_size: int = 4, latent_dtype: str = "float16"):
    model = load_model(ModelConfig(path=model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",), storage_options=options), PreprocessConfig(resolution=32),
                        OutputConfig(path=out, storage_options=options, latent_dtype=latent_dtype), model, "fp32")
    return encoder, job


def _fault_shards(prefix: str, n: int = 3, per_shard: int = 12) -> list[str]:
    memory = fsspec.filesystem("memory")
    urls = []
    for s in range(n):
        members = [m for i in range(per_shard) for m in sf.good_members(f"{s}-{i:02d}", PHOTOS[(s + i) % 4])]
        memory.pipe_file(f"/{prefix}/in/f-{s}.tar", sf.tar_bytes(members))
        urls.append(f"/{prefix}/in/f-{s}.tar")
    return urls


def test_transient_faults_are_retried_and_commit_exactly_once(tmp_path, tiny_model_path, pool):
    """10% of opens, reads, whole-object writes and listings fail (some after consuming half a
    read, or after the write landed); every shard still commits once, byte-identical rows."""
    prefix = f"faults-{tmp_path.name}"
    paths = _fault_shards(prefix)
    clean_encoder, clean = _job(tiny_model_path, f"memory://{prefix}/clean", {})
    faulty_options = {"target_protocol": "memory", "rate": 0.1, "seed": 7, "skip_instance_cache": True}
    encoder, job = _job(tiny_model_path, f"faulty:///{prefix}/faulty", faulty_options)
    before = sum(faultyfs.FaultyFileSystem.injected.values())
    for path in paths:
        stem = Path(path).stem
        assert process_shard(f"memory://{path}", stem, clean, clean_encoder, pool).committed
        result = process_shard(f"faulty://{path}", stem, job, encoder, pool)
        assert result.rows == 12 and not result.failures
    injected = sum(faultyfs.FaultyFileSystem.injected.values()) - before
    print(f"transient faults injected (process_shard, 3 shards): {injected}")
    assert injected >= 3
    want = tables_by_stem(f"memory://{prefix}/clean", {})
    got = tables_by_stem(f"memory://{prefix}/faulty", {})
    assert sorted(got) == ["f-0", "f-1", "f-2"]
    for stem, table in got.items():
        assert table.drop_columns(["source"]).equals(want[stem].drop_columns(["source"]))
    assert committed_stems(f"memory://{prefix}/faulty", {}) == set(got)


def test_permanent_read_outage_is_a_shard_error_in_bounded_time(tmp_path, tiny_model_path, pool):
    prefix = f"outage-{tmp_path.name}"
    path = _fault_shards(prefix, n=1)[0]
    options = {"target_protocol": "memory", "rate": 0.0, "always": [path], "skip_instance_cache": True}
    encoder, job = _job(tiny_model_path, f"faulty:///{prefix}/out", options)
    started = time.time()
    with pytest.raises(ShardError) as err:
        process_shard(f"faulty://{path}", "f-0", job, encoder, pool)
    assert err.value.reason == "read_error" and "injected permanent outage" in str(err.value)
    assert time.time() - started < 20  # 5 attempts, backoff capped: about a second, never a hang
    assert not fsspec.filesystem("memory").exists(f"/{prefix}/out/f-0.parquet")


def test_permanent_write_outage_raises_and_publishes_nothing(tmp_path, tiny_model_path, pool):
    prefix = f"woutage-{tmp_path.name}"
    path = _fault_shards(prefix, n=1)[0]
    options = {"target_protocol": "memory", "rate": 0.0, "always": [f"/{prefix}/out/"], "skip_instance_cache": True}
    encoder, job = _job(tiny_model_path, f"faulty:///{prefix}/out", options)
    with pytest.raises(OSError, match="injected permanent outage"):
        process_shard(f"faulty://{path}", "f-0", job, encoder, pool)
    assert committed_stems(f"memory://{prefix}/out", {}) == set()


def test_create_only_write_whose_answer_was_lost_still_wins():
    class LostAnswer:
        """Writes, then reports a dropped connection, once."""

        protocol = "memory"

        def __init__(self):
            self.memory, self.calls = fsspec.filesystem("memory"), 0

        def makedirs(self, path, exist_ok=False):
            self.memory.makedirs(path, exist_ok=exist_ok)

        def pipe_file(self, path, data, mode="overwrite"):
            self.calls += 1
            self.memory.pipe_file(path, data, mode=mode)
            if self.calls == 1:
                raise ConnectionResetError("reset after the write landed")

        def cat_file(self, path):
            return self.memory.cat_file(path)

    from vqpipe.output import storage

    fs = LostAnswer()
    assert storage.write_create_only(fs, "/lost-answer/m.json", b"mine")  # found its own bytes: won
    assert not storage.write_create_only(fs, "/lost-answer/m.json", b"other")  # someone else's: lost


def test_retrying_reader_resumes_unseekable_streams_where_they_broke():
    data = bytes(range(256)) * 64

    class Flaky:
        """An unseekable stream whose every third read call breaks the connection."""
        opened = 0

        def __init__(self):
            Flaky.opened += 1
            self.pos, self.calls = 0, 0

        def read(self, n):
            self.calls += 1
            if self.calls % 3 == 0:
                raise ConnectionResetError("peer went away")
            chunk = data[self.pos:self.pos + n]
            self.pos += len(chunk)
            return chunk

        def seekable(self):
            return False

        def close(self):
            pass

    policy = retry.RetryPolicy(attempts=3, base_s=0.001)
    with retry.RetryingReader(Flaky, "flaky", policy) as f:
        got = b"".join(iter(lambda: f.read(700), b""))
    assert got == data and Flaky.opened > 5


def test_permanent_errors_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry.call(missing, "stat")
    assert len(calls) == 1


@pytest.mark.slow
def test_cli_run_on_faulty_storage_completes_exactly_once(tmp_path, tiny_model_path):
    """The whole CLI on Ray: 15% of every storage call fails, the driver's (planning, manifest,
    markers, failure records) and the workers' alike; one shard's reads always fail. Per-call
    retries absorb the first, the driver's shard retries give up on the second: exit 1, that
    shard recorded as failed, every other sample written exactly once."""
    keys = make_shards(tmp_path / "in", 4, per_shard=8)
    sf.write_tar(tmp_path / "in" / "shard-00004.tar", sf.good_members("broken"))  # unreadable below
    options = {"target_protocol": "file", "rate": 0.15, "seed": 3, "where": "everywhere",
               "always": [str(tmp_path / "in" / "shard-00004.tar")]}
    config = write_config(tmp_path, tiny_model_path, f"faulty://{tmp_path}/in/shard-{{00000..00004}}.tar",
                          f"faulty://{tmp_path}/out", input={"storage_options": options},
                          output={"storage_options": options}, ray={"max_retries": 2})
    log = tmp_path / "faults.log"
    env = dict(os.environ, **{faultyfs.LOG_ENV: str(log)})
    started = time.time()
    proc = subprocess.run([sys.executable, str(TESTS / "faultyfs.py"), "run", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = tmp_path / "out"
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    stem = shard_stem(f"faulty://{tmp_path}/in/shard-00004.tar")
    failed = json.loads((out / "_vqpipe" / "failed" / f"{stem}.json").read_text())
    assert "read_error" in failed["error"] and failed["attempts"] == 2
    lines = log.read_text().splitlines()
    transient = [line for line in lines if "shard-00004" not in line]
    in_driver = [line for line in transient if line.split()[1] == "driver"]
    print(f"CLI under faults: {len(transient)} transient faults injected ({len(in_driver)} in the driver), "
          f"{len(lines) - len(transient)} permanent, {time.time() - started:.0f} s")
    assert in_driver and len(in_driver) < len(transient)  # both the driver and the workers were hit
