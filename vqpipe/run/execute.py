"""One run, start to end: the manifest marked running, the shards on Ray, the manifest's status and
totals, the summary table."""

from __future__ import annotations

import time

from vqpipe import __version__
from vqpipe.config import RunConfig
from vqpipe.output.folder import sweep_leftovers, write_json
from vqpipe.output.layout import MANIFEST, failure_record
from vqpipe.run.driver import run_on_ray
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
    missing = record_missing(config, plan)
    progress = Progress(total=plan.total, already=len(plan.committed))
    outcome = run_on_ray(config, plan, progress)
    outcome.failed.update(missing)
    progress.update(outcome, force=True)
    progress.close()
    wall = time.time() - started
    manifest.update(status="aborted" if outcome.aborted else ("failed" if outcome.failed else "complete"),
                    ended_at=_iso(time.time()), totals=_totals(outcome, plan, wall))
    write_json(config, MANIFEST, manifest)
    print(summary_table(outcome, skipped=len(plan.committed), wall_s=wall, output=config.output.path))
    return outcome


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


def _totals(outcome: Outcome, plan: Plan, wall: float) -> dict:
    reasons = dict(outcome.failures_by_reason())
    rows = outcome.rows
    stages = {k: round(sum(getattr(r.times, k) for r in outcome.committed.values()), 3)
              for k in ("read_s", "decode_s", "encode_s", "write_s", "wait_s")}
    return {
        "shards": plan.total, "shards_committed": len(outcome.committed), "shards_failed": len(outcome.failed),
        "shards_skipped": len(plan.committed), "samples_written": rows, "samples_failed_by_reason": reasons,
        "wall_s": round(wall, 3), "images_per_s": round(rows / wall, 2) if wall else None,
        "failed_shards": outcome.failed, "stage_times_s": stages,
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
