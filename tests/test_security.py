"""Security: pickle checkpoints refused, credentials never written or printed, no dashboard.

The secret-grep tests look at everything a run leaves behind: what the CLI printed and logged,
every object it wrote (Parquet files with their metadata, commit markers, ``run.json``, failure
records, the decode report) and the Ray session's log files.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from runfiles import make_shards, write_config
from test_s3_run import S3Run, s3_run, upload  # noqa: F401  (s3_run is a fixture)
from vqpipe.input.urls import shard_stem
from vqpipe import VQModel, cli
from vqpipe.config import load_config

# -- pickle checkpoints ----------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``flag``: the proof that a pickle was executed."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def pickle_only_model(folder: Path, tiny_model_path: str, flag: Path) -> Path:
    """A diffusers-layout folder whose only weights are a ``diffusion_pytorch_model.bin`` that
    runs code when unpickled."""
    folder.mkdir()
    (folder / "config.json").write_text(Path(tiny_model_path, "config.json").read_text())
    state = VQModel.from_pretrained(tiny_model_path).state_dict()
    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        # Protocol 2, torch.save's own: with a newer one torch.load warns about the protocol before
        # refusing the payload, and the test run shows a notice that is not the point.
        pickle.dump({"state": state, "payload": _Payload(flag)}, f, protocol=2)
    return folder


@pytest.mark.parametrize("command", ["run", "decode"])
def test_cli_refuses_pickle_weights(tmp_path, tiny_model_path, capsys, command):
    flag = tmp_path / "pickle-ran"
    model = pickle_only_model(tmp_path / "model", tiny_model_path, flag)
    make_shards(tmp_path / "in", 1, per_shard=1)
    out = tmp_path / "out"
    config = write_config(tmp_path, str(model), str(tmp_path / "in" / "shard-00000.tar"), out)
    assert cli.main([command, str(config)]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin: refusing to load pickle weights" in err
    assert not flag.exists() and not out.exists()


def test_explicitly_allowed_pickle_still_loads_tensors_only(tmp_path, tiny_model_path):
    """``allow_pickle=True`` (Python API only; the CLI has no such switch) loads a plain state
    dict, and still does not run code (``torch.load(weights_only=True)``)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(Path(tiny_model_path, "config.json").read_text())
    reference = VQModel.from_pretrained(tiny_model_path)
    torch.save(reference.state_dict(), plain / "diffusion_pytorch_model.bin")
    loaded = VQModel.from_pretrained(str(plain), allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    flag = tmp_path / "pickle-ran"
    evil = pickle_only_model(tmp_path / "evil", tiny_model_path, flag)
    with pytest.raises(pickle.UnpicklingError):
        VQModel.from_pretrained(str(evil), allow_pickle=True)
    assert not flag.exists()


# -- credentials -----------------------------------------------------------------------------------


def leaks(secrets: tuple[str, ...], blobs: dict[str, bytes]) -> list[str]:
    """Names of the blobs holding any of ``secrets``."""
    return [name for name, data in blobs.items() if any(s.encode() in data for s in secrets)]


def bucket_objects(bucket) -> dict[str, bytes]:
    listing = bucket.client.list_objects_v2(Bucket=bucket.name).get("Contents", [])
    return {o["Key"]: bucket.client.get_object(Bucket=bucket.name, Key=o["Key"])["Body"].read() for o in listing}


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_socket()}


def test_no_credentials_in_outputs_logs_or_errors_of_an_s3_run(s3_run: S3Run, ray_cluster):
    from ray._private.worker import global_worker

    written = bucket_objects(s3_run.bucket)
    kinds = {"parquet": ".parquet", "markers": "_vqpipe/shards/", "manifest": "run.json",
             "failure records": "_vqpipe/failed/", "decode report": "report.html"}
    assert {k: any(w in name for name in written) for k, w in kinds.items()} == dict.fromkeys(kinds, True)
    assert "truncated_tar" in s3_run.printed  # the failing shard's errors were logged, and are searched
    ray_logs = files_under(Path(global_worker.node.get_session_dir_path()) / "logs")
    blobs = {**written, **ray_logs, "printed": s3_run.printed.encode()}
    assert leaks(s3_run.secrets, {"config": s3_run.config.read_bytes(), **blobs}) == ["config"]  # the search works
    print(f"\nsecrets searched in {len(blobs)} outputs ({sum(map(len, blobs.values())) / 2**20:.1f} MiB): none found")
    assert len(blobs) > 20
    manifest = json.loads(written["out/_vqpipe/run.json"])
    assert manifest["config"]["input"]["storage_options"]["secret"] == "***"


