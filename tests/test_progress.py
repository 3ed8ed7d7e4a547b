"""The live progress bar (TTY and log mode) and the summary's speed figures, from real results."""

from __future__ import annotations

import io
import logging
import re
import sys

from vqpipe.run.outcome import Outcome
from vqpipe.run.progress import Progress, status_text, summary_table
from vqpipe.run.shard_job import ShardResult, StageTimes

RUN_STARTED = 1_000_000.0


def _result(stem: str, rows: int, busy_s: float, worker: str, started_after_s: float) -> ShardResult:
    return ShardResult(f"in/{stem}.tar", stem, True, rows, [], StageTimes(total_s=busy_s),
                       failures_by_reason={"no_image": 1}, worker=worker, started_at=RUN_STARTED + started_after_s)


def _outcome(*results: ShardResult) -> Outcome:
    return Outcome(committed={r.stem: r for r in results})


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_reports_start_up_and_steady_rate_apart_from_the_wall_clock_rate():
    # 14 images in 2 s of worker time, after 25 s of start-up, in a 28 s run: what the demo looks like.
    outcome = _outcome(_result("a", 8, 1.0, "h:1", 25.0), _result("b", 6, 1.0, "h:1", 26.0))
    text = summary_table(outcome, skipped=0, wall_s=28.0, output="out/demo", startup_s=outcome.startup_s(RUN_STARTED))
    table = text.split("\nfidelity audit")[0]  # the key-value table; the audit's own lines follow it
    lines = dict(line.rsplit("  ", 1) for line in table.splitlines())
    figures = {k.strip(): v.strip() for k, v in lines.items()}
    assert figures["start-up (Ray, workers, model load)"] == "0m25s"
    assert figures["images/s (wall clock)"] == "0.5"
    assert figures["images/s per worker (steady)"] == "7.0"


def test_per_worker_rates_only_when_there_are_several_workers():
    one = _outcome(_result("a", 8, 2.0, "h:1", 1.0), _result("b", 4, 2.0, "h:1", 3.0))
    two = _outcome(_result("a", 8, 2.0, "h:1", 1.0), _result("b", 3, 1.0, "h:2", 1.0))
    assert "per worker" not in status_text(one, 10.0)
    assert "per worker w1:4.0 w2:3.0 img/s" in status_text(two, 10.0)
    assert "11 images, 1.1 img/s | 2 bad samples" in status_text(two, 10.0)


def test_log_mode_writes_the_bar_as_plain_lines(caplog):
    stream = io.StringIO()  # not a TTY: a Ray job log
    progress = Progress(total=4, already=1, stream=stream)
    with caplog.at_level(logging.INFO, logger="vqpipe.run.progress"):
        progress.update(_outcome(_result("a", 8, 2.0, "h:1", 1.0)), force=True)
    progress.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("shards  50%|##########          | 2/4 [") and "8 images" in line
    assert "\r" not in line and stream.getvalue() == ""


def test_terminal_mode_draws_a_live_bar():
    stream = _Terminal()
    progress = Progress(total=4, already=0, stream=stream)
    progress.update(_outcome(_result("a", 8, 2.0, "h:1", 1.0), _result("b", 3, 1.0, "h:2", 1.0)), force=True)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "2/4" in text and "per worker w1:4.0 w2:3.0 img/s" in text


def test_terminal_mode_puts_log_lines_above_the_bar(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)  # the console, as logging.basicConfig sets it up
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.root.addHandler(handler)
    try:
        with Progress(total=2, already=0, stream=stream) as progress:
            progress.update(_outcome(_result("a", 8, 2.0, "h:1", 1.0)), force=True)
            logging.getLogger("vqpipe.run.driver").warning("worker 1 ready")
    finally:
        logging.root.removeHandler(handler)
    text = stream.getvalue()
    # The bar is cleared, the line written on its own, the bar drawn again below it.
    assert re.search(r"\r *\rworker 1 ready\n.*shards  50%", text, flags=re.S), repr(text)
