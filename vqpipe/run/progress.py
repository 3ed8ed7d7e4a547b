"""What a person sees while a run goes: a live line on a TTY, quiet parseable log lines otherwise,
and the final summary table."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vqpipe.run.outcome import Outcome

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, already: int, stream=None, interval_s: float = 10.0):
        self.total, self.already = total, already
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s if not self.tty else 0.5
        self.started = time.time()
        self._last = 0.0

    def update(self, outcome: "Outcome", force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        done = len(outcome.committed)
        rows = outcome.rows
        failed_samples = sum(outcome.failures_by_reason().values())
        elapsed = max(now - self.started, 1e-9)
        rate = rows / elapsed
        todo = self.total - self.already
        eta = (todo - done - len(outcome.failed)) * elapsed / done if done else float("nan")
        filtered = sum(outcome.filtered_by_rule().values())
        text = (f"shards {self.already + done}/{self.total} ({len(outcome.failed)} failed) | {rows} images "
                f"{rate:.1f} img/s | {failed_samples} bad samples" + (f" | {filtered} filtered" if filtered else "")
                + f" | ETA {_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + text.ljust(100))
            self.stream.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def summary_table(outcome: "Outcome", skipped: int, wall_s: float, output: str) -> str:
    rows = outcome.rows
    reasons = outcome.failures_by_reason()
    lines = [
        ("shards committed", str(len(outcome.committed))),
        ("shards failed", str(len(outcome.failed))),
        ("shards skipped (already committed)", str(skipped)),
        ("samples written", str(rows)),
        ("samples failed", str(sum(reasons.values()))),
        *((f"  {reason}", str(n)) for reason, n in reasons.most_common()),
        *_filtered_lines(outcome.filtered_by_rule()),
        ("wall time", _duration(wall_s)),
        ("images/s", f"{rows / wall_s:.1f}" if wall_s > 0 else "-"),
        ("output", output),
    ]
    width = max(len(k) for k, _ in lines)
    out = [f"{k.ljust(width)}  {v}" for k, v in lines]
    for stem, error in sorted(outcome.failed.items()):
        out.append(f"FAILED {stem}: {error}")
    return "\n".join(out)


def _filtered_lines(rules) -> list[tuple[str, str]]:
    """``samples filtered`` and its rules (a rule is a metadata key or max_aspect_ratio); none if no filter hit."""
    if not rules:
        return []
    return [("samples filtered", str(sum(rules.values()))),
            *((f"  {rule}", str(n)) for rule, n in rules.most_common())]


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
