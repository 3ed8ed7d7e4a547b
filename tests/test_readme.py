"""The README's reading snippets run as written, against a real `vqpipe run` output."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runfiles import make_shards, write_config
from vqpipe import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def reading_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Reading the tokens"):]
    section = section[: section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_model_path, ray_cluster):
    tmp = tmp_path_factory.mktemp("readme")
    make_shards(tmp / "in", 2, per_shard=4)
    out = tmp / "out"
    config = write_config(tmp, tiny_model_path, str(tmp / "in" / "shard-*.tar"), out)
    assert cli.main(["run", str(config)]) == 0
    return out


def test_readme_has_the_readers():
    snippets = "\n".join(reading_snippets())
    for reader in ("pyarrow", "pandas", "polars", "duckdb", "load_dataset", "TokenDataset"):
        assert reader in snippets


@pytest.mark.parametrize("index", range(6))
def test_snippet_runs(index, output, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    code = reading_snippets()[index].replace("out/demo", str(output))
    namespace: dict = {}
    exec(compile(code, f"README snippet {index}", "exec"), namespace)
    n = pq.read_table(output, columns=["key"]).num_rows
    assert n == 8
    checks = {
        "codes": lambda v: v.shape == (n, 16, 16),
        "df": lambda v: len(v) == n and v["codes"].iloc[0].shape == (16,),
        "frame": lambda v: v.height == n and v.schema["codes"].shape == (16, 16),
        "rows": lambda v: v == n,
        "dataset": lambda v: len(v) == n and len(v[0]["codes"]) == 16,
        "batch": lambda v: tuple(v["codes"].shape) == (4, 16, 16) and tuple(v["latents"].shape) == (4, 4, 16, 16),
    }
    found = [name for name in checks if name in namespace]
    assert found, f"snippet {index} defines none of {list(checks)}"
    for name in found:
        assert checks[name](namespace[name]), f"snippet {index}: {name} has the wrong shape or count"
