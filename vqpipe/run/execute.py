"""One run, start to end: the manifest marked running, the shards on Ray, the manifest's status and
totals, the summary table. A run with nothing pending never gets here (:func:`nothing_to_do`)."""

from __future__ import annotations

import logging
import time

from vqpipe import __version__
from vqpipe.config import RunConfig
from vqpipe.output.folder import sweep_leftovers, write_json
from vqpipe.output.layout import MANIFEST, failure_record
from vqpipe.output.retry import is_storage_full
from vqpipe.records import shard_failure
from vqpipe.run.manifest import read_manifest
from vqpipe.run.outcome import Outcome
from vqpipe.run.plan import Plan
from vqpipe.run.progress import Progress, summary_table
from vqpipe.run.shard_job import ShardSettings
from vqpipe.run.stop import StopRequest
from vqpipe.run.totals import output_totals

log = logging.getLogger(__name__)


def execute(config: RunConfig, plan: Plan, job: ShardSettings, fingerprint: dict) -> Outcome:
    """Run the plan on Ray with the manifest written before and after, print the summary."""
    # Imported here: Ray costs seconds to import and more to start, and a run with nothing pending
    # (see nothing_to_do) never needs it.
    from vqpipe.run.driver import run_on_ray

    started = time.time()
    manifest = {
        "vqpipe_version": __version__, "config": config.to_dict(), "model_config": job.metadata["model_config"],
        "weights_sha256": job.metadata["weights_sha256"], "fingerprint": fingerprint,
        "started_at": _iso(started), "status": "running",
    }
    stop = StopRequest()
    stop.install()  # from here on a signal ends the run through the bookkeeping below
    try:
        write_json(config, MANIFEST, manifest)
        sweep_leftovers(config)
        missing = record_missing(config, plan)
        with Progress(total=plan.total, already=len(plan.committed)) as progress:
            outcome = run_on_ray(config, plan, progress, stop)
            outcome.failed.update(missing)
            progress.update(outcome, force=True)
        _finish(config, manifest, outcome, plan, started)
    finally:
        stop.restore()
    return outcome


def _finish(config: RunConfig, manifest: dict, outcome: Outcome, plan: Plan, started: float) -> None:
    """The closing manifest and the summary."""
    wall = time.time() - started
    totals = output_totals(config, outcome, plan, wall, started)
    manifest.update(status=outcome.status, ended_at=_iso(time.time()), totals=totals)
    if outcome.fatal or outcome.interrupted:
        manifest["stopped_because"] = outcome.fatal or f"signal {outcome.interrupted}"
    _write_final(config, manifest, outcome)
    summary = summary_table(outcome, skipped=len(plan.committed), wall_s=wall, output=config.output.path,
                            startup_s=outcome.startup_s(started), min_code_agreement=config.model.min_code_agreement)
    print(summary, flush=True)  # flushed: a second Ctrl-C exits without flushing


def nothing_to_do(config: RunConfig, plan: Plan) -> str:
    """Every shard is committed: say so, without starting Ray. The output stays as it is, except a
    manifest left ``running`` by a driver killed after the last commit, which is marked complete."""
    previous = read_manifest(config)
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
        write_json(config, failure_record(stem), shard_failure(url, stem, 0, error))
        errors[stem] = error
    return errors


def _write_final(config: RunConfig, manifest: dict, outcome: Outcome) -> None:
    """The closing manifest. On a full disk there may be no room for the temp copy an atomic
    write needs: the manifest is then rewritten in place (the old one's blocks are reused), so it
    does not stay at ``running``. If even that fails the run ends as failed, without a traceback."""
    try:
        write_json(config, MANIFEST, manifest)
        return
    except OSError as err:
        if not is_storage_full(err):
            return _unwritten(outcome, err)
    try:
        write_json(config, MANIFEST, manifest, atomic=False)
    except OSError as err:
        _unwritten(outcome, err)


def _unwritten(outcome: Outcome, err: OSError) -> None:
    log.error("could not write %s: %s: %s", MANIFEST, type(err).__name__, err)
    outcome.fatal = outcome.fatal or f"could not write the manifest ({type(err).__name__}: {err})"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
