"""`vqpipe publish`: the dataset card, the files sent, refusals, and what must never leave the machine.

Offline: the card is parsed by huggingface_hub and loaded by `datasets` from the local folder; the
upload runs huggingface_hub's real `HfApi.upload_folder` (its file selection included) up to the
calls that would reach the Hub, which are stood in for and record what they were given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runfiles import make_shards, write_config
from vqpipe import cli
from vqpipe.publish import upload as publish
from vqpipe.read.tokens import codes_array, latents_array, read_tokens

REPO = "someone/tokens"
SECRETS = ("AKIAEXAMPLEKEY", "s3cr3t-value", "minio.internal", "hf_sentinelTOKEN", "X-Amz-Signature")


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, tiny_model_path, ray_cluster) -> Path:
    """A finished `vqpipe run` (2 shards of 4 good samples and 1 imageless one, codes and latents),
    and `vqpipe decode`'s report on it."""
    tmp = tmp_path_factory.mktemp("publish")
    make_shards(tmp / "in", 2, per_shard=4)
    config = write_config(tmp, tiny_model_path, str(tmp / "in" / "shard-*.tar"), tmp / "out")
    assert cli.main(["run", str(config)]) == 0
    assert cli.main(["decode", str(config), "--num-samples", "4"]) in (0, 1)  # a random model may miss a check
    return tmp / "out"


@pytest.fixture
def output(run_output, tmp_path) -> Path:
    """A private copy of the run's output, with secrets planted where a real manifest can hold them."""
    out = tmp_path / "out"
    shutil.copytree(run_output, out)
    manifest_path = out / "_vqpipe" / "run.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["output"]["storage_options"] = {
        "key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "client_kwargs": {"endpoint_url": "https://minio.internal"}}
    manifest["config"]["model"]["path"] = "https://user:s3cr3t-value@models.example/vq?X-Amz-Signature=abc"
    manifest_path.write_text(json.dumps(manifest))
    return out


def test_card_parses_and_declares_the_arrays(output):
    from huggingface_hub import DatasetCard

    publish.prepare(str(output), REPO)
    card = DatasetCard.load(output / "README.md")
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.parquet"}]}]
    features = {f["name"]: f for f in card.data.dataset_info["features"]}
    assert features["codes"]["dtype"] == {"array2_d": {"shape": [16, 16], "dtype": "uint16"}}
    assert features["latents"]["dtype"] == {"array3_d": {"shape": [4, 16, 16], "dtype": "float16"}}
    assert features["key"]["dtype"] == "string" and features["width"]["dtype"] == "int32"
    for words in ("## Lineage", "weights sha256", "scaling factor", "rows: 8", "failed samples: no_image 2",
                  "perplexity", "scaling_factor for unit variance", "load_dataset", "polars", "duckdb", "TokenDataset",
                  "## Fidelity (`vqpipe decode`)", "Mean PSNR", "![originals and reconstructions](_vqpipe/publish/grid.png)"):
        assert words in card.text
    report = json.loads((output / "_vqpipe/decode/report.json").read_text())
    assert all(check["name"] in card.text for check in report["checks"])


def test_load_dataset_uses_the_card(output, monkeypatch, tmp_path):
    from datasets import Array2D, Array3D, load_dataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    publish.prepare(str(output), REPO)
    # cache_dir, not only the variable: datasets reads HF_DATASETS_CACHE once, at import, and a
    # folder named like another one (out/) could be answered from a stale cache of that one.
    dataset = load_dataset(str(output), split="train", cache_dir=str(tmp_path / "hf"))
    assert dataset.features["codes"] == Array2D((16, 16), "uint16")
    assert dataset.features["latents"] == Array3D((4, 16, 16), "float16")
    stored = dataset.data.schema  # Arrow, as the card declared it; the numpy format widens to int64 / float32
    assert stored.field("codes").type.storage_type.value_type.value_type == "uint16"
    assert stored.field("latents").type.storage_type.value_type.value_type.value_type == "halffloat"
    batch = dataset.with_format("numpy")[:4]
    assert batch["codes"].shape == (4, 16, 16) and batch["latents"].shape == (4, 4, 16, 16)
    table = read_tokens(str(output), columns=["key", "codes", "latents"])  # the card does not break vqpipe's reader
    order = [table.column("key").to_pylist().index(k) for k in dataset["key"][:4]]
    np.testing.assert_array_equal(batch["codes"], codes_array(table)[order])
    np.testing.assert_array_equal(batch["latents"], latents_array(table)[order])


class StandIn:
    """The Hub's side of an upload: records what each request would have carried."""

    def __init__(self, monkeypatch):
        import huggingface_hub._upload_pipeline as pipeline
        from huggingface_hub import HfApi

        self.calls: dict[str, dict] = {}
        record = self._record
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: record("create_repo", repo_id=repo_id, **kw))
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: record("create_branch", **kw))
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kw: record("validate_yaml", content=content))
        monkeypatch.setattr(pipeline, "pipelined_upload", lambda api, **kw: record("commit", **kw))

    def _record(self, name: str, **kwargs):
        self.calls[name] = kwargs

    def sent(self) -> dict[str, int]:
        return {op.path_in_repo: Path(op.path_or_fileobj).stat().st_size for op in self.calls["commit"]["add_operations"]}


