"""How a run ends when it cannot go on as planned: a signal, workers that cannot start, a worker
hung for good. Real drivers in real processes where signals and folders matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqpipe import cli, faults
from runfiles import make_shards, write_config, written_keys

pytestmark = pytest.mark.usefixtures("ray_cluster")

SLOW_SHARDS = json.dumps([{"stem": f"shard-{s:05d}", "after_batches": 1, "action": "sleep", "seconds": 2.0}
                          for s in range(8)])


def _start_driver(config: Path, cwd: Path | None = None, faults_json: str | None = None,
                  **env_vars: str) -> subprocess.Popen:
    """``vqpipe run`` as a person types it (the console script: ``python -m`` would itself put the
    current folder first on the driver's path)."""
    env = dict(os.environ, **env_vars)
    if faults_json:
        env[faults.ENV] = faults_json
    script = Path(sys.executable).parent / "vqpipe"
    return subprocess.Popen([str(script), "run", str(config)], env=env, cwd=cwd,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_markers(out: Path, n: int, driver: subprocess.Popen, timeout: float = 120) -> None:
    markers = out / "_vqpipe" / "shards"
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(markers.glob("*.json"))) < n and driver.poll() is None:
        time.sleep(0.1)
    assert len(list(markers.glob("*.json"))) >= n, "the driver committed nothing in time"


def _finish(driver: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        out, err = driver.communicate()
        pytest.fail(f"the driver did not end within {timeout} s:\n{err[-3000:]}")
    return driver.returncode, out, err


@pytest.mark.parametrize("signum, to_group, status", [
    (signal.SIGINT, True, 130), pytest.param(signal.SIGTERM, False, 143, marks=pytest.mark.slow)])
def test_signal_stops_the_run_with_manifest_and_summary(tmp_path, tiny_model_path, signum, to_group, status):
    """Ctrl-C reaches the whole foreground process group (Ray's processes too); `timeout` and a
    preempted node send SIGTERM to the driver alone."""
    keys = make_shards(tmp_path / "in", 8, per_shard=3)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    driver = _start_driver(config, faults_json=SLOW_SHARDS)
    _wait_for_markers(out, 1, driver)
    sent = time.time()
    (os.killpg if to_group else os.kill)(driver.pid, signum)
    rc, stdout, stderr = _finish(driver, timeout=30)
    assert time.time() - sent < 10, "the run took more than 10 s to stop"
    assert rc == status
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "SIGABRT" not in stderr
    manifest = json.loads((out / "_vqpipe" / "run.json").read_text())
    committed = len(list((out / "_vqpipe" / "shards").glob("*.json")))
    assert manifest["status"] == "interrupted" and 1 <= committed < 8
    assert manifest["totals"]["this_run"]["shards_committed"] == committed
    assert "samples written" in stdout
    # nothing half-done is seen, and a rerun finishes the rest exactly once
    assert cli.main(["run", str(config)]) == 0
    got = written_keys(out)
    assert sorted(got) == sorted(keys)
    # the rerun's totals describe the whole output; its own part is under this_run
    totals = json.loads((out / "_vqpipe" / "run.json").read_text())["totals"]
    assert totals["samples_written"] == len(keys) and totals["shards_committed"] == 8
    assert totals["this_run"]["shards_committed"] == 8 - committed
    assert totals["samples_failed_by_reason"] == {"no_image": 8}


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path, tiny_model_path):
    make_shards(tmp_path / "in", 8, per_shard=3)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    driver = _start_driver(config, faults_json=SLOW_SHARDS)
    _wait_for_markers(out, 1, driver)
    os.killpg(driver.pid, signal.SIGINT)
    manifest = out / "_vqpipe" / "run.json"
    while driver.poll() is None and '"interrupted"' not in manifest.read_text():  # the first one handled
        time.sleep(0.05)
    second = time.time()
    os.killpg(driver.pid, signal.SIGINT)
    rc, _, stderr = _finish(driver, timeout=30)
    assert rc == 130 and time.time() - second < 2
    assert "Traceback" not in stderr


def test_run_from_a_folder_holding_a_vqpipe_directory(tmp_path, tiny_model_path):
    """A clone of the repository in the current folder: Ray puts that folder on the workers' path,
    where ``vqpipe/`` would be imported as a namespace package and every worker fail to start.
    (``RAY_ADDRESS=""``, as a wrapper script may export it, means "not set": an embedded Ray.)"""
    keys = make_shards(tmp_path / "in", 2, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    clone = tmp_path / "clone"
    (clone / "vqpipe").mkdir(parents=True)
    (clone / "vqpipe" / "README.md").write_text("the repository root, not the package\n")
    rc, _, stderr = _finish(_start_driver(config, cwd=clone, RAY_ADDRESS=""), timeout=240)
    assert rc == 0, stderr[-3000:]
    assert sorted(written_keys(out)) == sorted(keys)


def test_worker_that_cannot_start_stops_the_run(tmp_path, tiny_model_path, monkeypatch, capsys):
    make_shards(tmp_path / "in", 2, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    monkeypatch.setenv(faults.ENV, json.dumps([{"at": "worker_start", "action": "raise"}]))
    started = time.time()
    assert cli.main(["run", str(config)]) == 1
    assert time.time() - started < 120
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("vqpipe: error:")]
    assert line == ["vqpipe: error: workers cannot start (3 tries in a row): "
                    "vqpipe.faults.InjectedFault: injected fault as the worker starts"]
    assert json.loads((out / "_vqpipe" / "run.json").read_text())["status"] == "failed"


def test_hung_only_worker_is_restarted_and_its_shard_requeued(tmp_path, tiny_model_path, monkeypatch):
    """The one worker SIGSTOPs itself mid-shard: no idle worker exists to take the shard over."""
    keys = make_shards(tmp_path / "in", 3, per_shard=4)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1, "shard_timeout_s": 3, "speculative": False})
    flag = tmp_path / "stopped"
    monkeypatch.setenv(faults.ENV, json.dumps([{"stem": "shard-00001", "after_batches": 1, "action": "stop",
                                                 "once": str(flag)}]))
    started = time.time()
    assert cli.main(["run", str(config)]) == 0
    assert flag.exists() and time.time() - started < 120
    got = written_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs, mounted for the test (needs root and a mount-capable sandbox)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_full_disk_stops_the_run_cleanly(tmp_path, tiny_model_path, tiny_disk, capsys):
    make_shards(tmp_path / "in", 4, per_shard=20)  # ~60 KB of Parquet a shard
    out = tiny_disk / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"num_workers": 1, "max_retries": 3})
    out.mkdir()
    _fill(tiny_disk, leave=48 * 1024)  # the manifest fits, no shard does
    started = time.time()
    assert cli.main(["run", str(config)]) == 1
    assert time.time() - started < 60  # no retry of what cannot succeed
    captured = capsys.readouterr()
    assert "vqpipe: error: output storage full (OSError: [Errno 28] No space left on device" in captured.err
    assert "Traceback" not in captured.err and "samples written" in captured.out
    assert json.loads((out / "_vqpipe" / "run.json").read_text())["status"] == "failed"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temp file left behind
    for record in out.rglob("*.json"):
        json.loads(record.read_text())  # none truncated
    # space freed: the rerun finishes
    (tiny_disk / "filler").unlink()
    assert cli.main(["run", str(config)]) == 0


def test_second_run_on_a_live_output_is_refused_and_a_stale_lease_taken_over(tmp_path, tiny_model_path, capsys):
    from vqpipe.config import load_config
    from vqpipe.output.lease import Lease

    keys = make_shards(tmp_path / "in", 2, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-*.tar"), out)
    with Lease(load_config(config), heartbeat_s=0.2):  # a live run, heartbeating
        time.sleep(0.5)
        assert cli.main(["run", str(config)]) == 2
        assert "another run is writing this output" in capsys.readouterr().err
        assert not (out / "_vqpipe" / "run.json").exists() and not list(out.glob("*.parquet"))
    lease = out / "_vqpipe" / "lease.json"
    assert not lease.exists()  # released
    # a run killed without releasing leaves a lease whose heartbeat stopped
    lease.write_text(json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 3600}))
    assert cli.main(["run", str(config)]) == 0
    assert sorted(written_keys(out)) == sorted(keys) and not lease.exists()
