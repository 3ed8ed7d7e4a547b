"""`vqpipe run` against a simulated multi-node cluster: a head and two worker nodes, one fake GPU each.

The session's other tests share one local Ray inside the pytest process, and a process can join only
one cluster, so the run happens in a child process: this file is also the script it executes
(``python tests/test_multinode.py ARGS_JSON``). The child builds a ``ray.cluster_utils.Cluster``,
runs ``vqpipe.cli.main`` with ``ray.address`` pointing at it, records each worker's ``ready()``
report as the driver receives it, shuts the cluster down and prints one JSON line for the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml

RESULT_PREFIX = "MULTINODE_RESULT "
WORKER_NODES = 2
SHARDS = 8
# Each shard pauses after its first batch, so one worker cannot finish every shard before the
# other has loaded its model: both workers report in, whatever the machine's load.
SLOW_SHARDS = json.dumps([{"stem": f"shard-{s:05d}", "after_batches": 1, "action": "sleep", "seconds": 1.5}
                          for s in range(SHARDS)])


def test_workers_spread_over_nodes_and_output_exactly_once(tmp_path, tiny_model_path):
    import pyarrow.parquet as pq
    import shardfactory as sf

    (tmp_path / "in").mkdir()
    keys = [f"{s}-{i}" for s in range(SHARDS) for i in range(3)]
    for s in range(SHARDS):
        sf.write_tar(tmp_path / "in" / f"shard-{s:05d}.tar",
                     [m for i in range(3) for m in sf.good_members(f"{s}-{i}", name="chelsea")])
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"urls": str(tmp_path / "in" / "shard-*.tar")},
        "preprocess": {"resolution": 32},
        "model": {"path": tiny_model_path, "batch_size": 2},
        "output": {"path": str(out)},
        # auto: one worker per GPU of the whole cluster, 1 GPU each -- only a spread fits
        "ray": {"num_workers": "auto", "gpus_per_worker": "auto", "cpus_per_worker": 1, "shard_timeout_s": 120},
    }))
    result = run_child({"config": str(config)}, timeout=240)

    assert result["rc"] == 0
    workers = result["workers"]
    assert len(workers) == WORKER_NODES
    assert len({w["node_id"] for w in workers}) == WORKER_NODES  # one worker on each node
    assert {w["node_id"] for w in workers} == set(result["gpu_nodes"])  # never on the GPU-less head
    assert all(len(w["gpu_ids"]) == 1 for w in workers)
    written = [k for f in sorted(out.glob("*.parquet")) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    assert sorted(written) == sorted(keys) and len(written) == len(set(written))
    assert len(list((out / "_vqpipe" / "shards").glob("*.json"))) == SHARDS


def run_child(args: dict, timeout: float) -> dict:
    """Run this file as a script; kill its whole process group (the Ray nodes it started) on the way out."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["VQPIPE_FAULTS"] = SLOW_SHARDS
    child = subprocess.Popen([sys.executable, __file__, json.dumps(args)], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        raise AssertionError(f"the multi-node run did not finish in {timeout} s:\n{output[-4000:]}") from None
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # Ray processes left behind, if any
        except ProcessLookupError:
            pass
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert child.returncode == 0 and lines, f"the child failed (exit {child.returncode}):\n{output[-4000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def simulate(config: str) -> dict:
    """Head (no CPUs, no GPUs: the driver only) + WORKER_NODES nodes with 1 CPU and 1 fake GPU each."""
    import ray
    from ray.cluster_utils import Cluster

    from vqpipe import cli
    from vqpipe.run import driver

    reports: list[dict] = []
    worker_back = driver.Driver._worker_back

    def recording_worker_back(self, ref):
        try:
            reports.append(ray.get(ref))  # the ref is ready: ray.wait returned it
        except ray.exceptions.RayError:
            pass  # a worker still starting: the driver asks again, and we record it then
        worker_back(self, ref)

    driver.Driver._worker_back = recording_worker_back
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        for _ in range(WORKER_NODES):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        rc = cli.main(["run", config, f"ray.address={cluster.address}"])
        gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"rc": rc, "workers": reports, "gpu_nodes": gpu_nodes}


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    print(RESULT_PREFIX + json.dumps(simulate(arguments["config"])), flush=True)