@pytest.mark.slow
def test_no_environment_credentials_in_a_subprocess_run(tmp_path, tiny_model_path, s3_bucket):  # noqa: F811
    """The CLI as a user runs it: credentials for the output only in the environment (the workers
    inherit them), the input's in the config, a shard that fails; Ray's own logs searched too."""
    secret, env_secret = f"cfg-{uuid.uuid4().hex}", f"env-{uuid.uuid4().hex}"
    make_shards(tmp_path / "in", 2, per_shard=2)
    (tmp_path / "in" / "shard-00002.tar").write_bytes(b"not a tar" * 100)
    upload(s3_bucket, tmp_path / "in", "in")
    endpoint = s3_bucket.storage_options["client_kwargs"]
    config = write_config(tmp_path, tiny_model_path, f"{s3_bucket.url}/in/shard-{{00000..00002}}.tar",
                          f"{s3_bucket.url}/out", ray={"max_retries": 1},
                          input={"storage_options": {"key": "AKIAVQPIPECFG", "secret": secret,
                                                     "client_kwargs": endpoint}},
                          output={"storage_options": {"client_kwargs": endpoint}})
    ray_tmp = Path(tempfile.mkdtemp(prefix="vqr", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAVQPIPEENV", AWS_SECRET_ACCESS_KEY=env_secret,
               RAY_TMPDIR=str(ray_tmp))
    run = subprocess.run([sys.executable, "-m", "vqpipe.cli", "run", str(config)], env=env, capture_output=True,
                         timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    written = bucket_objects(s3_bucket)
    failed, committed = (shard_stem(f"{s3_bucket.url}/in/shard-{i:05d}.tar") for i in (2, 1))
    assert f"out/_vqpipe/failed/{failed}.json" in written and f"out/{committed}.parquet" in written
    assert b"corrupt_tar" in run.stderr
    blobs = {**written, **files_under(ray_tmp), "stdout": run.stdout, "stderr": run.stderr}
    assert len(blobs) > 20
    assert leaks((secret, env_secret), {"config": config.read_bytes(), **blobs}) == ["config"]
    print(f"\nsecrets searched in {len(blobs)} outputs ({sum(map(len, blobs.values())) / 2**20:.1f} MiB): none found")


# -- the embedded Ray ------------------------------------------------------------------------------


def test_embedded_ray_serves_no_dashboard(ray_cluster):
    """``start_embedded_ray`` (what `vqpipe run` uses without ``ray.address``) turns the dashboard
    off: Ray 2.60 still starts its head process, but minimal, without frontend or HTTP port.

    Not covered, because Ray does not allow it: binding the cluster to 127.0.0.1. Ray resolves a
    loopback node address to the machine's reachable IP, and its gRPC services listen on that
    address (workers on all interfaces); Ray 2.60 protects them with token authentication."""
    from ray._private.worker import global_worker

    node = global_worker.node
    assert node.address_info.get("webui_url") in (None, "")
    psutil = pytest.importorskip("psutil")  # Ray ships it (ray/thirdparty_files)
    for info in node.all_processes.get("dashboard", []):
        process = psutil.Process(info.process.pid)
        assert {"--minimal", "--disable-frontend"} <= set(process.cmdline())
        assert [c for c in process.net_connections() if c.status == psutil.CONN_LISTEN] == []
    with socket.socket() as probe:
        assert probe.connect_ex((node.node_ip_address, 8265)) != 0


def test_config_echo_redacts_secrets(tmp_path, tiny_model_path, capsys):
    """What `--dry-run` prints never holds storage credentials."""
    make_shards(tmp_path / "in", 1, per_shard=1)
    secret = f"dry-{uuid.uuid4().hex}"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-00000.tar"), tmp_path / "out",
                          output={"storage_options": {"secret": secret, "token": secret}})
    assert cli.main(["run", str(config), "--dry-run"]) == 0
    assert secret not in capsys.readouterr().out
    assert secret not in yaml.safe_dump(load_config(config).to_dict())
