"""The manifest's ``totals``: the whole output folder's figures, with this run's part under
``this_run`` (a second run adds to what the first wrote; it does not reset it)."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

from vqpipe.config import RunConfig
from vqpipe.output.sink import read_marker
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan

STAGES = ("read_s", "decode_s", "encode_s", "write_s", "wait_s")


def run_totals(outcome: Outcome, plan: Plan, wall: float) -> dict:
    """This run's figures."""
    rows = outcome.rows
    stages = {k: round(sum(getattr(r.times, k) for r in outcome.committed.values()), 3) for k in STAGES}
    return {
        "shards": plan.total, "shards_committed": len(outcome.committed), "shards_failed": len(outcome.failed),
        "shards_skipped": len(plan.committed), "samples_written": rows,
        "samples_failed_by_reason": dict(outcome.failures_by_reason()), "wall_s": round(wall, 3),
        "images_per_s": round(rows / wall, 2) if wall else None, "failed_shards": outcome.failed,
        "stage_times_s": stages,
    }


def output_totals(config: RunConfig, previous: dict | None, outcome: Outcome, plan: Plan, wall: float) -> dict:
    """The whole output's figures after this run, this run's under ``this_run``."""
    this_run = run_totals(outcome, plan, wall)
    before_rows, before_reasons = _committed_before(config, previous, plan)
    reasons = collections.Counter(before_reasons)
    reasons.update(this_run["samples_failed_by_reason"])
    failed = (plan.failed_before - set(outcome.committed)) | set(outcome.failed)
    return {
        "shards": plan.total, "shards_committed": len(plan.committed) + len(outcome.committed),
        "shards_failed": len(failed), "shards_skipped": len(plan.committed),
        "samples_written": before_rows + this_run["samples_written"], "samples_failed_by_reason": dict(reasons),
        "failed_shards": outcome.failed, "stage_times_s": this_run["stage_times_s"], "this_run": this_run,
    }


def _committed_before(config: RunConfig, previous: dict | None, plan: Plan) -> tuple[int, dict]:
    """Rows and failures of the shards committed before this run: the last manifest's whole-output
    figures when they account for exactly those shards, else read from their markers (after a
    run that was killed before it could write its totals)."""
    if not plan.committed:
        return 0, {}
    totals = (previous or {}).get("totals") or {}
    if "this_run" in totals and totals.get("shards_committed") == len(plan.committed):
        return totals["samples_written"], totals.get("samples_failed_by_reason", {})
    with ThreadPoolExecutor(16, thread_name_prefix="vqpipe-markers") as pool:
        markers = list(pool.map(lambda s: read_marker(config.output.path, s, config.output.storage_options),
                                sorted(plan.committed)))
    reasons: collections.Counter = collections.Counter()
    for marker in filter(None, markers):
        reasons.update(marker.get("failures_by_reason", {}))
    return sum(m.get("rows", 0) for m in markers if m), dict(reasons)
