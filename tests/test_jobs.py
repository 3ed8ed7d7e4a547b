"""The cluster deployment files in jobs/ and the shipped configs: they parse, use only field names
their consumers know, reference files that exist, and agree with each other and with pyproject.toml.

Field names of the KubeRay RayJob are checked against the ray.io/v1 Go types (kuberay
ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go); the cluster launcher config is
validated against the schema Ray itself uses (ray/autoscaler/ray-schema.json); the runtime env
against ``ray.runtime_env.RuntimeEnv``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vqpipe.model import hub
from vqpipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SUBMIT = JOBS / "submit.sh"
CONFIG_REF = re.compile(r"\bconfigs/[\w.-]+\.ya?ml\b")

# json tags of the KubeRay ray.io/v1 spec types (the subset of fields a typo would silently drop).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                   "managedBy", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((JOBS / name).read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml("kuberay-rayjob.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load_yaml("cluster-aws.yaml")


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_to_a_mapping(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)  # typed validation only: no model is loaded, nothing is downloaded


def test_referenced_configs_exist_and_validate():
    referenced = {m for f in JOBS.iterdir() if f.is_file() for m in CONFIG_REF.findall(f.read_text())}
    assert "configs/laion.yaml" in referenced
    for ref in referenced:
        assert (ROOT / ref).is_file(), f"{ref} is referenced in jobs/ but does not exist"
        load_config(ROOT / ref)


# --- KubeRay RayJob ---------------------------------------------------------------------------

def test_rayjob_kind_and_job_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown RayJob fields: {set(spec) - RAYJOB_SPEC}"
    assert spec["entrypoint"] == "vqpipe run configs/laion.yaml"
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_cluster_spec(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, f"unknown RayClusterSpec fields: {set(cluster) - RAYCLUSTER_SPEC}"
    assert cluster["enableInTreeAutoscaling"] is True
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and head["template"]["spec"]["containers"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, f"unknown WorkerGroupSpec fields: {set(group) - WORKER_GROUP}"
        assert group["groupName"] and group["template"]["spec"]["containers"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert all(cluster["rayVersion"] in image for image in images), "image Ray version != rayVersion"


def test_rayjob_gpu_workers_have_8_gpus(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                           for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for group in gpu_groups:
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 8
        assert resources.get("requests", resources["limits"]).get("nvidia.com/gpu", 8) == 8
        assert group["rayStartParams"].get("num-gpus", "8") == "8"


def test_rayjob_runtime_env_matches_jobs_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    embedded = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**embedded)  # Ray's own validation of the fields
    assert embedded["working_dir"].endswith(".zip")
    assert embedded["pip"] == load_yaml("runtime_env.yaml")["pip"]


def test_rayjob_config_joins_the_cluster(rayjob):
    """Without ray.address the driver would start a private Ray on the head pod."""
    config = load_config(ROOT / rayjob["spec"]["entrypoint"].split()[-1])
    assert config.ray.address == "auto"


# --- runtime env --------------------------------------------------------------------------------

def requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_env_is_valid_and_installs_the_working_dir():
    from ray.runtime_env import RuntimeEnv

    env = load_yaml("runtime_env.yaml")
    RuntimeEnv(working_dir=".", **env)
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in env["pip"]
    assert {".git", ".venv"} <= set(env["excludes"])


def test_runtime_env_lists_pyprojects_runtime_deps_except_ray():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(d) for d in project["dependencies"]} - {"ray"}
    listed = [p for p in load_yaml("runtime_env.yaml")["pip"] if not p.startswith("$")]
    assert runtime <= {requirement_name(p) for p in listed}
    assert "ray" not in {requirement_name(p) for p in listed}  # the cluster's Ray must not be replaced
    pinned = {requirement_name(d): d for d in project["dependencies"]}
    for spec in listed:  # same lower bounds as pyproject
        name = requirement_name(spec)
        if name in pinned:
            assert spec.replace(" ", "") == pinned[name].replace(" ", ""), f"{spec} != pyproject's {pinned[name]}"


# --- cluster launcher ------------------------------------------------------------------------------

def test_launcher_required_keys(launcher):
    assert launcher["cluster_name"] and launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] <= launcher["max_workers"] for t in gpu_types)
    assert any("vqpipe" in c for c in launcher["setup_commands"])
    for local in launcher.get("file_mounts", {}).values():
        assert (ROOT / local).exists()


def test_launcher_matches_rays_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # additionalProperties: false catches misspelt keys


# --- submit.sh -------------------------------------------------------------------------------------

def submit(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=30)


def test_submit_help():
    result = submit("--help")
    assert result.returncode == 0
    assert "Usage: jobs/submit.sh" in result.stdout and "--dry-run" in result.stdout and "decode" in result.stdout


def test_submit_dry_run_prints_the_exact_command(tmp_path):
    result = submit("--address", "http://head:8265", "--dry-run", "configs/laion.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("ray job submit --address http://head:8265 --working-dir . "
                             "--runtime-env jobs/runtime_env.yaml -- vqpipe run configs/laion.yaml\n")


def test_submit_dry_run_decode_with_overrides_from_ray_address():
    result = submit("--dry-run", "--no-wait", "decode", "configs/demo.yaml", "--num-samples", "8",
                    "output.path=s3://b/my tokens", RAY_ADDRESS="http://10.0.0.1:8265")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("ray job submit --address http://10.0.0.1:8265 --no-wait --working-dir . "
                             "--runtime-env jobs/runtime_env.yaml -- vqpipe decode configs/demo.yaml "
                             "--num-samples 8 output.path=s3://b/my\\ tokens\n")


@pytest.mark.parametrize("args, words", [
    (("--dry-run", "configs/laion.yaml"), "no Ray address"),
    (("--address", "x", "--dry-run", "configs/missing.yaml"), "no such config"),
    (("--address", "x", "--dry-run", "/etc/hosts"), "relative to the repository root"),
    (("--address", "x", "--dry-run"), "missing CONFIG"),
    (("--bogus", "configs/laion.yaml"), "unknown option --bogus"),
])
def test_submit_usage_errors_exit_2(args, words):
    result = submit(*args)
    assert result.returncode == 2 and words in result.stderr and not result.stdout


@pytest.mark.parametrize("token_in", ["file", "env"])
def test_submit_with_a_token_but_no_auth_mode_prints_the_fix_in_one_line(tmp_path, token_in):
    (tmp_path / ".ray").mkdir()
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nowhere")}
    if token_in == "file":
        (tmp_path / ".ray" / "auth_token").write_text("s3cr3t-token")
        env.pop("RAY_AUTH_TOKEN_PATH")
    else:
        env["RAY_AUTH_TOKEN"] = "s3cr3t-token"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | env
    result = subprocess.run(["bash", str(SUBMIT), "--address", "http://127.0.0.1:1", "configs/demo.yaml"], cwd=ROOT,
                            env=environ, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "export RAY_AUTH_MODE=token" in result.stderr and "Traceback" not in result.stderr
    assert "s3cr3t" not in result.stderr  # where the token is, never the token


def test_submit_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run([shellcheck, str(SUBMIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- known checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, repo, revision, subfolder, value_range, scaling_factor", [
    ("ldm-celebahq-256", "CompVis/ldm-celebahq-256", "refs/pr/7", "vqvae", (-1.0, 1.0), 1.0),
    ("amused-256", "amused/amused-256", None, "vqvae", (0.0, 1.0), None),
    ("kandinsky-2-2-movq", "kandinsky-community/kandinsky-2-2-decoder", None, "movq", (-1.0, 1.0), 1.0),
])
def test_known_checkpoint_configs(name, repo, revision, subfolder, value_range, scaling_factor):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    where = hub.parse(config.model.path)
    assert (where.repo_id, where.revision, config.model.subfolder) == (repo, revision, subfolder)
    assert config.preprocess.value_range == value_range and config.preprocess.resolution == 256
    assert config.model.scaling_factor == scaling_factor
    assert config.model.precision != "auto"  # the CPU-only head and the GPU workers must agree


# Architectures as the Hub configs give them (README, "Known checkpoints"), with the size of
# the Hub's fp32 weight file in MB: a VQModel built from the figures must have exactly that many bytes.
KNOWN_ARCHITECTURES = {
    "ldm-celebahq-256": (dict(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=3,
                              num_vq_embeddings=8192), 221, 4),
    "amused-256": (dict(block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
                        up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=2, latent_channels=64,
                        num_vq_embeddings=8192, mid_block_add_attention=False, lookup_from_codebook=True,
                        force_upcast=True), 585, 16),
    "kandinsky-2-2-movq": (dict(block_out_channels=(128, 256, 256, 512),
                                down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
                                layers_per_block=2, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16384,
                                norm_type="spatial"), 271, 8),
}


@pytest.mark.parametrize("name", sorted(KNOWN_ARCHITECTURES))
def test_known_architectures_match_the_hub_weight_sizes(name):
    import torch

    from vqpipe import VQModel

    kwargs, megabytes, factor = KNOWN_ARCHITECTURES[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = VQModel(**kwargs)
    assert round(sum(p.numel() for p in model.parameters()) * 4 / 1e6) == megabytes
    assert model.config.downsample_factor == factor
