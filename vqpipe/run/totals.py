"""The manifest's ``totals``: the whole output folder's figures, with this run's part under
``this_run`` (a second run adds to what the first wrote; it does not reset it)."""

from __future__ import annotations

from vqpipe.config import RunConfig
from vqpipe.records import sum_reasons
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan

STAGES = ("read_s", "decode_s", "encode_s", "audit_s", "write_s", "wait_s")


def run_totals(outcome: Outcome, plan: Plan, wall: float, started: float, min_code_agreement: float) -> dict:
    """This run's figures."""
    rows = outcome.rows
    stages = {k: round(sum(getattr(r.times, k) for r in outcome.committed.values()), 3) for k in STAGES}
    return {
        "shards": plan.total, "shards_committed": len(outcome.committed), "shards_failed": len(outcome.failed),
        "shards_skipped": len(plan.committed), "samples_written": rows,
        "samples_failed_by_reason": outcome.failures_by_reason(),
        "samples_filtered_by_rule": outcome.filtered_by_rule(), "wall_s": round(wall, 3),
        "images_per_s": round(rows / wall, 2) if wall else None, "startup_s": _rounded(outcome.startup_s(started)),
        "steady_images_per_s_per_worker": _rounded(outcome.steady_rate()), "failed_shards": outcome.failed,
        "stage_times_s": stages, "fidelity": outcome.fidelity(min_code_agreement),
        "precision_switches": outcome.precision_switches(),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def output_totals(config: RunConfig, outcome: Outcome, plan: Plan, wall: float,
                  started: float) -> dict:
    """The whole output's figures after this run, this run's under ``this_run`` (start-up, rates,
    stage times and the fidelity audits are this run's only)."""
    this_run = run_totals(outcome, plan, wall, started, config.model.min_code_agreement)
    before_rows, before_reasons, before_filtered = _committed_before(plan)
    reasons = sum_reasons([before_reasons, this_run["samples_failed_by_reason"]])
    filtered = sum_reasons([before_filtered, this_run["samples_filtered_by_rule"]])
    failed = (plan.failed_before - set(outcome.committed)) | set(outcome.failed)
    return {
        "shards": plan.total, "shards_committed": len(plan.committed) + len(outcome.committed),
        "shards_failed": len(failed), "shards_skipped": len(plan.committed),
        "samples_written": before_rows + this_run["samples_written"], "samples_failed_by_reason": reasons,
        "samples_filtered_by_rule": filtered,
        "failed_shards": outcome.failed, "stage_times_s": this_run["stage_times_s"],
        **{k: this_run[k] for k in ("wall_s", "images_per_s", "startup_s", "steady_images_per_s_per_worker",
                                    "fidelity", "precision_switches")},
        "this_run": this_run,
    }


def _committed_before(plan: Plan) -> tuple[int, dict[str, int], dict[str, int]]:
    """Rows, failures and filtered samples of the shards committed before this run, from the
    markers planning already read (no request per shard)."""
    markers = [plan.audit.marker_of[s] for s in sorted(plan.committed) if s in plan.audit.marker_of]
    return (sum(int(m.get("rows", 0)) for m in markers),
            sum_reasons(m.get("failures_by_reason", {}) for m in markers),
            sum_reasons(m.get("filtered_by_rule", {}) for m in markers))
