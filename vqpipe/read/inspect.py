"""``vqpipe inspect``: what an output folder holds, in figures.

Shards committed and failed (with reasons), rows, failed samples by reason, bytes per sample;
codebook usage (distinct codes, perplexity, top codes, dead codes); per-channel statistics of the
stored scaled latents, and the ``scaling_factor`` that would give them unit variance; the markers'
fidelity audits across shards (min and median agreement with fp32, PSNR). Codes and
latents are streamed one row group at a time: memory stays at one row group whatever the size.
"""

from __future__ import annotations

import math
import posixpath
import typing
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq

from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.encode.fidelity import DEFAULT_MIN_CODE_AGREEMENT, summarize, summary_lines
from vqpipe.output import storage
from vqpipe.output.layout import FAILED_DIR, MANIFEST
from vqpipe.output.markers import read_records
from vqpipe.read.integrity import check_output
from vqpipe.read.tokens import vqpipe_metadata
from vqpipe.records import ShardErrorReason, sum_reasons

TOP_CODES = 10
_STEP_VALUES = 2**22  # latent values converted to float64 at a time (32 MiB)


@dataclass
class FailedShard:
    stem: str
    source: str | None
    reason: str  # a ShardError reason (missing_shard, truncated_tar...) or "other"
    error: str
    attempts: int | None


@dataclass
class ShardStats:
    committed: int  # commit markers
    failed: list[FailedShard]  # records in _vqpipe/failed/
    data_files: int
    without_marker: int  # data files whose marker is missing (a crash between publish and marker)
    failed_samples_by_reason: dict[str, int]  # summed over the commit markers
    filtered_samples_by_rule: dict[str, int] = field(default_factory=dict)  # input.filters etc., not failures

    @property
    def failed_by_reason(self) -> dict[str, int]:
        return _count(f.reason for f in self.failed)


@dataclass
class CodebookStats:
    codebook_size: int
    used: int  # distinct codes seen
    dead: int  # codebook entries never used
    perplexity: float  # exp(entropy of the code frequencies); codebook_size at uniform use
    top: list[tuple[int, int]]  # (code, count), most used first
    out_of_range: int  # positions holding a code >= codebook_size (a corrupt file)


@dataclass
class LatentStats:
    shape: list[int]  # (C, h, w)
    dtype: str
    mean: list[float]  # per channel, of the stored (scaled) latents
    std: list[float]  # per channel, population std
    overall_mean: float
    overall_std: float
    scaling_factor: float  # the one the latents were stored with
    unit_variance_scaling_factor: float  # scaling_factor / overall_std


@dataclass
class OutputStats:
    output: str
    shards: ShardStats
    rows: int
    data_bytes: int
    codes: CodebookStats | None = None  # None when the output holds no codes column
    latents: LatentStats | None = None  # None when the output holds no latents column
    fidelity: dict | None = None  # the markers' fidelity audits across shards (vqpipe.encode.fidelity)
    views: list[str] = field(default_factory=lambda: ["center"])  # per sample, in order (preprocess.views)
    problems: list[str] = field(default_factory=list)  # files that do not match their records, by name

    @property
    def bytes_per_sample(self) -> float | None:
        return self.data_bytes / self.rows if self.rows else None

    def to_dict(self) -> dict:
        """Plain JSON types; NaN (no latents to measure) becomes None."""
        data = asdict(self)
        data["shards"]["failed_by_reason"] = self.shards.failed_by_reason
        data["bytes_per_sample"] = self.bytes_per_sample
        return _no_nan(data)


