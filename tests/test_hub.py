"""``model.path: hf://...`` resolved through a local folder laid out as the Hugging Face cache.

Every test runs with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` under ``tmp_path``: nothing here may
reach the Hub. The cache layout is the one ``huggingface_hub`` writes:
``models--ORG--REPO/refs/{branch}`` holds a commit sha, ``models--ORG--REPO/snapshots/{sha}/...`` the
files (real blobs behind symlinks in a real cache; plain files read the same).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from vqpipe import VQModel, cli
from vqpipe.model import hub
from vqpipe.config import ConfigError, ModelConfig, load_config
from vqpipe.model.loading import load_model, resolve_model_path

pytest.importorskip("huggingface_hub")

SHA = "0123456789abcdef0123456789abcdef01234567"
PR_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache under tmp_path, offline: a test that would download fails instead."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache


def cache_repo(cache: Path, repo_id: str, model_path: str, subfolder: str = "vqvae", sha: str = SHA,
               ref: str = "main", weights: bool = True) -> Path:
    """Put the checkpoint at ``model_path`` into ``cache`` as ``repo_id``@``ref``/``subfolder``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    folder = repo / "snapshots" / sha / subfolder
    folder.mkdir(parents=True)
    for f in Path(model_path).iterdir():
        if weights or f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    return repo / "snapshots" / sha


@pytest.mark.parametrize("path, subfolder", [
    ("hf://acme/tokenizer", "vqvae"),      # repo + model.subfolder
    ("hf://acme/tokenizer/vqvae", None),   # subfolder in the path
    (f"hf://acme/tokenizer@{SHA}/vqvae", None),  # pinned commit
])
def test_cached_checkpoint_loads_offline(offline_cache, tiny_model_path, path, subfolder):
    snapshot = cache_repo(offline_cache, "acme/tokenizer", tiny_model_path)
    model = load_model(ModelConfig(path=path, subfolder=subfolder))
    assert model.weights_sha256 == VQModel.from_pretrained(tiny_model_path).weights_sha256
    expected = snapshot if subfolder else snapshot / "vqvae"
    assert resolve_model_path(path, subfolder) == str(expected)


def test_pr_revision_without_percent_encoding(offline_cache, tiny_model_path):
    cache_repo(offline_cache, "acme/tokenizer", tiny_model_path, sha=PR_SHA, ref="refs/pr/7")
    local = resolve_model_path("hf://acme/tokenizer@refs/pr/7", "vqvae")
    assert local.endswith(f"snapshots/{PR_SHA}")
    assert hub.parse("hf://acme/tokenizer@refs%2Fpr%2F7/vqvae") == hub.HubPath("acme/tokenizer", "refs/pr/7", "vqvae")


def test_hf_home_locates_the_cache(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    cache_repo(tmp_path / "home" / "hub", "acme/tokenizer", tiny_model_path)
    assert load_model(ModelConfig(path="hf://acme/tokenizer/vqvae")).config.num_vq_embeddings == 64


def test_cli_dry_run_with_cached_hub_model(tmp_path, offline_cache, tiny_model_path, capsys):
    """The CLI resolves hf:// before any work (dry run: no Ray). Ray workers resolve it again on their
    own node, from the environment Ray gives them -- which is why cluster runs set HF_HOME / HF_TOKEN /
    HF_HUB_OFFLINE in the job's runtime_env (README, "Running on a cluster"), not only in the submitting shell."""
    import shardfactory as sf

    cache_repo(offline_cache, "acme/tokenizer", tiny_model_path)
    sf.write_tar(tmp_path / "in-00000.tar", [m for i in range(3) for m in sf.good_members(f"k{i}")])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"urls": str(tmp_path / "in-00000.tar")}, "preprocess": {"resolution": 32},
        "model": {"path": "hf://acme/tokenizer", "subfolder": "vqvae"}, "output": {"path": str(tmp_path / "out")},
    }))
    assert cli.main(["run", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "model: hf://acme/tokenizer" in plan and "token grid: 16x16" in plan and "shards: 1" in plan


def test_offline_and_not_cached_names_the_path_and_the_fix(offline_cache):
    with pytest.raises(hub.HubError) as info:
        load_model(ModelConfig(path="hf://acme/missing", subfolder="movq"))
    message = str(info.value)
    assert "hf://acme/missing" in message and "HF_HUB_OFFLINE" in message
    assert "hf download acme/missing --include 'movq/*'" in message and str(offline_cache) in message


def test_cli_reports_uncached_hub_model_as_config_error(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"urls": str(tmp_path / "x.tar")},
        "model": {"path": "hf://acme/missing", "subfolder": "vqvae"}, "output": {"path": str(tmp_path / "out")},
    }))
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "hf://acme/missing/vqvae is not in the local Hugging Face cache" in err
    assert not (tmp_path / "out").exists()


def test_snapshot_without_safetensors_explains_pickle_refusal(offline_cache, tiny_model_path):
    snapshot = cache_repo(offline_cache, "acme/old", tiny_model_path, weights=False)
    (snapshot / "vqvae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hub.HubError, match="does not load pickle .bin weights.*refs/pr/N"):
        resolve_model_path("hf://acme/old", "vqvae")


def test_wrong_subfolder_is_named(offline_cache, tiny_model_path):
    cache_repo(offline_cache, "acme/tokenizer", tiny_model_path)
    with pytest.raises(hub.HubError, match="hf://acme/tokenizer/vae: no config.json there: check the subfolder"):
        resolve_model_path("hf://acme/tokenizer", "vae")


def test_missing_huggingface_hub_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match=r"pip install 'vqpipe\[hf\]'"):
        resolve_model_path("hf://acme/tokenizer", "vqvae")


@pytest.mark.parametrize("path", ["hf://acme", "hf://acme/tokenizer@/vqvae"])
def test_malformed_hub_paths(path):
    with pytest.raises(hub.HubError, match=r"hf://"):
        hub.parse(path)


def test_hub_output_path_is_refused_with_advice(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"input": {"urls": "x.tar"}, "model": {"path": "demo"},
                                      "output": {"path": "hf://datasets/acme/tokens"}}))
    with pytest.raises(ConfigError, match="output.path.*commit rate limit.*bucket or local disk.*upload"):
        load_config(config)
