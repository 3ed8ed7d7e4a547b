"""The decode job: turn stored tokens back into images and prove they are right.

Samples rows (seeded) across the output, decodes their codes with the same model, re-reads the
same samples' originals from their source shards by key, preprocesses them exactly as the
encode did, and reports PSNR plus schema, consistency and lineage checks.
"""

from __future__ import annotations

import html
import io
import json
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from vqpipe.config import RunConfig
from vqpipe.encode import load_model, pick_device
from vqpipe.images import preprocess
from vqpipe.io import data_files, token_metadata
from vqpipe.records import Preprocessed
from vqpipe.shards import iter_samples
from vqpipe.arrays import fixed_list_to_numpy

CONSISTENCY_FLOOR = 0.999  # float16 storage may flip a code where two codewords are nearly equidistant


@dataclass
class Check:
    name: str
    ok: bool
    figure: str


@dataclass
class DecodeReport:
    samples: list[dict] = field(default_factory=list)  # key, source, psnr
    checks: list[Check] = field(default_factory=list)
    mean_psnr: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run_decode(config: RunConfig, num_samples: int = 64, seed: int = 0, out: str | None = None,
               min_psnr: float | None = None) -> DecodeReport:
    out = out or posixpath.join(config.output.path, "_vqpipe", "decode")
    model = load_model(config.model).to(pick_device())
    meta = token_metadata(config.output.path, config.output.storage_options)
    table = sample_rows(config.output.path, config.output.storage_options, num_samples, seed)
    report = DecodeReport()
    report.checks.append(_metadata_check(meta, model))
    codes, latents = _columns(table)
    report.checks.append(_schema_check(meta, codes, latents))
    recon = _reconstruct(model, codes, latents, meta)
    originals = _originals(table, config)
    report.checks.append(Check("lineage", len(originals) == table.num_rows,
                               f"{len(originals)}/{table.num_rows} keys found in their source shards"))
    if codes is not None and latents is not None:
        report.checks.append(_consistency_check(model, codes, latents, meta))
    _psnr(report, table, originals, recon, min_psnr)
    write_outputs(out, config.output.storage_options, report, table, originals, recon)
    return report


def sample_rows(path: str, storage_options: dict, n: int, seed: int) -> pa.Table:
    """``n`` rows drawn uniformly without replacement across all data files."""
    fs, _ = fsspec.core.url_to_fs(path, **storage_options)
    files = data_files(path, storage_options)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files to decode")
    counts = []
    for f in files:
        with fs.open(f, "rb") as handle:
            counts.append(pq.ParquetFile(handle).metadata.num_rows)
    total = sum(counts)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    offsets = np.cumsum([0] + counts)
    tables = []
    for i, f in enumerate(files):
        local = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if len(local):
            with fs.open(f, "rb") as handle:
                tables.append(pq.read_table(handle).take(pa.array(local)))
    return pa.concat_tables(tables)


def _columns(table: pa.Table) -> tuple[np.ndarray | None, np.ndarray | None]:
    names = table.column_names
    codes = fixed_list_to_numpy(table.column("codes")) if "codes" in names else None
    latents = fixed_list_to_numpy(table.column("latents")) if "latents" in names else None
    return codes, latents


def _metadata_check(meta: dict, model) -> Check:
    problems = []
    if meta.get("weights_sha256") != model.weights_sha256:
        problems.append(f"weights {str(meta.get('weights_sha256'))[:12]} != model {str(model.weights_sha256)[:12]}")
    if meta.get("scaling_factor") != model.config.scaling_factor:
        problems.append(f"scaling_factor {meta.get('scaling_factor')} != {model.config.scaling_factor}")
    return Check("metadata", not problems, "; ".join(problems) or "written by this model and scaling_factor")


def _schema_check(meta: dict, codes: np.ndarray | None, latents: np.ndarray | None) -> Check:
    problems = []
    if codes is not None:
        if codes.shape[1:] != tuple(meta["codes_shape"]):
            problems.append(f"codes shape {codes.shape[1:]} != {meta['codes_shape']}")
        if codes.size and int(codes.max()) >= meta["num_vq_embeddings"]:
            problems.append(f"code {int(codes.max())} outside the codebook of {meta['num_vq_embeddings']}")
    if latents is not None:
        if latents.shape[1:] != tuple(meta["latent_shape"]):
            problems.append(f"latents shape {latents.shape[1:]} != {meta['latent_shape']}")
        if str(latents.dtype) != meta["latent_dtype"]:
            problems.append(f"latents dtype {latents.dtype} != {meta['latent_dtype']}")
        if not np.isfinite(latents).all():
            problems.append("non-finite latents")
    return Check("schema", not problems, "; ".join(problems) or "codes in codebook, latents finite, shapes match")


@torch.inference_mode()
def _reconstruct(model, codes, latents, meta) -> np.ndarray:
    device = next(model.parameters()).device
    if codes is not None:
        images = model.decode_codes(torch.from_numpy(codes.astype(np.int64)).to(device))
    else:
        h = torch.from_numpy(latents.astype(np.float32)).to(device) / meta["scaling_factor"]
        images = model.decode(h).sample
    return _to_uint8(images.float().cpu(), meta["value_range"])


