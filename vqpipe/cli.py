"""``vqpipe`` command line: validates everything at the edge, then hands typed objects inward.

Exit status: 0 all shards committed; 1 some shards failed (or the misconfiguration guard
stopped the run, or workers could not start; for ``inspect`` and ``decode``: a file that does not
match its commit marker); 2 usage or config error, with nothing written and no Ray started;
130 / 143 stopped by SIGINT / SIGTERM (the manifest says ``interrupted``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys

from vqpipe import __version__
from vqpipe.config import ConfigError, RunConfig, load_config
from vqpipe.model.errors import CheckpointError
from vqpipe.output.layout import decode_dir

log = logging.getLogger("vqpipe")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a run stopped by a signal exits 128 + its number


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit, where a reader that left could no longer be answered
        return status
    except BrokenPipeError:
        # `vqpipe inspect OUT | head`: the reader left; say nothing more (a flush at exit would raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ConfigError, CheckpointError) as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the run started: nothing written yet
        print("vqpipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


DESCRIPTION = """\
Encode WebDataset image shards into VQ tokens (codes and latents) with a VQ tokenizer on Ray, one
Parquet file per shard, committed exactly once; then check the tokens and summarise the output."""

EPILOG = """\
the three commands, on the shipped demo (from the repository root):
  vqpipe run configs/demo.yaml                   encode the shards into out/demo/*.parquet
  vqpipe decode configs/demo.yaml --min-psnr 22  decode a sample of the tokens back to images and
                                                 check them (report: out/demo/_vqpipe/decode/)
  vqpipe inspect out/demo                        shards, failures, codebook usage, latent statistics

`vqpipe run --help-config` lists every config key; `vqpipe COMMAND --help` shows its options.
Exit status: 0 done, 1 some shards or checks failed, 2 usage or config error (nothing written)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples keep their line breaks, and every option shows its default: a flag's is "off", and
    an option without one says in its own help what happens when it is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return help_text
        if action.default is False:
            return f"{help_text} (default: off)"
        return f"{help_text} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqpipe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vqpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,decode,inspect,publish,bench}")
    _run_parser(sub)
    _decode_parser(sub)
    _inspect_parser(sub)
    _publish_parser(sub)
    from vqpipe.bench import cli as bench  # its parser and command live with the benchmark

    bench.add_parser(sub, formatter_class=_HelpFormatter)
    return parser


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="encode every shard of the config's input into token Parquet",
                         description="Encode every pending shard of the config's input into token Parquet.\n"
                                     "Committed shards are skipped, so running it again resumes.",
                         epilog="example: vqpipe run configs/demo.yaml model.batch_size=32",
                         formatter_class=_HelpFormatter)
    run.add_argument("config", nargs="?", help="YAML config (see configs/)")
    run.add_argument("--help-config", action="store_true",
                     help="print every config key with its type, default and meaning, and exit")
    run.add_argument("overrides", nargs="*", help="dotted overrides: model.batch_size=128 output.path=s3://b/x")
    run.add_argument("--dry-run", action="store_true", help="print the plan (shards, committed, model) and stop")
    run.add_argument("--limit-shards", type=int, metavar="N",
                     help="process only the first N pending shards (default: all)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard an existing output written with another model or preprocessing")
    run.set_defaults(func=cmd_run)


def _decode_parser(sub) -> None:
    decode = sub.add_parser("decode", help="decode stored tokens back to images and check them (PSNR, schema, "
                                           "consistency, lineage)",
                            description="Decode a random sample of the stored tokens back to images, next to the\n"
                                        "originals, and check PSNR, schema, consistency and lineage.",
                            epilog="example: vqpipe decode configs/demo.yaml --min-psnr 22",
                            formatter_class=_HelpFormatter)
    decode.add_argument("config", help="the run's YAML config")
    decode.add_argument("overrides", nargs="*", help="dotted overrides, as for run")
    decode.add_argument("--num-samples", type=int, default=64, metavar="N",
                        help="rows to decode, drawn at random over the whole output")
    decode.add_argument("--seed", type=int, default=0, help="seed of the random draw (same seed, same rows)")
    decode.add_argument("--out", help="report folder, any fsspec URL (default: {output.path}/_vqpipe/decode/)")
    decode.add_argument("--min-psnr", type=float, metavar="DB",
                        help="fail (exit 1) when the mean PSNR is below this, in dB (default: no floor)")
    decode.set_defaults(func=cmd_decode)


def _inspect_parser(sub) -> None:
    inspect = sub.add_parser("inspect", help="summarise an output folder: shards, failures, codebook usage, "
                                             "latent statistics",
                             epilog="example: vqpipe inspect out/demo", formatter_class=_HelpFormatter)
    inspect.add_argument("output", help="output folder, local or fsspec URL")
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")
    inspect.add_argument("--verify", action="store_true",
                         help="also check every data file's sha256 against its commit marker (reads every byte)")
    inspect.add_argument("--storage-options", default="{}", metavar="JSON",
                         help='fsspec options for reading the output, as JSON: \'{"anon": true}\'')
    inspect.set_defaults(func=cmd_inspect)


def _publish_parser(sub) -> None:
    publish = sub.add_parser("publish", help="write a dataset card into a finished output and upload it to a "
                                             "Hugging Face Hub dataset repo",
                             epilog="example: vqpipe publish out/demo my-org/demo-tokens --dry-run",
                             formatter_class=_HelpFormatter)
    publish.add_argument("output", help="local output folder of a finished `vqpipe run`")
    publish.add_argument("repo_id", help="dataset repo, ORG/NAME (created if missing)")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--revision", help="branch to upload to, created if missing (default: main)")
    publish.add_argument("--dry-run", action="store_true", help="write and print the card and the files it would "
                                                                "send, with sizes; send nothing")
    publish.add_argument("--allow-partial", action="store_true", help="publish an output that is not complete")
    publish.set_defaults(func=cmd_publish)


def cmd_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(_config_help())
        return EXIT_OK
    if args.config is None:
        raise ConfigError("vqpipe run needs a config file: vqpipe run CONFIG.yaml (see configs/)")
    if args.limit_shards is not None and args.limit_shards < 1:
        raise ConfigError("--limit-shards must be >= 1")
    from vqpipe.output.folder import ensure_writable
    from vqpipe.run import manifest
    from vqpipe.run.plan import make_plan

    config = load_config(args.config, args.overrides)
    job, fingerprint = _settings(config)
    plan = make_plan(config, args.limit_shards)
    conflicts = manifest.incompatibilities(manifest.recorded(config, plan.audit), fingerprint)
    if conflicts and not args.overwrite and not args.dry_run:
        raise ConfigError(f"{config.output.path} holds tokens from another model or preprocessing "
                          f"({'; '.join(conflicts)}); use another output.path, or --overwrite to discard them")
    if args.dry_run:
        print(_plan_text(config, plan, job, conflicts))
        return EXIT_OK
    ensure_writable(config)  # before anything is written or Ray starts
    with _output_lease(config):
        return _run_leased(config, args, plan, job, fingerprint, conflicts)


def _settings(config: RunConfig):
    """The shard settings for the config's model, and the fingerprint they give the output."""
    from vqpipe.encode.precision import resolve_for
    from vqpipe.run import manifest
    from vqpipe.run.shard_job import make_settings

    model = _load_model(config)
    precision = resolve_for(config.model.precision, _device_hint(), model.config.force_upcast)
    job = make_settings(config.input, config.preprocess, config.output, model, precision, config.model.audit_samples)
    return job, manifest.fingerprint(job.metadata, config)


def _run_leased(config: RunConfig, args: argparse.Namespace, plan, job, fingerprint: dict, conflicts) -> int:
    """What the run does once it holds the output's lease: overwrite, repair, then run or say
    there is nothing to do."""
    from vqpipe.output.folder import remove_output, repair
    from vqpipe.run.execute import execute, nothing_to_do
    from vqpipe.run.plan import make_plan

    if conflicts:
        remove_output(config)
        plan = make_plan(config, args.limit_shards)
    _report_damage(plan)
    repair(config, plan.audit, set(plan.stems.values()))
    if not plan.pending and not plan.missing:
        print(nothing_to_do(config, plan))
        return EXIT_OK
    return _exit_status(execute(config, plan, job, fingerprint))


def _exit_status(outcome) -> int:
    if outcome.interrupted:
        print(f"vqpipe: interrupted by {signal.Signals(outcome.interrupted).name}; run again to resume",
              file=sys.stderr)
        return 128 + outcome.interrupted
    if outcome.fatal:
        print(f"vqpipe: error: {outcome.fatal}", file=sys.stderr)
        return EXIT_FAILED
    if outcome.aborted:
        print(f"vqpipe: {outcome.aborted}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if outcome.failed else EXIT_OK


def _report_damage(plan) -> None:
    """Every committed shard whose files do not hold, and every unreadable marker, by name."""
    for stem, why in plan.redo.items():
        log.warning("committed shard %s is damaged: %s: redoing it", stem, why)
    for stem, why in plan.audit.problems.items():
        if stem not in plan.redo:
            log.warning("committed shard %s (not in this run's input) is damaged: %s", stem, why)
    for path, why in plan.audit.unreadable.items():
        log.warning("commit marker %s is unreadable (%s): treated as absent", path, why)
    if plan.missing:
        log.warning("%d of %d input shards do not exist (first: %s): recorded as missing_shard failures",
                    len(plan.missing), plan.total, ", ".join(plan.missing[:3]))
@contextlib.contextmanager
def _output_lease(config: RunConfig):
    """The output folder's lease for the block, or a usage error (exit 2, before Ray) while
    another run holds it."""
    from vqpipe.output.lease import Lease, OutputBusy

    lease = Lease(config)
    try:
        lease.acquire()
    except OutputBusy as err:
        raise ConfigError(f"output.path {config.output.path}: {err}") from None
    try:
        yield lease
    finally:
        lease.release()


def cmd_decode(args: argparse.Namespace) -> int:
    from vqpipe.read.tokens import NotTokenOutput
    from vqpipe.read.decode_job import run_decode

    if args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    config = load_config(args.config, args.overrides)
    model = _load_model(config)  # a bad model path is a usage error, reported before any work
    try:
        report = run_decode(config, args.num_samples, args.seed, args.out, args.min_psnr, model=model,
                            reconstruct=_cluster_decoder(config))
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(f"output.path {config.output.path!r}: {err}") from None
    for check in report.checks:
        print(f"{'ok    ' if check.ok else 'FAILED'} {check.name}: {check.figure}")
    if report.run_failures is not None:
        print(f"not encoded by the run: {report.run_failures.summary()}")
    out = args.out or decode_dir(config.output.path)
    print(f"report: {out}/report.html")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from vqpipe.read.tokens import NotTokenOutput
    from vqpipe.read.inspect import format_text, inspect_output

    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--storage-options is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-options must be a JSON object, got {args.storage_options!r}")
    try:
        stats = inspect_output(args.output, options, verify=args.verify)
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(str(err)) from None
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_text(stats))
    for problem in stats.problems:
        print(f"vqpipe: {problem}", file=sys.stderr)
    return EXIT_FAILED if stats.problems else EXIT_OK


def _cluster_decoder(config: RunConfig):
    """The decoder pass on a GPU worker when the config names a cluster (Ray is imported only then)."""
    if not (config.ray.address or os.environ.get("RAY_ADDRESS")):
        return None
    from vqpipe.run.driver import gpu_reconstruct

    return gpu_reconstruct(config)


def _config_help() -> str:
    from vqpipe.config import config_reference

    lines = []
    for key, type_name, default, doc in config_reference():
        lines.append(f"{key}: {type_name} = {default}")
        lines.append(f"    {doc}" if doc else "    (undocumented)")
    return "\n".join(lines)


def cmd_publish(args: argparse.Namespace) -> int:
    from vqpipe.publish.upload import NotPublishable, command

    try:
        return command(args.output, args.repo_id, args.private, args.revision, args.dry_run, args.allow_partial)
    except NotPublishable as err:
        raise ConfigError(str(err)) from None


def _load_model(config: RunConfig):
    from vqpipe.model.loading import load_model

    try:
        return load_model(config.model)
    except (OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise ConfigError(f"model.path: {err}") from None
        raise ConfigError(f"model.path {config.model.path!r} cannot be read: {err}") from None


def _device_hint() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _plan_text(config: RunConfig, plan, job, conflicts: list[str]) -> str:
    meta = job.metadata
    lines = {
        "shards": plan.total, "committed": len(plan.committed), "pending (this run)": len(plan.pending),
        "first pending": plan.pending[:3], "missing inputs": len(plan.missing),
        "non-tar files passed over by globs": plan.passed_over,
        "damaged (redone)": [f"{s}: {why}" for s, why in plan.redo.items()] or "none",
        "unreadable markers (treated as absent)": list(plan.audit.unreadable) or "none", "model": config.model.path, "weights_sha256": meta["weights_sha256"],
        "codebook": meta["num_vq_embeddings"], "token grid": "x".join(map(str, meta["codes_shape"])),
        "latent shape": meta["latent_shape"], "precision": meta["precision"], "output": config.output.path,
        "conflicts with existing output": conflicts or "none",
    }
    return "\n".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in lines.items())


if __name__ == "__main__":
    sys.exit(main())
