"""`vqpipe run` end to end on a real local Ray cluster (one per test session, 2 fake GPUs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import shardfactory as sf
from vqpipe import cli, faults
from vqpipe.config import load_config
from vqpipe.input.urls import shard_stem
from vqpipe.run.driver import ShardWorker, worker_shape
from runfiles import make_shards, slow_driver, write_config, written_keys

pytestmark = pytest.mark.usefixtures("ray_cluster")

def test_end_to_end_exactly_once(tmp_path, tiny_model_path, capsys):
    keys = make_shards(tmp_path / "in", 5)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-{00000..00004}.tar"), out)
    assert cli.main(["run", str(config)]) == 0
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    manifest = json.loads((out / "_vqpipe" / "run.json").read_text())
    totals = manifest["totals"]
    assert manifest["status"] == "complete"
    assert totals["shards_committed"] == 5 and totals["samples_written"] == len(keys)
    assert totals["samples_failed_by_reason"] == {"no_image": 5}
    assert totals["stage_times_s"]["encode_s"] > 0 and totals["stage_times_s"]["decode_s"] > 0
    assert totals["steady_images_per_s_per_worker"] > 0 and totals["startup_s"] >= 0
    assert "samples written" in capsys.readouterr().out
    # a rerun with the same config has nothing left to do and touches nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert cli.main(["run", str(config)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    assert "all 5 shards already committed: nothing to do" in capsys.readouterr().out
    # ... except a manifest a driver killed after its last commit left "running": now it is complete
    manifest_path = out / "_vqpipe" / "run.json"
    manifest_path.write_text(json.dumps({**manifest, "status": "running"}))
    assert cli.main(["run", str(config)]) == 0
    assert json.loads(manifest_path.read_text())["status"] == "complete"


def test_embedded_ray_has_no_dashboard(ray_cluster):
    from ray._private.worker import global_worker

    assert len(ray_cluster.nodes()) == 1
    assert global_worker.node.address_info.get("webui_url") in (None, "")


def test_embedded_ray_keeps_token_authentication(ray_cluster):
    # It listens on the machine's address: only its notice about token auth is dropped, never the auth.
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN


def test_workers_pinned_to_distinct_fake_gpus(tmp_path, tiny_model_path, ray_cluster):
    config = load_config(write_config(tmp_path, tiny_model_path, "x.tar", tmp_path / "out",
                                      ray={"num_workers": "auto", "gpus_per_worker": "auto"}))
    assert worker_shape(config) == (2, 1.0, 1)
    cls = ray_cluster.remote(ShardWorker).options(num_gpus=1, num_cpus=1)
    workers = [cls.remote(config) for _ in range(2)]
    infos = ray_cluster.get([w.ready.remote() for w in workers])
    ids = [tuple(info["gpu_ids"]) for info in infos]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    assert {info["device"] for info in infos} == {"cpu"}  # no CUDA here: the model runs on the CPU
    assert all(info["batches"].startswith(f"batch {config.model.batch_size} in ") for info in infos)
    assert not any("streams" in info["batches"] for info in infos)  # num_cpus=1: one torch thread, no streams
    for w in workers:
        ray_cluster.kill(w)


def test_more_gpu_workers_than_gpus_is_clamped(tmp_path, tiny_model_path):
    config = load_config(write_config(tmp_path, tiny_model_path, "x.tar", tmp_path / "out",
                                      ray={"num_workers": 5, "gpus_per_worker": 1}))
    assert worker_shape(config)[0] == 2


def test_killed_worker_shard_is_redone_without_duplicates(tmp_path, tiny_model_path, monkeypatch):
    keys = make_shards(tmp_path / "in", 4, per_shard=6)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out)
    flag = tmp_path / "killed-once"
    monkeypatch.setenv(faults.ENV, json.dumps([{"stem": "shard-00001", "after_batches": 1, "action": "exit",
                                                 "once": str(flag)}]))
    assert cli.main(["run", str(config)]) == 0
    assert flag.exists()  # the worker really died mid-shard
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))


def test_bad_shards_fail_after_retries_and_rerun_retries_only_them(tmp_path, tiny_model_path):
    make_shards(tmp_path / "in", 3)
    truncated = tmp_path / "in" / "shard-00003.tar"
    data = sf.tar_bytes([m for i in range(4) for m in sf.good_members(f"t{i}")])
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-{00000..00004}.tar"), out,
                          ray={"max_retries": 2})
    assert cli.main(["run", str(config)]) == 1
    failed = {Path(r["source"]).stem: r for p in (out / "_vqpipe" / "failed").glob("*.json")
              for r in [json.loads(p.read_text())]}
    assert set(failed) == {"shard-00003", "shard-00004"}
    assert "truncated_tar" in failed["shard-00003"]["error"] and failed["shard-00003"]["attempts"] == 2
    # found missing at planning, from one listing of the folder: recorded at once, no worker sent
    assert "missing_shard" in failed["shard-00004"]["error"] and failed["shard-00004"]["attempts"] == 0
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert len(committed) == 3
    make_shards(tmp_path / "fix", 1, prefix="x")
    (tmp_path / "fix" / "x-00000.tar").rename(tmp_path / "in" / "shard-00004.tar")
    assert cli.main(["run", str(config)]) == 1  # the truncated shard still fails
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in committed} == committed
    stem = shard_stem(str(tmp_path / "in" / "shard-00004.tar"))
    assert (out / f"{stem}.parquet").exists() and not (out / "_vqpipe" / "failed" / f"{stem}.json").exists()


@pytest.mark.parametrize("override, words", [
    ("output.colour=red", "unknown key 'output.colour'"),
    ("model.batch_size=big", "model.batch_size must be int"),
    ("model.path=/nonexistent/model", "config file not found"),
    ("input.urls=/nonexistent/shards-*.tar", "input.urls"),
])
def test_config_errors_exit_2_and_write_nothing(tmp_path, tiny_model_path, capsys, override, words):
    make_shards(tmp_path / "in", 1)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-00000.tar"), out)
    assert cli.main(["run", str(config), override]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_and_limit_shards(tmp_path, tiny_model_path, capsys):
    make_shards(tmp_path / "in", 4, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out)
    assert cli.main(["run", str(config), "--limit-shards", "1"]) == 0
    assert len(list(out.glob("*.parquet"))) == 1
    capsys.readouterr()
    assert cli.main(["run", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "shards: 4" in plan and "committed: 1" in plan and "pending (this run): 3" in plan
    assert "token grid: 16x16" in plan
    assert len(list(out.glob("*.parquet"))) == 1


def test_refuses_to_mix_models_unless_overwrite(tmp_path, tiny_model_path, capsys):
    from vqpipe import VQModel

    make_shards(tmp_path / "in", 1, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-00000.tar"), out)
    assert cli.main(["run", str(config)]) == 0
    other = tmp_path / "other-model"
    VQModel.from_pretrained(tiny_model_path).save_pretrained(str(other))
    weights = other / "diffusion_pytorch_model.safetensors"
    model = VQModel.from_pretrained(str(other))
    model.quant_conv.bias.data += 1
    model.save_pretrained(str(other))
    assert weights.exists()
    assert cli.main(["run", str(config), f"model.path={other}"]) == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert cli.main(["run", str(config), f"model.path={other}", "--overwrite"]) == 0
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"vqpipe"])
    assert meta["weights_sha256"] == VQModel.from_pretrained(str(other)).weights_sha256


def test_misconfiguration_guard_stops_early(tmp_path, tiny_model_path, capsys):
    make_shards(tmp_path / "in", 6, per_shard=3)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          input={"image_keys": ["png"]}, ray={"guard_shards": 2, "num_workers": 1})
    assert cli.main(["run", str(config)]) == 1
    err = capsys.readouterr().err
    assert "no_image" in err and "input.image_keys" in err
    assert len(list((out / "_vqpipe" / "shards").glob("*.json"))) < 6


def test_killed_driver_resumes_exactly_once(tmp_path, tiny_model_path):
    keys = make_shards(tmp_path / "in", 6, per_shard=3)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    with slow_driver(config, [f"shard-{s:05d}" for s in range(6)]):
        deadline = time.time() + 120
        markers = out / "_vqpipe" / "shards"
        while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
            time.sleep(0.2)
        assert len(list(markers.glob("*.json"))) >= 2, "the driver committed nothing in time"
    committed = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.parquet")
                 if (markers / f"{p.stem}.json").exists()}
    assert 2 <= len(committed) < 6
    assert cli.main(["run", str(config)]) == 0
    after = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name in committed for p in [out / name]}
    assert after == committed
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))


def test_hung_straggler_is_rerun_elsewhere_and_run_ends(tmp_path, tiny_model_path, monkeypatch):
    keys = make_shards(tmp_path / "in", 3, per_shard=4)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"shard_timeout_s": 2})
    monkeypatch.setenv(faults.ENV, json.dumps([{"stem": "shard-00000", "after_batches": 1, "action": "sleep",
                                                 "seconds": 600, "once": str(tmp_path / "hung")}]))
    started = time.time()
    assert cli.main(["run", str(config)]) == 0
    assert time.time() - started < 120  # nowhere near the 600 s hang
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
