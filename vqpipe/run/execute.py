"""One run, start to end: the manifest marked running, the shards on Ray, the manifest's status and
totals, the summary table."""

from __future__ import annotations

import time

from vqpipe import __version__
from vqpipe.config import RunConfig
from vqpipe.output.folder import sweep_leftovers, write_json
from vqpipe.output.layout import MANIFEST, failure_record
from vqpipe.run import manifest as run_manifest
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan
from vqpipe.run.progress import Progress, summary_table
from vqpipe.run.shard_job import ShardSettings


def execute(config: RunConfig, plan: Plan, job: ShardSettings, fingerprint: dict) -> Outcome:
    """Run the plan on Ray with the manifest written before and after, print the summary."""
    started = time.time()
    manifest = {
        "vqpipe_version": __version__, "config": config.to_dict(), "model_config": job.metadata["model_config"],
        "weights_sha256": job.metadata["weights_sha256"], "fingerprint": fingerprint,
        "started_at": _iso(started), "status": "running",
    }
    write_json(config, MANIFEST, manifest)
    sweep_leftovers(config)
    # Imported here: Ray costs seconds to import and more to start, and a run with nothing pending
    # (see nothing_to_do) never needs it.
    from vqpipe.run.driver import run_on_ray

    missing = record_missing(config, plan)
    with Progress(total=plan.total, already=len(plan.committed)) as progress:
        outcome = run_on_ray(config, plan, progress)
        outcome.failed.update(missing)
        progress.update(outcome, force=True)
    wall = time.time() - started
    manifest.update(status="aborted" if outcome.aborted else ("failed" if outcome.failed else "complete"),
                    ended_at=_iso(time.time()),
                    totals=_totals(outcome, plan, wall, started, config.model.min_code_agreement))
    write_json(config, MANIFEST, manifest)
    print(summary_table(outcome, skipped=len(plan.committed), wall_s=wall, output=config.output.path,
                        startup_s=outcome.startup_s(started), min_code_agreement=config.model.min_code_agreement))
    return outcome


def nothing_to_do(config: RunConfig, plan: Plan) -> str:
    """Every shard is committed: say so, without starting Ray. The output stays as it is, except a
    manifest left ``running`` by a driver killed after the last commit, which is marked complete."""
    previous = run_manifest.read_manifest(config)
    if previous is not None and previous.get("status") != "complete":
        previous.update(status="complete", ended_at=_iso(time.time()))
        write_json(config, MANIFEST, previous)
    return f"all {plan.total} shards already committed: nothing to do ({config.output.path})"


def record_missing(config: RunConfig, plan: Plan) -> dict[str, str]:
    """A ``missing_shard`` failure record for every input shard planning found absent, at once (no
    worker is sent to find out); stem -> error."""
    errors = {}
    for url in plan.missing:
        stem, error = plan.stems[url], f"ShardError: missing_shard: {url} does not exist"
        write_json(config, failure_record(stem), {"source": url, "stem": stem, "attempts": 0, "error": error,
                                                  "failed_at": _iso(time.time())})
        errors[stem] = error
    return errors


def _totals(outcome: Outcome, plan: Plan, wall: float, started: float, min_code_agreement: float) -> dict:
    reasons = outcome.failures_by_reason()
    rows = outcome.rows
    stages = {k: round(sum(getattr(r.times, k) for r in outcome.committed.values()), 3)
              for k in ("read_s", "decode_s", "encode_s", "audit_s", "write_s", "wait_s")}
    return {
        "shards": plan.total, "shards_committed": len(outcome.committed), "shards_failed": len(outcome.failed),
        "shards_skipped": len(plan.committed), "samples_written": rows, "samples_failed_by_reason": reasons,
        "samples_filtered_by_rule": dict(outcome.filtered_by_rule()),
        "wall_s": round(wall, 3), "images_per_s": round(rows / wall, 2) if wall else None,
        "startup_s": _rounded(outcome.startup_s(started)), "steady_images_per_s_per_worker": _rounded(
            outcome.steady_rate()), "failed_shards": outcome.failed, "stage_times_s": stages,
        "fidelity": outcome.fidelity(min_code_agreement), "precision_switches": outcome.precision_switches(),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
