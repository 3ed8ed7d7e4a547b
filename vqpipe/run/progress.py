"""What a person sees while a run goes: a live progress bar on a TTY, the same bar as plain log lines
otherwise (Ray job logs are files: no carriage returns), and the final summary table."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vqpipe.encode.fidelity import summary_lines

if TYPE_CHECKING:
    from vqpipe.run.outcome import Outcome

log = logging.getLogger(__name__)

# A fixed-width bar, so log lines stay aligned and the postfix (images, rates) never truncates it.
# tqdm puts ", " before the postfix itself.
BAR_FORMAT = "shards {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"


class Progress:
    def __init__(self, total: int, already: int, stream=None, interval_s: float = 10.0):
        self.total, self.already = total, already
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s if not self.tty else 0.5
        self.started = time.time()
        self._last = 0.0
        self._shown: tuple = ()  # what the last line said: the final forced update repeats nothing
        self.bar = tqdm(total=total, initial=already, file=self.stream, bar_format=BAR_FORMAT,
                        dynamic_ncols=True) if self.tty else None
        self._redirect = None

    def __enter__(self) -> "Progress":
        # On a terminal, log lines (a worker ready, a retry) go above the bar instead of into it.
        if self.bar is not None:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
            self._redirect = None

    def update(self, outcome: "Outcome", force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval_s:
            return
        done = self.already + len(outcome.committed) + len(outcome.failed)
        state = (done, outcome.rows)
        if force and state == self._shown:
            return
        self._last, self._shown = now, state
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(status_text(outcome, now - self.started), refresh=False)
            self.bar.refresh()
        else:
            log.info("%s", tqdm.format_meter(done, self.total, now - self.started, ascii=True, initial=self.already,
                                             bar_format=BAR_FORMAT,
                                             postfix=status_text(outcome, now - self.started)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def status_text(outcome: "Outcome", elapsed_s: float) -> str:
    """Images, rate, bad samples, failed shards, and each worker's steady rate when there are several."""
    rows = outcome.rows
    parts = [f"{rows} images, {rows / max(elapsed_s, 1e-9):.1f} img/s",
             f"{sum(outcome.failures_by_reason().values())} bad samples"]
    filtered = sum(outcome.filtered_by_rule().values())
    if filtered:
        parts.append(f"{filtered} filtered")
    if outcome.failed:
        parts.append(f"{len(outcome.failed)} shards failed")
    rates = outcome.rates_by_worker()
    if len(rates) > 1:
        parts.append("per worker " + " ".join(f"w{i}:{r:.1f}" for i, r in enumerate(rates.values(), 1)) + " img/s")
    return " | ".join(parts)


def summary_table(outcome: "Outcome", skipped: int, wall_s: float, output: str, startup_s: float | None = None,
                  min_code_agreement: float = 0.0) -> str:
    rows = outcome.rows
    reasons = outcome.failures_by_reason()
    steady = outcome.steady_rate()
    lines = [
        ("shards committed", str(len(outcome.committed))),
        ("shards failed", str(len(outcome.failed))),
        ("shards skipped (already committed)", str(skipped)),
        ("samples written", str(rows)),
        ("samples failed", str(sum(reasons.values()))),
        *((f"  {reason}", str(n)) for reason, n in reasons.items()),
        *_filtered_lines(outcome.filtered_by_rule()),
        ("wall time", _duration(wall_s)),
        ("start-up (Ray, workers, model load)", _duration(startup_s) if startup_s is not None else "-"),
        ("images/s (wall clock)", f"{rows / wall_s:.1f}" if wall_s > 0 else "-"),
        ("images/s per worker (steady)", f"{steady:.1f}" if steady is not None else "-"),
        ("output", output),
    ]
    width = max(len(k) for k, _ in lines)
    out = [f"{k.ljust(width)}  {v}" for k, v in lines]
    if outcome.committed:
        out += summary_lines(outcome.fidelity(min_code_agreement))
    for stem, switches in outcome.precision_switches().items():
        out.append(f"precision fallback in {stem}: " + "; ".join(
            f"{s['from']} -> {s['to']} after {s['after_non_finite_batches']} NaN/Inf batches" for s in switches))
    for stem, error in sorted(outcome.failed.items()):
        out.append(f"FAILED {stem}: {error}")
    return "\n".join(out)


def _filtered_lines(rules) -> list[tuple[str, str]]:
    """``samples filtered`` and its rules (a rule is a metadata key or max_aspect_ratio); none if no filter hit."""
    if not rules:
        return []
    return [("samples filtered", str(sum(rules.values()))),
            *((f"  {rule}", str(n)) for rule, n in rules.items())]  # most frequent first


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
