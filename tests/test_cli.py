"""The command line as a new user meets it: help that says what each option does and defaults to,
commands that end quietly when piped into `head`, and a rerun with nothing to do that says so
without starting Ray."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from conftest import REPO
from vqpipe import cli

# Runs the CLI in a fresh process and reports afterwards whether Ray was imported at all.
PROBE = ("import sys\nfrom vqpipe.cli import main\nstatus = main(sys.argv[1:])\n"
         "print('RAY IMPORTED' if 'ray' in sys.modules else 'RAY NOT IMPORTED', file=sys.stderr)\nsys.exit(status)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_top_level_help_says_what_the_tool_does_with_the_three_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "Encode WebDataset image shards into VQ tokens" in text
    for command in ("vqpipe run configs/demo.yaml", "vqpipe decode configs/demo.yaml", "vqpipe inspect out/demo"):
        assert command in text
    assert "validates everything at the edge" not in text  # the developer docstring stays in the code


@pytest.mark.parametrize("command", ["run", "decode", "inspect", "bench"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers(cli._parser())[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help, f"vqpipe {command} {action.option_strings[0]} has no help"
        shown = formatter._expand_help(action)
        assert "(default" in shown, f"vqpipe {command} {action.option_strings[0]} shows no default: {shown!r}"


def test_decode_help_shows_num_samples_and_seed_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["decode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "rows to decode, drawn at random over the whole output (default: 64)" in text
    assert "(default: 0)" in text


# -- pipes -----------------------------------------------------------------------------------------

def _run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """The reader is gone before the command writes a byte: the hardest case for `| head`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "vqpipe.cli", *args], cwd=REPO, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)


def test_inspect_piped_into_head_exits_0_without_a_traceback(demo_run):
    shell = f"set -o pipefail; {sys.executable} -m vqpipe.cli inspect {demo_run.out} | head -4"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stdout.splitlines()) == 4


def test_every_command_into_a_closed_pipe_exits_0_without_a_traceback(demo_run, tmp_path):
    commands = [
        ["--help"], ["run", "--help"], ["run", "--help-config"], ["decode", "--help"], ["bench", "--help"],
        ["inspect", str(demo_run.out)], ["inspect", "--json", str(demo_run.out)],
        ["run", "configs/demo.yaml", f"output.path={demo_run.out}", "--dry-run"],
        ["run", "configs/demo.yaml", f"output.path={demo_run.out}"],  # nothing to do: no Ray
        ["decode", "configs/demo.yaml", f"output.path={demo_run.out}", "--num-samples", "2", "--out",
         str(tmp_path / "report")],
    ]
    for args in commands:
        result = _run_into_closed_pipe(args)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, (args, result.stderr)


# -- nothing to do ---------------------------------------------------------------------------------

def test_rerun_of_a_complete_output_says_nothing_to_do_without_starting_ray(demo_run):
    files = sorted(p for p in demo_run.out.rglob("*") if p.is_file() and "decode" not in p.parts)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    result = subprocess.run([sys.executable, "-c", PROBE, "run", "configs/demo.yaml", f"output.path={demo_run.out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"all 4 shards already committed: nothing to do ({demo_run.out})"
    assert "RAY NOT IMPORTED" in result.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before  # the output untouched