def dry_run_files(text: str) -> dict[str, int]:
    lines = text.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line == "---") + 1  # after the card's header
    listing = [line for line in lines[start:] if line.endswith(" bytes") and "bytes to" not in line]
    return {line.split()[0]: int(line.split()[1].replace(",", "")) for line in listing}


def test_dry_run_lists_exactly_what_the_upload_sends(output, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_sentinelTOKEN")
    hub = StandIn(monkeypatch)
    assert cli.main(["publish", str(output), REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not hub.calls, "--dry-run must send nothing"
    listed = dry_run_files(printed)
    assert {"README.md", "_vqpipe/publish/run.json", "_vqpipe/publish/grid.png"} <= set(listed)
    assert sum(name.endswith(".parquet") for name in listed) == 2
    assert (output / "README.md").read_text() in printed  # the card written is the card printed
    assert cli.main(["publish", str(output), REPO, "--private", "--revision", "v1"]) == 0
    assert hub.sent() == listed
    assert hub.calls["create_repo"]["private"] is True and hub.calls["create_repo"]["repo_type"] == "dataset"
    assert hub.calls["create_branch"]["branch"] == "v1" and hub.calls["commit"]["revision"] == "v1"
    assert hub.calls["validate_yaml"]["content"] == (output / "README.md").read_text()


def test_nothing_secret_is_published(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_sentinelTOKEN")
    plan = publish.prepare(str(output), REPO)
    for path in plan.files:
        data = (output / path).read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], path
    assert not any("_vqpipe/shards" in p or p == "_vqpipe/run.json" for p in plan.files)
    published = json.loads((output / "_vqpipe/publish/run.json").read_text())
    assert published["config"]["output"]["storage_options"] == publish.UNPUBLISHED
    assert published["config"]["model"]["path"] == "https://models.example/vq"


@pytest.mark.parametrize("damage, words", [
    (lambda out: _one(out / "_vqpipe/shards", "shard-00001-*.json").unlink(), "data files without a commit marker (shard-00001-"),
    (lambda out: _one(out, "shard-00000-*.parquet").unlink(), "commit markers whose data file is missing (shard-00000-"),
    (lambda out: _set_status(out, "running"), "status is 'running'"),
    (lambda out: (out / "_vqpipe/run.json").unlink(), "no _vqpipe/run.json"),
    (lambda out: _set(out, totals={"shards": 3}), "2 of 3 shards committed"),  # a --limit-shards run is "complete"
], ids=["no-marker", "no-data", "running", "no-manifest", "limited"])
def test_refuses_a_partial_output(output, capsys, damage, words):
    damage(output)
    assert cli.main(["publish", str(output), REPO, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "not a complete output" in err and words in err and "--allow-partial" in err
    assert not (output / "README.md").exists()
    assert cli.main(["publish", str(output), REPO, "--dry-run", "--allow-partial"]) == 0
    assert "**Incomplete output**" in (output / "README.md").read_text()


def _one(folder: Path, pattern: str) -> Path:
    """The one file of ``pattern``: stems carry a hash of the shard's URL."""
    (path,) = folder.glob(pattern)
    return path


def _set_status(out: Path, status: str) -> None:
    _set(out, status=status)


def _set(out: Path, **entries) -> None:
    path = out / "_vqpipe/run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


def test_an_empty_folder_is_refused_even_with_allow_partial(tmp_path, capsys):
    assert cli.main(["publish", str(tmp_path), REPO, "--dry-run", "--allow-partial"]) == 2
    assert "no Parquet files to publish" in capsys.readouterr().err


def test_large_folder_upload_gets_the_same_selection(output):
    """Where huggingface_hub still has ``upload_large_folder`` (0.x-1.x), it is the one called, and
    its patterns, applied the way huggingface_hub applies them, select exactly the dry-run's files."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    class LargeFolderApi:
        def __init__(self):
            self.calls: dict[str, dict] = {}

        def create_repo(self, repo_id, **kwargs):
            self.calls["create_repo"] = kwargs

        def upload_large_folder(self, **kwargs):
            self.calls["upload_large_folder"] = kwargs

    plan = publish.prepare(str(output), REPO)
    (output / ".cache" / "huggingface").mkdir(parents=True)
    (output / ".cache" / "huggingface" / "upload.lock").write_text("")  # the upload's own resume state
    api = LargeFolderApi()
    publish.upload(plan, private=True, api=api)
    call = api.calls["upload_large_folder"]
    assert call["repo_type"] == "dataset" and call["private"] is True and Path(call["folder_path"]) == output
    every = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    chosen = filter_repo_objects(every, allow_patterns=call["allow_patterns"],
                                 ignore_patterns=call["ignore_patterns"] + DEFAULT_IGNORE_PATTERNS)
    assert sorted(chosen) == list(plan.files)
