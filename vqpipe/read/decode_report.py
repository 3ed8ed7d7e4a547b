"""``vqpipe decode``'s report: the checks and figures, ``report.json``, ``report.html`` and ``grid.png``
(each pair labelled with its PSNR), and one PNG per decoded row."""

from __future__ import annotations

import html
import io
import json
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from vqpipe.read.failures import RunFailures

LABEL_LINE = 12  # pixels per label line above each pair in grid.png (Pillow's default font is 11 high)


@dataclass
class Check:
    name: str
    ok: bool
    figure: str


@dataclass
class DecodeReport:
    samples: list[dict] = field(default_factory=list)  # key, file, source, psnr
    checks: list[Check] = field(default_factory=list)
    mean_psnr: float | None = None
    run_failures: RunFailures | None = None  # what the run skipped: the rows here are only the good ones

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def write_outputs(out: str, storage_options: dict, report: DecodeReport, table, originals, recon) -> None:
    fs, root = fsspec.core.url_to_fs(out, **storage_options)
    fs.makedirs(root, exist_ok=True)
    keys = table.column("key").to_pylist()
    for key, image in zip(keys, recon):
        fs.pipe_file(posixpath.join(root, f"{_safe(key)}.png"), _png(Image.fromarray(image)))
    psnrs = [s["psnr"] for s in report.samples]
    fs.pipe_file(posixpath.join(root, "grid.png"), _png(grid(keys, originals, recon, psnrs)))
    write_report(out, storage_options, report)


def write_report(out: str, storage_options: dict, report: DecodeReport) -> None:
    """report.json and report.html."""
    fs, root = fsspec.core.url_to_fs(out, **storage_options)
    fs.makedirs(root, exist_ok=True)
    # A lossless reconstruction has infinite PSNR, which strict JSON cannot hold: write null.
    samples = [{**s, "psnr": s["psnr"] if s["psnr"] is None or np.isfinite(s["psnr"]) else None}
               for s in report.samples]
    mean = report.mean_psnr if report.mean_psnr is None or np.isfinite(report.mean_psnr) else None
    data = {"ok": report.ok, "mean_psnr": mean, "checks": [asdict(c) for c in report.checks], "samples": samples,
            "run_failures": report.run_failures.to_dict() if report.run_failures else None}
    fs.pipe_file(posixpath.join(root, "report.json"), (json.dumps(data, indent=2) + "\n").encode())
    fs.pipe_file(posixpath.join(root, "report.html"), report_html(report).encode())


def grid(keys, originals, recon, psnrs=None, columns: int = 4) -> Image.Image:
    """Pairs (original | reconstruction), labelled by key and PSNR, ``columns`` pairs per row."""
    size = recon.shape[1]
    label = LABEL_LINE * 2
    psnrs = psnrs if psnrs is not None else [None] * len(keys)
    rows = max(1, (len(keys) + columns - 1) // columns)
    canvas = Image.new("RGB", (columns * (2 * size + 8), rows * (size + label + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, key in enumerate(keys):
        x, y = (i % columns) * (2 * size + 8), (i // columns) * (size + label + 8)
        if key in originals:
            canvas.paste(Image.fromarray(originals[key].pixels), (x, y + label))
        canvas.paste(Image.fromarray(recon[i]), (x + size, y + label))
        draw.text((x + 2, y), str(key)[:40], fill="black")
        draw.text((x + 2, y + LABEL_LINE), pair_label(psnrs[i]), fill="black")
    return canvas


def pair_label(psnr_db: float | None) -> str:
    """The second label line of a pair: its PSNR, or why there is none."""
    if psnr_db is None:
        return "no original"
    return "lossless" if not np.isfinite(psnr_db) else f"PSNR {psnr_db:.1f} dB"


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
            f"<h2>Samples</h2><table border=1><tr><th>key</th><th>PSNR (dB)</th></tr>{samples}</table>"
            f"{_failures_html(report.run_failures)}\n")


def _failures_html(failures: RunFailures | None) -> str:
    """The run's skipped samples by reason, with a few keys each, and its failed shards: the samples
    above are drawn from the good rows only."""
    if failures is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r.reason)}</td><td>{r.count}</td><td>"
        + "<br>".join(html.escape(f"{e['stem']}: {e['key']} ({e['message']})") for e in r.examples)
        + "</td></tr>" for r in failures.samples)
    shards = "".join(f"<tr><td>{html.escape(s.stem)}</td><td>{html.escape(s.reason)}</td>"
                     f"<td>{html.escape(s.error)}</td></tr>" for s in failures.shards)
    return (f"<h2>Not encoded by the run: {html.escape(failures.summary())}</h2>"
            f"<table border=1><tr><th>reason</th><th>samples</th><th>first keys</th></tr>{rows}</table>"
            + (f"<h3>Failed shards</h3><table border=1><tr><th>shard</th><th>reason</th><th>error</th></tr>"
               f"{shards}</table>" if shards else ""))


def _fmt_psnr(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
