"""The decode job: turn stored tokens back into images and prove they are right.

Samples rows (seeded) across the output, decodes their codes (or latents, when the output has no
codes) with the same model, re-reads the same samples' originals from their source shards by key,
preprocesses them exactly as the encode did, and reports PSNR plus metadata, schema, consistency
and lineage checks. Every failing check names the offending data file(s) and key(s).

The decoder pass runs in this process, on its device (CUDA when visible, else the CPU), unless the
caller hands in a ``reconstruct`` that runs it elsewhere (``vqpipe decode`` on a cluster with GPUs:
:func:`vqpipe.run.driver.gpu_reconstruct`); everything else here needs no GPU.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.output.layout import decode_dir
from vqpipe.config import RunConfig
from vqpipe.model.loading import load_model, pick_device
from vqpipe.input.images import preprocess
from vqpipe.read.failures import run_failures
from vqpipe.read.integrity import Integrity, check_output
from vqpipe.read.tokens import Sampled, sample_rows
from vqpipe.input.views import ViewRenderer
from vqpipe.read.views import per_view_originals, per_view_rows
from vqpipe.records import Preprocessed, ShardError
from vqpipe.input.shards import iter_samples
from vqpipe.read.decode_report import Check, DecodeReport, write_outputs, write_report

CONSISTENCY_FLOOR = 0.999  # float16 storage may flip a code where two codewords are nearly equidistant
DECODE_BATCH = 16  # rows per decoder pass: bounds activation memory at 256 px and above
NAMED = 5  # offending rows named per check; the figure says how many more
CODES_LEAF = "codes.list.element.list.element"


def run_decode(config: RunConfig, num_samples: int = 64, seed: int = 0, out: str | None = None,
               min_psnr: float | None = None, model=None, reconstruct: Callable | None = None) -> DecodeReport:
    """Decode ``num_samples`` seeded rows of ``config.output.path`` and check them; writes
    report.json, report.html, grid.png and one {key}.png per row to ``out``. ``model``: the
    config's model, if the caller already loaded it. ``reconstruct(codes, latents, meta)``: the
    decoder pass, when it should run elsewhere than here (default :func:`reconstruct_images` with ``model``)."""
    out = out or decode_dir(config.output.path)
    model = (model if model is not None else load_model(config.model)).to(pick_device())
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    integrity = check_output(fs, root)
    report = DecodeReport(checks=[_files_check(integrity)])
    if integrity.problems and not integrity.readable:  # nothing left to decode: the damage is the report
        write_report(out, config.output.storage_options, report)
        return report
    sampled = sample_rows(config.output.path, config.output.storage_options, num_samples, seed,
                          files=integrity.readable)
    meta = sampled.reference_metadata()
    views = meta.get("views", ["center"])
    if len(views) > 1:  # every view of each sampled row is decoded, checked and shown
        sampled.table = per_view_rows(sampled.table, views)
    report.checks.append(_metadata_check(sampled.metadata, model))
    schema, fit = _schema_check(sampled, meta)
    report.checks.append(schema)
    sampled.table = sampled.table.filter(pa.array(fit))  # rows that cannot be decoded are named above
    codes, latents = _columns(sampled.table)
    recon = (reconstruct or functools.partial(reconstruct_images, model))(codes, latents, meta)
    originals, errors = _originals(sampled.table, config)
    if len(views) > 1:
        originals = per_view_originals(originals, views)
    report.checks.append(_lineage_check(sampled, originals, errors))
    if codes is not None and latents is not None:
        report.checks.append(_consistency_check(model, sampled, codes, latents, meta))
    _psnr(report, sampled, originals, recon, min_psnr)
    report.run_failures = run_failures(config.output.path, config.output.storage_options)
    write_outputs(out, config.output.storage_options, report, sampled.table, originals, recon)
    return report


def _where(sampled: Sampled, mask: np.ndarray) -> str:
    """The file and key of the rows of ``sampled`` where ``mask`` holds."""
    files, keys = sampled.table.column("file").to_pylist(), sampled.table.column("key").to_pylist()
    return where([f for f, m in zip(files, mask) if m], [k for k, m in zip(keys, mask) if m])


def where(files: Sequence[str], keys: Sequence[str], limit: int = NAMED) -> str:
    """``file: key a, b; file: key c`` for the first ``limit`` rows, then how many more."""
    by_file: dict[str, list[str]] = {}
    for file, key in list(zip(files, keys))[:limit]:
        by_file.setdefault(file, []).append(str(key))
    text = "; ".join(f"{file}: key {', '.join(ks)}" for file, ks in by_file.items())
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _columns(table: pa.Table) -> tuple[np.ndarray | None, np.ndarray | None]:
    names = table.column_names
    codes = fixed_list_to_numpy(table.column("codes")) if "codes" in names else None
    latents = fixed_list_to_numpy(table.column("latents")) if "latents" in names else None
    return codes, latents


def _metadata_check(metadata: dict[str, dict | None], model) -> Check:
    """Every data file, not just the sampled ones, must come from this model and scaling_factor."""
    offenders: dict[str, list[str]] = {}
    for path, meta in metadata.items():
        for problem in _metadata_problems(meta, model):
            offenders.setdefault(problem, []).append(path)
    figure = "; ".join(f"{problem}: {_files(paths)}" for problem, paths in offenders.items())
    return Check("metadata", not offenders, figure or f"all {len(metadata)} files written by this model "
                                                      "and scaling_factor")


def _files_check(integrity: Integrity) -> Check:
    """Every data file as its commit marker records it, and readable; each offender named."""
    figure = "; ".join(integrity.problems) or f"all {len(integrity.footers)} files match their commit markers"
    return Check("files", not integrity.problems, figure)


def _metadata_problems(meta: dict | None, model) -> list[str]:
    if meta is None:
        return ["no vqpipe metadata"]
    problems = []
    recorded, current = meta.get("model_config"), json.loads(json.dumps(model.config.to_dict()))
    if isinstance(recorded, dict) and recorded != current:
        keys = sorted(k for k in {*recorded, *current} if recorded.get(k) != current.get(k))
        problems.append(f"model config differs ({', '.join(keys)})")
    if meta.get("weights_sha256") != model.weights_sha256:
        problems.append(f"weights {str(meta.get('weights_sha256'))[:12]} != model {str(model.weights_sha256)[:12]}")
    if meta.get("scaling_factor") != model.config.scaling_factor:
        problems.append(f"scaling_factor {meta.get('scaling_factor')} != {model.config.scaling_factor}")
    return problems


def _files(paths: list[str], limit: int = 3) -> str:
    return ", ".join(paths[:limit]) + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def _schema_check(sampled: Sampled, meta: dict) -> tuple[Check, np.ndarray]:
    """Columns alike in every file; shapes, dtype and finite latents on the sampled rows; the code
    range on every row of every file. Also returns which sampled rows can be decoded."""
    problems = [f"{file}: {why}" for file, why in sampled.skipped.items()]
    fit = np.ones(sampled.table.num_rows, dtype=bool)
    codes, latents = _columns(sampled.table)
    if codes is not None:
        problems += _codes_problems(sampled, codes, meta, fit)
    if latents is not None:
        problems += _latents_problems(sampled, latents, meta, fit)
    return Check("schema", not problems, "; ".join(problems) or "codes in codebook, latents finite, "
                                                                "shapes match"), fit


def _codes_problems(sampled: Sampled, codes: np.ndarray, meta: dict, fit: np.ndarray) -> list[str]:
    """Problems with the codes; clears ``fit`` where a sampled row cannot be decoded."""
    codebook = meta["num_vq_embeddings"]
    problems = _code_range_problems(sampled, codebook)
    fit &= (codes < codebook).reshape(len(codes), -1).all(axis=1)
    if codes.shape[1:] != tuple(meta["codes_shape"]):
        first = next(iter(sampled.footers))
        problems.append(f"{first}: codes shape {codes.shape[1:]} != metadata codes_shape {meta['codes_shape']}")
        fit[:] = False
    return problems


def _latents_problems(sampled: Sampled, latents: np.ndarray, meta: dict, fit: np.ndarray) -> list[str]:
    """Problems with the latents; clears ``fit`` where a sampled row cannot be decoded."""
    problems = []
    first = next(iter(sampled.footers))
    if latents.shape[1:] != tuple(meta["latent_shape"]):
        problems.append(f"{first}: latents shape {latents.shape[1:]} != metadata {meta['latent_shape']}")
        fit[:] = False
    if str(latents.dtype) != meta["latent_dtype"]:
        problems.append(f"{first}: latents dtype {latents.dtype} != metadata {meta['latent_dtype']}")
    finite = np.isfinite(latents).reshape(len(latents), -1).all(axis=1)
    if not finite.all():
        problems.append(f"non-finite latents: {_where(sampled, ~finite)}")
    fit &= finite
    return problems


def _code_range_problems(sampled: Sampled, codebook: int) -> list[str]:
    """Codes >= ``codebook`` anywhere in the output, by file and key. The footers' statistics clear
    most row groups without reading them; only the others are read."""
    problems = []
    for path, md in sampled.footers.items():
        if path in sampled.skipped:
            continue
        for group in _groups_over(md, codebook):
            keys, top = _keys_with_codes_over(sampled.fs, path, group, codebook)
            if keys:
                problems.append(f"code {top} outside the codebook of {codebook}: {where([path] * len(keys), keys)}")
    return problems


def _groups_over(md: pq.FileMetaData, codebook: int) -> Iterator[int]:
    """Row groups whose codes statistics do not prove every code < ``codebook``."""
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        if not group.num_rows:
            continue
        chunk = next((group.column(j) for j in range(group.num_columns)
                      if _is_codes_leaf(group.column(j).path_in_schema)), None)
        stats = chunk.statistics if chunk is not None else None
        if stats is None or not stats.has_min_max or stats.max >= codebook:
            yield g


def _is_codes_leaf(path: str) -> bool:
    # codes.list.element.list.element, with one more list level when the output has views
    return path.startswith("codes.") and path.replace(".list.element", "") == "codes"


def _keys_with_codes_over(fs, path: str, group: int, codebook: int) -> tuple[list[str], int]:
    with fs.open(path, "rb") as handle:
        table = pq.ParquetFile(handle).read_row_group(group, columns=["key", "codes"])
    codes = fixed_list_to_numpy(table.column("codes")).reshape(table.num_rows, -1)
    bad = (codes >= codebook).any(axis=1)
    keys = [k for k, b in zip(table.column("key").to_pylist(), bad) if b]
    return keys, int(codes.max()) if codes.size else 0


@torch.inference_mode()
def reconstruct_images(model, codes: np.ndarray | None, latents: np.ndarray | None, meta: dict) -> np.ndarray:
    """(N, R, R, 3) uint8 images decoded from the codes, or from the latents when there are none."""
    device = next(model.parameters()).device
    n = len(codes) if codes is not None else len(latents)
    parts = []
    for start in range(0, n, DECODE_BATCH):
        if codes is not None:
            part = torch.from_numpy(codes[start:start + DECODE_BATCH].astype(np.int64)).to(device)
            images = model.decode_codes(part)
        else:
            part = torch.from_numpy(latents[start:start + DECODE_BATCH].astype(np.float32)).to(device)
            images = model.decode(part / meta["scaling_factor"]).sample
        parts.append(_to_pixels(images.float().cpu(), meta["value_range"]))
    size = meta["resolution"]
    return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)


def _to_pixels(images: torch.Tensor, value_range) -> np.ndarray:
    low, high = value_range
    x = (images - low) / (high - low) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def _consistency_check(model, sampled: Sampled, codes: np.ndarray, latents: np.ndarray, meta: dict) -> Check:
    h = torch.from_numpy(latents.astype(np.float32)) / meta["scaling_factor"]
    device = next(model.parameters()).device
    again = model.quantize.codes(h.to(device)).cpu().numpy()
    per_row = (again == codes).reshape(len(codes), -1).mean(axis=1)
    agree = float(per_row.mean()) if len(per_row) else 1.0
    figure = f"{agree:.4%} of positions: quantize(latents / scaling_factor) == codes (floor {CONSISTENCY_FLOOR:.1%})"
    if agree < CONSISTENCY_FLOOR:
        worst = np.zeros(len(per_row), dtype=bool)
        worst[np.argsort(per_row, kind="stable")[:NAMED]] = True
        figure += f"; least consistent: {_where(sampled, worst & (per_row < 1))}"
    return Check("consistency", agree >= CONSISTENCY_FLOOR, figure)


def _originals(table: pa.Table, config: RunConfig) -> tuple[dict[str, Preprocessed], dict[str, str]]:
    """The sampled keys' images re-read from their source shards and preprocessed as encoded, and
    the shards that could not be read (source -> error)."""
    wanted: dict[str, set[str]] = {}
    key_column = "sample_key" if "sample_key" in table.column_names else "key"
    for key, source in zip(table.column(key_column).to_pylist(), table.column("source").to_pylist()):
        wanted.setdefault(source, set()).add(key)
    found: dict[str, Preprocessed] = {}
    errors: dict[str, str] = {}
    for source, keys in wanted.items():
        try:
            found |= _find(source, keys, config)
        except ShardError as err:
            errors[source] = str(err)
    return found, errors


def _find(source: str, keys: set[str], config: RunConfig) -> dict[str, Preprocessed]:
    found: dict[str, Preprocessed] = {}
    # Per-member problems of the source shard do not matter here: a sample they drop is a key
    # not found, which the lineage check reports.
    for sample in iter_samples(source, config.input.storage_options, on_failure=lambda failure: None):
        if sample.key in keys:
            result = preprocess(sample, config.input.image_keys, config.preprocess.resolution,
                                config.preprocess.min_size, max_pixels=config.preprocess.max_pixels,
                                fast=config.preprocess.fast_jpeg, render=ViewRenderer.for_config(config.preprocess))
            if isinstance(result, Preprocessed):
                found[sample.key] = result
            if len(found) == len(keys):
                break
    return found


def _lineage_check(sampled: Sampled, originals: dict, errors: dict[str, str]) -> Check:
    keys = sampled.table.column("key").to_pylist()
    missing = np.array([k not in originals for k in keys], dtype=bool)
    figure = f"{len(keys) - int(missing.sum())}/{len(keys)} keys found in their source shards"
    if missing.any():
        figure += f"; not found: {_where(sampled, missing)}"
    if errors:
        figure += "; unreadable sources: " + "; ".join(errors.values())
    return Check("lineage", not missing.any(), figure)


def _psnr(report: DecodeReport, sampled: Sampled, originals, recon, min_psnr) -> None:
    """PSNR per sample into ``report.samples`` (None where the original was not found), the mean,
    and the check against ``min_psnr``, naming the worst rows when it fails."""
    table = sampled.table
    values = np.full(table.num_rows, np.nan)
    rows = zip(table.column("key").to_pylist(), table.column("file").to_pylist(), table.column("source").to_pylist())
    for i, (key, file, source) in enumerate(rows):
        if key in originals:
            values[i] = psnr(originals[key].pixels, recon[i])
        report.samples.append({"key": key, "file": file, "source": source,
                               "psnr": None if np.isnan(values[i]) else float(values[i])})
    measured = ~np.isnan(values)
    report.mean_psnr = float(np.mean(values[measured])) if measured.any() else None
    report.checks.append(_psnr_check(sampled, values, report.mean_psnr, min_psnr))


def _psnr_check(sampled: Sampled, values: np.ndarray, mean: float | None, min_psnr: float | None) -> Check:
    measured = ~np.isnan(values)
    figure = f"mean {mean:.2f} dB over {int(measured.sum())} samples" if mean is not None else "no samples"
    if min_psnr is None:
        return Check("psnr", True, figure)
    ok = mean is not None and mean >= min_psnr
    figure += f" (floor {min_psnr} dB)"
    if not ok and measured.any():
        worst = np.zeros(len(values), dtype=bool)
        worst[np.argsort(np.where(measured, values, np.inf), kind="stable")[:NAMED]] = True
        figure += f"; lowest: {_where(sampled, worst & measured)}"
    return Check("psnr", ok, figure)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