def _to_uint8(images: torch.Tensor, value_range) -> np.ndarray:
    low, high = value_range
    x = (images - low) / (high - low) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.inference_mode()
def _consistency_check(model, codes, latents, meta) -> Check:
    h = torch.from_numpy(latents.astype(np.float32)) / meta["scaling_factor"]
    device = next(model.parameters()).device
    again = model.quantize.codes(h.to(device)).cpu().numpy()
    agree = float((again == codes).mean())
    return Check("consistency", agree >= CONSISTENCY_FLOOR,
                 f"{agree:.4%} of positions: quantize(latents / scaling_factor) == codes (floor {CONSISTENCY_FLOOR:.1%})")


def _originals(table: pa.Table, config: RunConfig) -> dict[str, Preprocessed]:
    wanted: dict[str, set[str]] = {}
    for key, source in zip(table.column("key").to_pylist(), table.column("source").to_pylist()):
        wanted.setdefault(source, set()).add(key)
    found: dict[str, Preprocessed] = {}
    for source, keys in wanted.items():
        for sample in iter_samples(source, config.input.storage_options, on_failure=lambda failure: None):
            if sample.key in keys:
                result = preprocess(sample, config.input.image_keys, config.preprocess.resolution,
                                    config.preprocess.min_size)
                if isinstance(result, Preprocessed):
                    found[sample.key] = result
    return found


def _psnr(report: DecodeReport, table, originals, recon, min_psnr) -> None:
    values = []
    for i, (key, source) in enumerate(zip(table.column("key").to_pylist(), table.column("source").to_pylist())):
        value = psnr(originals[key].pixels, recon[i]) if key in originals else None
        report.samples.append({"key": key, "source": source, "psnr": value})
        if value is not None:
            values.append(value)
    report.mean_psnr = float(np.mean(values)) if values else None
    figure = f"mean {report.mean_psnr:.2f} dB over {len(values)} samples" if values else "no samples"
    ok = min_psnr is None or (report.mean_psnr is not None and report.mean_psnr >= min_psnr)
    report.checks.append(Check("psnr", ok, figure + (f" (floor {min_psnr} dB)" if min_psnr is not None else "")))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def write_outputs(out: str, storage_options: dict, report: DecodeReport, table, originals, recon) -> None:
    fs, root = fsspec.core.url_to_fs(out, **storage_options)
    fs.makedirs(root, exist_ok=True)
    keys = table.column("key").to_pylist()
    for key, image in zip(keys, recon):
        fs.pipe_file(posixpath.join(root, f"{_safe(key)}.png"), _png(Image.fromarray(image)))
    fs.pipe_file(posixpath.join(root, "grid.png"), _png(grid(keys, originals, recon)))
    data = {"ok": report.ok, "mean_psnr": report.mean_psnr, "checks": [asdict(c) for c in report.checks],
            "samples": report.samples}
    fs.pipe_file(posixpath.join(root, "report.json"), (json.dumps(data, indent=2) + "\n").encode())
    fs.pipe_file(posixpath.join(root, "report.html"), report_html(report).encode())


def grid(keys, originals, recon, columns: int = 4) -> Image.Image:
    """Pairs (original | reconstruction), labelled by key, ``columns`` pairs per row."""
    size = recon.shape[1]
    label = 14
    rows = (len(keys) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (2 * size + 8), rows * (size + label + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, key in enumerate(keys):
        x, y = (i % columns) * (2 * size + 8), (i // columns) * (size + label + 8)
        if key in originals:
            canvas.paste(Image.fromarray(originals[key].pixels), (x, y + label))
        canvas.paste(Image.fromarray(recon[i]), (x + size, y + label))
        draw.text((x + 2, y), str(key)[:40], fill="black")
    return canvas


def report_html(report: DecodeReport) -> str:
    checks = "".join(f"<tr><td>{html.escape(c.name)}</td><td>{'ok' if c.ok else 'FAILED'}</td>"
                     f"<td>{html.escape(c.figure)}</td></tr>" for c in report.checks)
    samples = "".join(f"<tr><td>{html.escape(str(s['key']))}</td><td>{_fmt_psnr(s['psnr'])}</td></tr>"
                      for s in report.samples)
    return (f"<!doctype html><meta charset='utf-8'><title>vqpipe decode report</title>"
            f"<h1>vqpipe decode report: {'ok' if report.ok else 'FAILED'}</h1>"
            f"<p>Left: original, preprocessed as encoded. Right: decoded from the stored tokens.</p>"
            f"<img src='grid.png' style='max-width:100%'>"
            f"<h2>Checks</h2><table border=1><tr><th>check</th><th>result</th><th>figure</th></tr>{checks}</table>"
            f"<h2>Samples</h2><table border=1><tr><th>key</th><th>PSNR (dB)</th></tr>{samples}</table>\n")


def _fmt_psnr(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
