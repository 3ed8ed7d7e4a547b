"""``vqpipe`` command line: validates everything at the edge, then hands typed objects inward.

Exit status: 0 all shards committed; 1 some shards failed (or the misconfiguration guard
stopped the run); 2 usage or config error, with nothing written and no Ray started.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from vqpipe import __version__
from vqpipe.config import ConfigError, RunConfig, load_config
from vqpipe.model import CheckpointError

log = logging.getLogger("vqpipe")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vqpipe {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="encode every shard of the config's input into token Parquet")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted overrides: model.batch_size=128 output.path=s3://b/x")
    run.add_argument("--dry-run", action="store_true", help="print the plan (shards, committed, model) and stop")
    run.add_argument("--limit-shards", type=int, metavar="N", help="process only the first N pending shards")
    run.add_argument("--overwrite", action="store_true",
                     help="discard an existing output written with another model or preprocessing")
    run.set_defaults(func=cmd_run)
    decode = sub.add_parser("decode", help="decode stored tokens back to images and check them (PSNR, schema, "
                                           "consistency, lineage)")
    decode.add_argument("config", help="the run's YAML config")
    decode.add_argument("overrides", nargs="*", help="dotted overrides, as for run")
    decode.add_argument("--num-samples", type=int, default=64, metavar="N")
    decode.add_argument("--seed", type=int, default=0)
    decode.add_argument("--out", help="report folder (default {output.path}/_vqpipe/decode/), any fsspec URL")
    decode.add_argument("--min-psnr", type=float, help="fail (exit 1) when the mean PSNR is below this, in dB")
    decode.set_defaults(func=cmd_decode)
    inspect = sub.add_parser("inspect", help="summarise an output folder: shards, failures, codebook usage, "
                                             "latent statistics")
    inspect.add_argument("output", help="output folder, local or fsspec URL")
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")
    inspect.add_argument("--storage-options", default="{}", metavar="JSON",
                         help='fsspec options for reading the output, as JSON: \'{"anon": true}\'')
    inspect.set_defaults(func=cmd_inspect)
    publish = sub.add_parser("publish", help="write a dataset card into a finished output and upload it to a "
                                             "Hugging Face Hub dataset repo")
    publish.add_argument("output", help="local output folder of a finished `vqpipe run`")
    publish.add_argument("repo_id", help="dataset repo, ORG/NAME (created if missing)")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--revision", help="branch to upload to (created if missing); default main")
    publish.add_argument("--dry-run", action="store_true", help="write and print the card and the files it would "
                                                                "send, with sizes; send nothing")
    publish.add_argument("--allow-partial", action="store_true", help="publish an output that is not complete")
    publish.set_defaults(func=cmd_publish)
    from vqpipe import bench  # its parser and command live with the benchmark

    bench.add_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from vqpipe import plan as planning
    from vqpipe.shard_job import make_job

    if args.limit_shards is not None and args.limit_shards < 1:
        raise ConfigError("--limit-shards must be >= 1")
    config = load_config(args.config, args.overrides)
    model = _load_model(config)
    precision = str(model.autocast_dtype(config.model.precision, _device_hint()) or "fp32").replace("torch.", "")
    job = make_job(config.input, config.preprocess, config.output, model, precision)
    fingerprint = planning.fingerprint(job.metadata, config)
    plan = planning.make_plan(config, args.limit_shards)
    conflicts = planning.incompatibilities(planning.read_manifest(config), fingerprint)
    if conflicts and not args.overwrite and not args.dry_run:
        raise ConfigError(f"{config.output.path} holds tokens from another model or preprocessing "
                          f"({'; '.join(conflicts)}); use another output.path, or --overwrite to discard them")
    if args.dry_run:
        print(_plan_text(config, plan, job, conflicts))
        return EXIT_OK
    if conflicts:
        planning.remove_output(config)
        plan = planning.make_plan(config, args.limit_shards)
    return _execute(config, plan, job, fingerprint)


def cmd_decode(args: argparse.Namespace) -> int:
    from vqpipe.io import NotTokenOutput
    from vqpipe.verify import run_decode

    if args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    config = load_config(args.config, args.overrides)
    model = _load_model(config)  # a bad model path is a usage error, reported before any work
    try:
        report = run_decode(config, args.num_samples, args.seed, args.out, args.min_psnr, model=model)
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(f"output.path {config.output.path!r}: {err}") from None
    for check in report.checks:
        print(f"{'ok    ' if check.ok else 'FAILED'} {check.name}: {check.figure}")
    out = args.out or f"{config.output.path}/_vqpipe/decode"
    print(f"report: {out}/report.html")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from vqpipe.io import NotTokenOutput
    from vqpipe.stats import format_text, inspect_output

    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--storage-options is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-options must be a JSON object, got {args.storage_options!r}")
    try:
        stats = inspect_output(args.output, options)
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(str(err)) from None
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_text(stats))
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from vqpipe.publish import NotPublishable, command

    try:
        return command(args.output, args.repo_id, args.private, args.revision, args.dry_run, args.allow_partial)
    except NotPublishable as err:
        raise ConfigError(str(err)) from None


def _load_model(config: RunConfig):
    from vqpipe.encode import load_model

    try:
        return load_model(config.model)
    except (OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise ConfigError(f"model.path: {err}") from None
        raise ConfigError(f"model.path {config.model.path!r} cannot be read: {err}") from None


def _device_hint() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _execute(config: RunConfig, plan, job, fingerprint: dict) -> int:
    from vqpipe import plan as planning
    from vqpipe.driver import run_on_ray
    from vqpipe.progress import Progress, summary_table

    started = time.time()
    manifest = {
        "vqpipe_version": __version__, "config": config.to_dict(), "model_config": job.metadata["model_config"],
        "weights_sha256": job.metadata["weights_sha256"], "fingerprint": fingerprint,
        "started_at": _iso(started), "status": "running",
    }
    planning.write_json(config, planning.MANIFEST, manifest)
    planning.sweep_leftovers(config)
    progress = Progress(total=plan.total, already=len(plan.committed))
    outcome = run_on_ray(config, plan, progress)
    progress.update(outcome, force=True)
    progress.close()
    wall = time.time() - started
    manifest.update(status="aborted" if outcome.aborted else ("failed" if outcome.failed else "complete"),
                    ended_at=_iso(time.time()), totals=_totals(outcome, plan, wall))
    planning.write_json(config, planning.MANIFEST, manifest)
    print(summary_table(outcome, skipped=len(plan.committed), wall_s=wall, output=config.output.path))
    if outcome.aborted:
        print(f"vqpipe: {outcome.aborted}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if outcome.failed else EXIT_OK


def _totals(outcome, plan, wall: float) -> dict:
    reasons: dict[str, int] = {}
    for result in outcome.committed.values():
        for reason, n in result.failures_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
    rows = sum(r.rows for r in outcome.committed.values())
    stages = {k: round(sum(getattr(r.times, k) for r in outcome.committed.values()), 3)
              for k in ("read_s", "decode_s", "encode_s", "write_s", "wait_s")}
    return {
        "shards": plan.total, "shards_committed": len(outcome.committed), "shards_failed": len(outcome.failed),
        "shards_skipped": len(plan.committed), "samples_written": rows, "samples_failed_by_reason": reasons,
        "wall_s": round(wall, 3), "images_per_s": round(rows / wall, 2) if wall else None,
        "failed_shards": outcome.failed, "stage_times_s": stages,
    }


def _plan_text(config: RunConfig, plan, job, conflicts: list[str]) -> str:
    meta = job.metadata
    lines = {
        "shards": plan.total, "committed": len(plan.committed), "pending (this run)": len(plan.pending),
        "first pending": plan.pending[:3], "model": config.model.path, "weights_sha256": meta["weights_sha256"],
        "codebook": meta["num_vq_embeddings"], "token grid": "x".join(map(str, meta["codes_shape"])),
        "latent shape": meta["latent_shape"], "precision": meta["precision"], "output": config.output.path,
        "conflicts with existing output": conflicts or "none",
    }
    return "\n".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in lines.items())


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


if __name__ == "__main__":
    sys.exit(main())
