"""The README's reading snippets run as written, against a real `vqpipe run` output."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runfiles import make_shards, write_config
from vqpipe import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def reading_snippets(heading: str = "### Reading the tokens") -> list[str]:
    text = README.read_text()
    section = text[text.index(heading) + len(heading):]
    ends = [i for i in (section.find("\n## "), section.find("\n### ")) if i >= 0]
    section = section[: min(ends)]
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


VIEWS = ["center", "hflip"]


@pytest.fixture(scope="module")
def views_output(tmp_path_factory, tiny_model_path, ray_cluster):
    tmp = tmp_path_factory.mktemp("readme-views")
    make_shards(tmp / "in", 2, per_shard=4)
    out = tmp / "out"
    config = write_config(tmp, tiny_model_path, str(tmp / "in" / "shard-*.tar"), out, preprocess={"views": VIEWS})
    assert cli.main(["run", str(config)]) == 0
    return out


def test_readme_reads_views_with_every_reader():
    snippets = "\n".join(reading_snippets("### Reading views"))
    for reader in ("pyarrow", "pandas", "polars", "duckdb", "load_dataset", "TokenDataset", "conditioning"):
        assert reader in snippets


@pytest.mark.parametrize("index", range(7))
def test_views_snippet_runs_with_the_view_axis(index, views_output, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    code = reading_snippets("### Reading views")[index].replace("out/views", str(views_output))
    namespace: dict = {}
    exec(compile(code, f"README views snippet {index}", "exec"), namespace)
    n, v, h = 8, len(VIEWS), 16
    checks = {
        "codes": lambda x: x.shape == (n, v, h, h),
        "latents": lambda x: x.shape == (n, v, 4, h, h),
        "mirror_codes": lambda x: x.shape == (n, h, h),
        "views": lambda x: x == VIEWS,
        "df": lambda x: len(x) == n and len(x["codes"].iloc[0]) == v and len(x["crop_box"].iloc[0]) == v,
        "frame": lambda x: x.height == n and x.schema["codes"].shape == (v, h, h),
        "views_per_row": lambda x: x == v,
        "dataset": lambda x: len(x) == n and len(x[0]["codes"]) == v and len(x[0]["codes"][0]) == h,
        "batch": lambda x: tuple(x["codes"].shape) == (4, h, h),
        "every": lambda x: tuple(x["codes"].shape) == (4, v, h, h) and tuple(x["latents"].shape) == (4, v, 4, h, h),
        "conditioning": lambda x: x.shape == (n, v, 6) and (x[..., 4:] == 32).all() and (x[..., 2:4] >= 0).all(),
    }
    found = [name for name in checks if name in namespace]
    assert found, f"snippet {index} defines none of {list(checks)}"
    for name in found:
        assert checks[name](namespace[name]), f"views snippet {index}: {name} has the wrong shape or count"
