"""``vqpipe`` command line: validates everything at the edge, then hands typed objects inward.

Exit status: 0 all shards committed; 1 some shards failed (or the misconfiguration guard
stopped the run, or workers could not start); 2 usage or config error, with nothing written and
no Ray started; 130 / 143 stopped by SIGINT / SIGTERM (the manifest says ``interrupted``).
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
        return args.func(args)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vqpipe {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="encode every shard of the config's input into token Parquet")
    run.add_argument("config", nargs="?", help="YAML config (see configs/)")
    run.add_argument("--help-config", action="store_true",
                     help="print every config key with its type, default and meaning, and exit")
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
    from vqpipe.bench import cli as bench  # its parser and command live with the benchmark

    bench.add_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(_config_help())
        return EXIT_OK
    if args.config is None:
        raise ConfigError("vqpipe run needs a config file: vqpipe run CONFIG.yaml (see configs/)")
    from vqpipe.output.folder import remove_output
    from vqpipe.run import manifest
    from vqpipe.run.execute import execute
    from vqpipe.run.plan import make_plan
    from vqpipe.run.shard_job import make_settings

    if args.limit_shards is not None and args.limit_shards < 1:
        raise ConfigError("--limit-shards must be >= 1")
    config = load_config(args.config, args.overrides)
    model = _load_model(config)
    precision = str(model.autocast_dtype(config.model.precision, _device_hint()) or "fp32").replace("torch.", "")
    job = make_settings(config.input, config.preprocess, config.output, model, precision)
    fingerprint = manifest.fingerprint(job.metadata, config)
    plan = make_plan(config, args.limit_shards)
    conflicts = manifest.incompatibilities(manifest.read_manifest(config), fingerprint)
    if conflicts and not args.overwrite and not args.dry_run:
        raise ConfigError(f"{config.output.path} holds tokens from another model or preprocessing "
                          f"({'; '.join(conflicts)}); use another output.path, or --overwrite to discard them")
    if args.dry_run:
        print(_plan_text(config, plan, job, conflicts))
        return EXIT_OK
    with _output_lease(config):
        if conflicts:
            remove_output(config)
            plan = make_plan(config, args.limit_shards)
        outcome = execute(config, plan, job, fingerprint)
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
        report = run_decode(config, args.num_samples, args.seed, args.out, args.min_psnr, model=model)
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(f"output.path {config.output.path!r}: {err}") from None
    for check in report.checks:
        print(f"{'ok    ' if check.ok else 'FAILED'} {check.name}: {check.figure}")
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
        stats = inspect_output(args.output, options)
    except (FileNotFoundError, NotTokenOutput) as err:
        raise ConfigError(str(err)) from None
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_text(stats))
    return EXIT_OK


def _config_help() -> str:
    from vqpipe.config import config_reference

    lines = []
    for key, type_name, default, doc in config_reference():
        lines.append(f"{key}: {type_name} = {default}")
        lines.append(f"    {doc}" if doc else "    (undocumented)")
    return "\n".join(lines)


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
        "first pending": plan.pending[:3], "model": config.model.path, "weights_sha256": meta["weights_sha256"],
        "codebook": meta["num_vq_embeddings"], "token grid": "x".join(map(str, meta["codes_shape"])),
        "latent shape": meta["latent_shape"], "precision": meta["precision"], "output": config.output.path,
        "conflicts with existing output": conflicts or "none",
    }
    return "\n".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in lines.items())


if __name__ == "__main__":
    sys.exit(main())