def _no_nan(value):
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def inspect_output(path: str, storage_options: dict | None = None, verify: bool = False) -> OutputStats:
    """Every figure of ``vqpipe inspect`` for the output folder at ``path`` (any fsspec URL), and
    every file that does not match its commit marker (``problems``; ``verify`` adds sha256 checks).

    Raises FileNotFoundError when ``path`` holds neither data files nor vqpipe records.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    integrity = check_output(fs, root, verify)
    checked = integrity.audit
    failed_records = read_records(fs, posixpath.join(root, FAILED_DIR))
    failed = [failed_shard(stem, record) for stem, record in failed_records.records.items()]
    if not checked.data and not checked.marker_of and not checked.unreadable and not failed:
        raise FileNotFoundError(f"{path}: no vqpipe output here (no Parquet files, no _vqpipe/ records)")
    markers = checked.marker_of.values()  # their per-sample lists can be long: only the counts are kept
    stems = {name[: -len(".parquet")] for name in checked.data}
    shards = ShardStats(committed=len(checked.marker_of), failed=failed, data_files=len(checked.data),
                        without_marker=len(stems - set(checked.marker_of)),
                        failed_samples_by_reason=sum_reasons(m.get("failures_by_reason", {}) for m in markers),
                        filtered_samples_by_rule=sum_reasons(m.get("filtered_by_rule", {}) for m in markers))
    problems = integrity.problems + [f"{p}: failure record unreadable, {why}"
                                     for p, why in failed_records.unreadable.items()]
    stats = OutputStats(path, shards, rows=0, data_bytes=sum(checked.data.values()), problems=problems)
    if checked.marker_of:
        audits = [(stem, m.get("audit")) for stem, m in sorted(checked.marker_of.items())]
        stats.fidelity = summarize(audits, _min_code_agreement(fs, root))
    if integrity.footers:
        _scan(fs, integrity.readable, stats)
    return stats


def _min_code_agreement(fs: fsspec.AbstractFileSystem, root: str) -> float:
    """The floor the run was held to (its manifest's config), else the default; a corrupt
    manifest is the integrity check's to report, not a reason to fail here."""
    try:
        manifest = storage.read_json(fs, posixpath.join(root, MANIFEST)) or {}
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        manifest = {}
    model = manifest.get("config", {}).get("model", {}) if isinstance(manifest, dict) else {}
    return float(model.get("min_code_agreement", DEFAULT_MIN_CODE_AGREEMENT))


def failed_shard(stem: str, record: dict) -> FailedShard:
    error = str(record.get("error", ""))
    reason = next((r for r in typing.get_args(ShardErrorReason) if r in error), "other")
    return FailedShard(stem, record.get("source"), reason, error, record.get("attempts"))


def _scan(fs: fsspec.AbstractFileSystem, files: list[str], stats: OutputStats) -> None:
    """Fill rows, codes and latents from the data files, one row group in memory at a time."""
    with fs.open(files[0], "rb") as handle:
        schema = pq.read_schema(handle)
    meta = vqpipe_metadata(schema, files[0])
    stats.views = list(meta.get("views", ["center"]))
    codes = CodeCounter(meta["num_vq_embeddings"]) if "codes" in schema.names else None
    latents = ChannelMoments(meta["latent_shape"][0]) if "latents" in schema.names else None
    columns = [c for c, acc in (("codes", codes), ("latents", latents)) if acc is not None]
    for path in files:
        try:
            _scan_file(fs, path, columns, codes, latents, meta["latent_shape"], stats)
        except (OSError, ValueError) as err:  # a damaged row group (ArrowInvalid is a ValueError)
            stats.problems.append(f"{path}: unreadable data ({type(err).__name__}: {str(err).strip()[:200]})")
    stats.codes = codes.result() if codes is not None else None
    if latents is not None:
        stats.latents = latents.result(meta["latent_shape"], meta["latent_dtype"], meta["scaling_factor"])


def _scan_file(fs, path: str, columns: list[str], codes: CodeCounter | None, latents: ChannelMoments | None,
               latent_shape: list[int], stats: OutputStats) -> None:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for group in range(parquet.num_row_groups if columns else 0):
            table = parquet.read_row_group(group, columns=columns)
            if codes is not None:
                codes.add(fixed_list_to_numpy(table.column("codes")))
            if latents is not None:
                # views are more rows to the statistics: (N, V, C, h, w) -> (N * V, C, h, w)
                latents.add(fixed_list_to_numpy(table.column("latents")).reshape(-1, *latent_shape))
        stats.rows += parquet.metadata.num_rows


class CodeCounter:
    """How often each code occurs, accumulated batch by batch."""

    def __init__(self, codebook_size: int) -> None:
        self.codebook_size = codebook_size
        self.counts = np.zeros(codebook_size, dtype=np.int64)

    def add(self, codes: np.ndarray) -> None:
        counts = np.bincount(codes.reshape(-1), minlength=len(self.counts))
        if len(counts) > len(self.counts):  # out-of-range codes: keep counting, report them
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts += counts

    def result(self) -> CodebookStats:
        counts, k = self.counts, self.codebook_size
        order = np.argsort(-counts, kind="stable")[:TOP_CODES]
        used = int(np.count_nonzero(counts[:k]))
        return CodebookStats(
            codebook_size=k, used=used, dead=k - used, perplexity=perplexity(counts),
            top=[(int(c), int(counts[c])) for c in order if counts[c]], out_of_range=int(counts[k:].sum()),
        )


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of the frequencies ``counts / counts.sum()``; 0 for no counts."""
    total = counts.sum()
    if not total:
        return 0.0
    p = counts[counts > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)
    in float64: a running sum of squares loses the variance to cancellation when the mean is
    large against the spread, and float16 inputs overflow it outright."""

    def __init__(self, channels: int) -> None:
        self.n = 0  # values per channel
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, latents: np.ndarray) -> None:
        """Fold in a (N, C, h, w) batch, a few MiB of float64 at a time."""
        per_row = max(1, latents[0].size) if len(latents) else 1
        step = max(1, _STEP_VALUES // per_row)
        for start in range(0, len(latents), step):
            x = latents[start:start + step].astype(np.float64)
            n = x.shape[0] * x.shape[2] * x.shape[3]
            mean = x.mean(axis=(0, 2, 3))
            m2 = ((x - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
            self._merge(n, mean, m2)

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.mean = self.mean + delta * n / total
        self.n = total

    def overall(self) -> tuple[float, float]:
        """Mean and population std of all values, every channel pooled."""
        if not self.n:
            return math.nan, math.nan
        mean = float(self.mean.mean())
        m2 = float(self.m2.sum() + self.n * ((self.mean - mean) ** 2).sum())
        return mean, math.sqrt(m2 / (self.n * len(self.mean)))

    def result(self, shape: list[int], dtype: str, scaling_factor: float) -> LatentStats:
        std = np.sqrt(self.m2 / self.n) if self.n else np.full_like(self.mean, math.nan)
        overall_mean, overall_std = self.overall()
        unit = scaling_factor / overall_std if overall_std > 0 else math.nan
        return LatentStats(list(shape), dtype, self.mean.tolist(), std.tolist(), overall_mean, overall_std,
                           scaling_factor, unit)


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def format_text(stats: OutputStats) -> str:
    """The human-readable report ``vqpipe inspect`` prints."""
    lines = [f"output: {stats.output}"] + _shard_lines(stats)
    if stats.problems:
        lines.append(f"PROBLEMS: {len(stats.problems)} (files that do not match their commit records)")
        lines += [f"  {p}" for p in stats.problems]
    if stats.codes is not None:
        lines += _code_lines(stats.codes)
    if stats.latents is not None:
        lines += _latent_lines(stats.latents)
    if stats.fidelity is not None:
        lines += summary_lines(stats.fidelity)
    return "\n".join(lines)


def _shard_lines(stats: OutputStats) -> list[str]:
    shards = stats.shards
    lines = [f"shards: {shards.committed} committed, {len(shards.failed)} failed"
             + (f" ({_pairs(shards.failed_by_reason)})" if shards.failed else "")]
    lines += [f"  failed {f.stem} ({f.reason}" + (f", attempts {f.attempts}" if f.attempts else "") + f"): {f.error}"
              for f in shards.failed]
    if shards.without_marker:
        lines.append(f"  data files without a commit marker: {shards.without_marker}")
    lines.append(f"rows: {stats.rows}")
    if len(stats.views) > 1 or stats.views != ["center"]:
        lines.append(f"views: {len(stats.views)} per row ({', '.join(stats.views)})")
    lines.append(f"failed samples: {_pairs(shards.failed_samples_by_reason) or 'none'}")
    if shards.filtered_samples_by_rule:
        total = sum(shards.filtered_samples_by_rule.values())
        lines.append(f"filtered samples: {total} ({_pairs(shards.filtered_samples_by_rule)})")
    per_sample = stats.bytes_per_sample
    lines.append(f"bytes per sample: {per_sample:,.1f} ({stats.data_bytes:,} bytes in {shards.data_files} files)"
                 if per_sample is not None else f"bytes per sample: - ({shards.data_files} files, no rows)")
    return lines


def _code_lines(codes: CodebookStats) -> list[str]:
    share = codes.used / codes.codebook_size if codes.codebook_size else 0.0
    lines = [f"codebook: {codes.used} of {codes.codebook_size} codes used ({share:.1%}), {codes.dead} dead, "
             f"perplexity {codes.perplexity:.1f}",
             f"  top codes (code: count): {', '.join(f'{c}: {n}' for c, n in codes.top) or '-'}"]
    if codes.out_of_range:
        lines.append(f"  codes outside the codebook: {codes.out_of_range} positions (corrupt data)")
    return lines


def _latent_lines(latents: LatentStats) -> list[str]:
    shape = "x".join(map(str, latents.shape))
    return [
        f"latents ({latents.dtype} {shape}, scaled by scaling_factor {latents.scaling_factor:g}):",
        f"  mean per channel: {_floats(latents.mean)}",
        f"  std per channel:  {_floats(latents.std)}",
        f"  overall: mean {latents.overall_mean:.4f}, std {latents.overall_std:.4f}",
        f"  scaling_factor for unit variance: {latents.unit_variance_scaling_factor:.5g} "
        f"(= {latents.scaling_factor:g} / {latents.overall_std:.4f})",
    ]


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
