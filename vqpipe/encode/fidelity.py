"""The fidelity audits of many shards, summed up: what the run summary, ``run.json`` and
``vqpipe inspect`` show. Plain dicts in, plain dicts out (no torch): markers and shard results
feed it alike.

An audit record (a marker's ``audit``, written by :mod:`vqpipe.encode.audit`) holds
``code_agreement`` when the shard was audited, or ``skipped`` with the reason.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Iterable

# model.min_code_agreement's default: fp16 keeps 99.4% of the demo tokenizer's codes, bf16 93.9%.
DEFAULT_MIN_CODE_AGREEMENT = 0.97


def summarize(audits: Iterable[tuple[str, dict | None]], min_code_agreement: float) -> dict:
    """``(stem, audit record)`` pairs -> min / median across shards, and the shards whose codes
    agree with fp32 less than ``min_code_agreement`` (0 = none named)."""
    audited, skipped = [], collections.Counter()
    for stem, record in audits:
        if record and "code_agreement" in record:
            audited.append((stem, record))
        else:
            skipped[(record or {}).get("skipped", "no audit recorded")] += 1
    summary: dict = {"shards_audited": len(audited), "skipped": dict(skipped)}
    if not audited:
        return summary
    records = [r for _, r in audited]
    summary["precision"] = sorted({r["precision"] for r in records})
    for name in ("code_agreement", "stored_code_agreement"):
        values = [r[name] for r in records if name in r]
        if values:
            summary[name] = {"min": min(values), "median": statistics.median(values)}
    for name in ("latent_mean_rel_err", "latent_max_rel_err"):
        values = [r[name] for r in records]
        summary[name] = {"median": statistics.median(values), "max": max(values)}
    summary["psnr_db"] = {"min": min(r["psnr_db"]["min"] for r in records),
                          "median": statistics.median(r["psnr_db"]["mean"] for r in records)}
    summary["min_code_agreement"] = min_code_agreement
    summary["below_min_code_agreement"] = sorted(s for s, r in audited if r["code_agreement"] < min_code_agreement)
    return summary


def below(record: dict | None, min_code_agreement: float) -> bool:
    """Whether one shard's audit fell under the floor (an unaudited shard never does)."""
    return bool(record) and "code_agreement" in record and record["code_agreement"] < min_code_agreement


def summary_lines(summary: dict) -> list[str]:
    """Human-readable lines for the run summary and ``vqpipe inspect``."""
    skipped = ", ".join(f"{reason} ({n})" for reason, n in summary["skipped"].items())
    if not summary["shards_audited"]:
        return ["fidelity audit: no shard audited" + (f"; skipped: {skipped}" if skipped else "")]
    agree = summary["code_agreement"]
    lines = [f"fidelity audit ({summary['shards_audited']} shards, {'/'.join(summary['precision'])} vs fp32): "
             f"codes agree min {agree['min']:.2%}, median {agree['median']:.2%}"]
    if "stored_code_agreement" in summary:
        stored = summary["stored_code_agreement"]
        lines.append(f"  stored float16 latents re-quantized: min {stored['min']:.2%}, median {stored['median']:.2%}")
    rel = summary["latent_mean_rel_err"]
    lines.append(f"  latent relative error: median {rel['median']:.2e}, worst shard mean {rel['max']:.2e}, "
                 f"worst position {summary['latent_max_rel_err']['max']:.2e}")
    psnr = summary["psnr_db"]
    lines.append(f"  reconstruction PSNR: min {psnr['min']:.2f} dB, median of shard means {psnr['median']:.2f} dB")
    if summary["below_min_code_agreement"]:
        names = summary["below_min_code_agreement"]
        lines.append(f"  {len(names)} shard(s) below model.min_code_agreement {summary['min_code_agreement']:.2%}: "
                     + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    if skipped:
        lines.append(f"  not audited: {skipped}")
    return lines


# What to set instead when a precision's codes stray too far from fp32's.
_FIX = {"bf16": "model.precision=fp16 (3 more mantissa bits than bf16; the encoder falls back by itself where "
                "fp16 overflows) or model.precision=fp32 (exact codes)",
        "fp16": "model.precision=fp32 (exact codes)", "tf32": "model.precision=fp32 (exact codes)"}


def guard_verdict(records: list[dict | None], min_code_agreement: float) -> str | None:
    """The misconfiguration guard's word on the first shards' audits: a message naming the
    precision and the fix when their median agreement is under the floor, else None."""
    audited = [r for r in records if r and "code_agreement" in r]
    if not min_code_agreement or not audited:
        return None
    median = statistics.median(r["code_agreement"] for r in audited)
    if median >= min_code_agreement:
        return None
    precision = collections.Counter(r["precision"] for r in audited).most_common(1)[0][0]
    return (f"stopping early: the fidelity audit of the first {len(audited)} shards found their {precision} codes "
            f"agree with the model's fp32 codes on {median:.2%} of positions (median), under "
            f"model.min_code_agreement={min_code_agreement:g}. Likely fix: set "
            f"{_FIX.get(precision, 'model.precision=fp32')}. Lower model.min_code_agreement (0 = off) to run "
            f"anyway.")
