"""The README's claims against what its commands produce: the quick start's files and summary lines
from a real demo run, and the reading snippets run as written, with the shapes and dtypes their
comments promise, against the same output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from runfiles import make_shards, write_config
from vqpipe import cli

README = REPO / "README.md"
ROWS = 14  # the demo's good samples: 4 shards of 5 and 4 samples, minus 4 damaged and 4 without an image


def section(title: str) -> str:
    text = README.read_text()
    body = text[text.index(title):]
    return body[: body.index("\n## ", 1)]


def reading_snippets(heading: str = "### Reading the tokens") -> list[str]:
    text = README.read_text()
    section = text[text.index(heading) + len(heading):]
    ends = [i for i in (section.find("\n## "), section.find("\n### ")) if i >= 0]
    section = section[: min(ends)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def quick_start_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section("## Quick start"), flags=re.S)


def _pairs(block: str) -> list[tuple[str, str]]:
    """``label   value`` lines of a summary table (the fidelity audit's own lines follow it)."""
    table = block.strip().split("\nfidelity audit")[0]
    return [tuple(part.strip() for part in line.rsplit("  ", 1)) for line in table.splitlines()]


@pytest.fixture(scope="module")
def decoded(demo_run) -> subprocess.CompletedProcess:
    """The quick start's decode, as written, against the demo run's output."""
    result = subprocess.run([sys.executable, "-m", "vqpipe.cli", "decode", "configs/demo.yaml",
                             f"output.path={demo_run.out}", "--min-psnr", "22"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result


# -- the quick start -------------------------------------------------------------------------------

def test_quick_start_is_two_commands_with_the_cpu_build_of_torch():
    (commands,) = quick_start_blocks("bash")
    lines = [line for line in commands.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 2
    assert all("pip install torch --index-url https://download.pytorch.org/whl/cpu" in line for line in lines)
    assert "vqpipe run configs/demo.yaml && vqpipe decode configs/demo.yaml --min-psnr 22" in lines[0]


def test_quick_start_files_exist_after_the_demo_run_and_decode(demo_run, decoded):
    prose = section("## Quick start")
    paths = set(re.findall(r"`(out/demo/[^`]*)`", prose))
    assert "out/demo/demo-0000{0..3}-{hash}.parquet" in paths and "out/demo/_vqpipe/run.json" in paths
    for path in paths:
        expanded = [path.replace("{0..3}", str(i)) for i in range(4)] if "{0..3}" in path else [path]
        for item in expanded:
            pattern = str(Path(item).relative_to("out/demo")).replace("{hash}", "[0-9a-f]" * 8)
            assert len(list(demo_run.out.glob(pattern))) == 1 or (demo_run.out / pattern).exists(), item
    report_files = re.search(r"decode report\s+\((.*?)\)\s+under\s+`out/demo/_vqpipe/decode/`", prose, flags=re.S).group(1)
    names = re.findall(r"`([\w.]+\.(?:png|html|json))`", report_files)
    assert {"grid.png", "report.html", "report.json"} <= set(names)
    decode_dir = demo_run.out / "_vqpipe" / "decode"
    for name in names:
        assert (decode_dir / name).stat().st_size > 0, name
    assert len(list(decode_dir.glob("0*.png"))) == ROWS  # "one PNG per sample"


def test_quick_start_summary_lines_match_the_demo_run(demo_run):
    claimed = _pairs(quick_start_blocks("text")[0])
    actual = dict(_pairs(demo_run.stdout))
    for label, value in claimed:
        assert label in actual, f"the summary has no line {label!r}: {demo_run.stdout}"
        got = actual[label]
        if re.fullmatch(r"\d+m\d\ds", value):  # times vary by machine: the form is the claim
            assert re.fullmatch(r"\d+m\d\ds", got), (label, got)
        elif re.fullmatch(r"\d+\.\d", value):
            assert re.fullmatch(r"\d+\.\d", got), (label, got)
        elif label == "output":
            assert got == str(demo_run.out)
        else:
            assert got == value, (label, got, value)


def test_demo_run_prints_no_ray_auth_notice_and_no_traceback(demo_run):
    assert "Token authentication is enabled" not in demo_run.stderr
    assert "RAY_AUTH_MODE" not in demo_run.stderr and "Traceback" not in demo_run.stderr


def test_quick_start_decode_lines_match(decoded):
    claimed = quick_start_blocks("text")[1].strip().splitlines()
    printed = decoded.stdout.splitlines()
    for line in claimed:
        # PSNR figures may move in the last digit on another CPU: the form is compared, the value near.
        pattern = re.sub(r"\d+\\\.\d+", r"(\\d+\\.\\d+)", re.escape(line))
        match = next((re.fullmatch(pattern, p) for p in printed if re.fullmatch(pattern, p)), None)
        assert match, f"{line!r} not printed by the decode: {decoded.stdout}"
        for want, got in zip(re.findall(r"\d+\.\d+", line), match.groups()):
            assert float(got) == pytest.approx(float(want), abs=0.5), line


def test_readme_says_what_a_second_run_prints():
    assert "all 4 shards already committed: nothing to\ndo (out/demo)" in section("## Quick start")


def test_module_table_names_files_that_exist():
    """Each row is a folder (or a module) and the modules it holds, as `name` (job): every one exists,
    and every module of the package is in the table."""
    rows = re.findall(r"^\| `(vqpipe/[\w/.]*)` \| (.*) \|$", section("## How data flows"), flags=re.M)
    named = set()
    for folder, modules in rows:
        if folder.endswith(".py"):
            named.add(folder)
            continue
        # `name` (its job), ...; a row of bare names lists them after its first colon
        listed = re.findall(r"(?:^|, |: )`(\w+)`(?= \(|,| \||$)", modules)
        named.update(f"{folder}{name}.py" for name in listed)
    assert len(named) > 30
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, missing
    modules = {str(p.relative_to(REPO)) for p in (REPO / "vqpipe").rglob("*.py")
               if p.name != "__init__.py" and "demo" not in p.parts}
    assert sorted(modules - named) == []


# -- the reading snippets --------------------------------------------------------------------------

def test_readme_has_the_readers():
    snippets = "\n".join(reading_snippets())
    for reader in ("pyarrow", "pandas", "polars", "duckdb", "load_dataset", "TokenDataset"):
        assert reader in snippets


def _claims(code: str) -> list[tuple[str, str | None, tuple, str]]:
    """``(variable, item, shape, dtype)`` from comments such as ``x = f()  # (N, 4, 32, 32) float32``
    or ``batch = ...  # codes (4, 32, 32) int64, latents (4, 4, 32, 32) float32``."""
    claims = []
    for variable, comment in re.findall(r"^(\w+) = .*?#\s*(.*)$", code, flags=re.M):
        for item, dims, dtype in re.findall(r"(?:(\w+) )?\(([N\d, ]+)\) (\w+)", comment):
            shape = tuple(ROWS if d.strip() == "N" else int(d) for d in dims.split(","))
            claims.append((variable, item or None, shape, dtype))
    return claims


@pytest.mark.parametrize("index", range(6))
def test_snippet_runs_and_keeps_its_comments_promises(index, demo_run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    snippet = reading_snippets()[index]
    namespace: dict = {}
    exec(compile(snippet.replace("out/demo", str(demo_run.out)), f"README snippet {index}", "exec"), namespace)
    checks = {
        "df": lambda v: len(v) == ROWS and v["codes"].iloc[0].shape == (32,),
        "frame": lambda v: v.height == ROWS and str(v.schema["codes"]) == "Array(UInt16, shape=(32, 32))",
        "rows": lambda v: v == ROWS,
        "dataset": lambda v: len(v) == ROWS and len(v[0]["codes"]) == 32,
    }
    claims = _claims(snippet)
    found = [name for name in checks if name in namespace]
    assert found or claims, f"snippet {index} checks nothing"
    for name in found:
        assert checks[name](namespace[name]), f"snippet {index}: {name} has the wrong shape or count"
    for variable, item, shape, dtype in claims:
        value = namespace[variable] if item is None else namespace[variable][item]
        assert tuple(value.shape) == shape, (variable, item, tuple(value.shape), shape)
        assert str(value.dtype).removeprefix("torch.") == dtype, (variable, item, value.dtype, dtype)


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
