"""``vqpipe bench CONFIG``: how fast one worker runs on this machine, and what holds it back.

The arguments live here; the measuring modules (torch) are imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from vqpipe.config import ConfigError, RunConfig, load_config


def add_parser(subparsers, **options) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="measure model, image-decoding and pipeline throughput of one "
                                                 "worker on this machine", description=__doc__.splitlines()[0],
                                   epilog="example: vqpipe bench configs/demo.yaml --samples 64", **options)
    _arguments(parser)
    parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqpipe bench", description=__doc__.splitlines()[0])
    _arguments(parser)
    try:
        return cmd_bench(parser.parse_args(argv))
    except ConfigError as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return 2


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: model.batch_size=128")
    parser.add_argument("--samples", type=int, default=256, metavar="N", help="images through the pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (medians are shown)")
    parser.add_argument("--jpeg-size", metavar="WxH",
                        help="re-encode the input's photos as WxH JPEGs first (default: as they are)")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q",
                        help="JPEG quality of --jpeg-size re-encoding (LAION's pre-resized 256 px shards: 95)")
    parser.add_argument("--torch-threads", type=int, metavar="T",
                        help="torch threads for the pipeline (default: on a CPU, cores - decode threads)")
    parser.add_argument("--json", metavar="OUT", help="append one JSON line per run to this history file (default: none)")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the per-core decode ceiling, fast path and Pillow path (no model is loaded)")
    parser.add_argument("--null-model", action="store_true",
                        help="only the pipeline, with the model replaced by free zeros: what reading, decoding, "
                             "batching, upload and writing cost (see vqpipe/bench/null_model.py)")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.repeats < 1:
        raise ConfigError("--samples and --repeats must be >= 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ConfigError("--torch-threads must be >= 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {args.jpeg_quality} must be in 1..100")
    config = load_config(args.config, args.overrides)
    if args.decode_only:
        return _decode_bench(config, args)
    if args.null_model:
        return _null_bench(config, args)
    return _full_bench(config, args)


def _full_bench(config: RunConfig, args: argparse.Namespace) -> int:
    from vqpipe.bench.measure import run_bench
    from vqpipe.bench.report import append_history, format_report

    report = run_bench(config, args.samples, args.repeats, _jpeg_size(args.jpeg_size), args.torch_threads,
                       args.jpeg_quality)
    print(format_report(report, args.config))
    if args.json:
        append_history(args.json, report, args.config, args.overrides)
    return 0


def _decode_bench(config: RunConfig, args: argparse.Namespace) -> int:
    from vqpipe.bench.inputs import bench_samples
    from vqpipe.bench.probes import DECODE_SAMPLES, decode_probe, interleaved

    images, source = bench_samples(config, args.samples, _jpeg_size(args.jpeg_size), args.jpeg_quality)
    images = images[:DECODE_SAMPLES]
    probes = {"fast": decode_probe(images, config, fast=True), "pillow": decode_probe(images, config, fast=False)}
    rates = interleaved(probes, args.repeats)
    print(f"vqpipe bench {args.config} --decode-only: {config.preprocess.resolution}px, {len(images)} images, "
          f"one thread, medians of {args.repeats}\nimages: {source}\n\n| path | img/s per core | ms/img |\n|---|---:|---:|")
    for name, label in (("pillow", "Pillow path only (before)"), ("fast", "with the JPEG fast path")):
        print(f"| {label} | {rates[name]:.1f} | {1e3 / rates[name]:.2f} |")
    print(f"| speed-up | {rates['fast'] / rates['pillow']:.2f}x | |")
    return 0


def _null_bench(config: RunConfig, args: argparse.Namespace) -> int:
    from vqpipe.bench import null_model
    from vqpipe.bench.inputs import bench_samples
    from vqpipe.bench.measure import load_bench_model
    from vqpipe.model.loading import pick_device

    images, source = bench_samples(config, args.samples, _jpeg_size(args.jpeg_size), args.jpeg_quality)
    encoder = null_model.null_encoder(config, load_bench_model(config), pick_device())
    figures = null_model.run_null_bench(config, images, source, encoder, config.decode_threads, args.repeats)
    print(null_model.format_null_report(figures, args.config))
    return 0


def _jpeg_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--jpeg-size {text!r} is not WxH (e.g. 512x384)") from None
    if width < 1 or height < 1:
        raise ConfigError(f"--jpeg-size {text!r} must be positive")
    return width, height
