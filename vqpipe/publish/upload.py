"""``vqpipe publish OUT REPO_ID``: a finished output folder to a Hugging Face Hub dataset repo.

Steps: check the output is complete (``run.json`` says ``complete``, one commit marker per data
file, no failed shard) -> write the redacted manifest (and the decode grid, if ``vqpipe decode``
ran) under ``_vqpipe/publish/`` -> write the dataset card ``OUT/README.md`` -> upload ``README.md``,
the top-level ``*.parquet`` and ``_vqpipe/publish/*``, nothing else: markers, failure records and
the raw manifest (which holds ``storage_options``) stay local.

The upload is huggingface_hub's resumable folder upload: ``HfApi.upload_large_folder`` where the
installed huggingface_hub has it (0.x-1.x), else ``HfApi.upload_folder``, which in 2.x is the same
resumable, multi-commit upload (re-running it skips what is already on the Hub). The token is
huggingface_hub's own: ``HF_TOKEN`` or the user's ``hf auth login``; vqpipe never reads one.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from vqpipe.publish import card as dataset_card
from vqpipe.output import storage
from vqpipe.config import redact_secrets
from vqpipe.read.tokens import data_file_sizes, vqpipe_metadata
from vqpipe.output.layout import DECODE_DIR, FAILED_DIR, MANIFEST, PUBLISH_DIR
from vqpipe.output.sink import committed_stems
from vqpipe.read.inspect import inspect_output

CARD = "README.md"
ALLOW_PATTERNS = [CARD, "*.parquet", f"{PUBLISH_DIR}/*"]
# fnmatch's * crosses "/": these keep Parquet files below the top level and hidden temp files out.
IGNORE_PATTERNS = [".*", "*/.*", "*/*.parquet"]
UNPUBLISHED = "(not published)"


class NotPublishable(ValueError):
    """The output cannot be published as it is; the message says why and what to do."""


@dataclass
class PublishPlan:
    folder: Path  # the local output folder, as uploaded
    repo_id: str
    files: dict[str, int]  # path in the repo -> size in bytes, sorted by path
    card: str
    partial: list[str]  # why the output is incomplete; empty when complete

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def prepare(out: str, repo_id: str, allow_partial: bool = False) -> PublishPlan:
    """Check ``out``, write the card and the files to publish into it; upload nothing."""
    folder = _local_folder(out)
    problems = incomplete(folder)
    if not data_file_sizes(str(folder)):
        raise NotPublishable(f"{out}: no Parquet files to publish")
    if problems and not allow_partial:
        raise NotPublishable(f"{out} is not a complete output: {'; '.join(problems)}. Finish the run "
                             "(run the same `vqpipe run` again), or publish it anyway with --allow-partial")
    manifest = _read_json(folder / MANIFEST)
    public = folder / PUBLISH_DIR
    public.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        (public / "run.json").write_text(json.dumps(redact_manifest(manifest), indent=2) + "\n")
    card = dataset_card.render(_card_inputs(folder, repo_id, manifest, problems))
    (folder / CARD).write_text(card, encoding="utf-8")
    return PublishPlan(folder, repo_id, selection(folder), card, problems)


def _local_folder(out: str) -> Path:
    fs, root = storage.filesystem(out, {})
    if not storage.is_local(fs):
        raise NotPublishable(f"{out}: publish uploads a local folder; copy the output to local disk first")
    if not Path(root).is_dir():
        raise NotPublishable(f"{out}: no such folder")
    return Path(root)


def incomplete(folder: Path) -> list[str]:
    """Why ``folder`` is not a complete output, one reason per entry; empty when it is."""
    manifest = _read_json(folder / MANIFEST)
    stems = {posixpath.basename(p)[: -len(".parquet")] for p in data_file_sizes(str(folder))}
    markers = committed_stems(str(folder), {})
    failed = sorted(p.stem for p in (folder / FAILED_DIR).glob("*.json") if not p.name.startswith("."))
    problems = [] if manifest is not None else [f"no {MANIFEST} (not written by `vqpipe run`)"]
    status = (manifest or {}).get("status")
    if manifest is not None and status != "complete":
        problems.append(f"{MANIFEST} status is {status!r}, not 'complete'")
    planned = ((manifest or {}).get("totals") or {}).get("shards")
    if planned is not None and len(markers) < planned:
        problems.append(f"{len(markers)} of {planned} shards committed")
    problems += _named(stems - markers, "data files without a commit marker")
    problems += _named(markers - stems, "commit markers whose data file is missing")
    problems += _named(set(failed), f"failed shards in {FAILED_DIR}/")
    if not stems:
        problems.append("no data files")
    return problems


def _named(stems: set[str], what: str) -> list[str]:
    if not stems:
        return []
    shown = sorted(stems)[:3]
    return [f"{len(stems)} {what} ({', '.join(shown)}{', ...' if len(stems) > 3 else ''})"]


def redact_manifest(manifest: dict) -> dict:
    """The manifest as published: every ``storage_options`` dropped (endpoints, profiles and keys
    alike), secret-looking values masked, URLs without user info or query (presigned URLs)."""
    return redact_secrets(_scrub(manifest))


def _scrub(value):
    if isinstance(value, dict):
        return {k: (UNPUBLISHED if k == "storage_options" else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return dataset_card.public_url(value)
    return value


def _card_inputs(folder: Path, repo_id: str, manifest: dict | None, problems: list[str]
                 ) -> dataset_card.CardInputs:
    first = min(data_file_sizes(str(folder)))
    schema = pq.read_schema(first)
    decode = _read_json(folder / DECODE_DIR / "report.json")
    grid = _publish_grid(folder) if decode is not None else None
    public_manifest = redact_manifest(manifest) if manifest is not None else None
    return dataset_card.CardInputs(
        repo_id=repo_id, schema=schema.remove_metadata(), metadata=vqpipe_metadata(schema, first),
        manifest=public_manifest, stats=inspect_output(str(folder)),
        decode={k: v for k, v in decode.items() if k != "samples"} if decode is not None else None,
        grid=grid, partial=problems)


def _publish_grid(folder: Path) -> str | None:
    source = folder / DECODE_DIR / "grid.png"
    if not source.is_file():
        return None
    shutil.copyfile(source, folder / PUBLISH_DIR / "grid.png")
    return f"{PUBLISH_DIR}/grid.png"


def selection(folder: Path) -> dict[str, int]:
    """What the upload sends, path in the repo -> bytes: the card, the data files, ``_vqpipe/publish/``."""
    files = {Path(p).name: size for p, size in data_file_sizes(str(folder)).items()}
    if (folder / CARD).is_file():
        files[CARD] = (folder / CARD).stat().st_size
    for path in (folder / PUBLISH_DIR).glob("*"):
        if path.is_file() and not path.name.startswith("."):
            files[f"{PUBLISH_DIR}/{path.name}"] = path.stat().st_size
    return dict(sorted(files.items()))


def upload(plan: PublishPlan, private: bool = False, revision: str | None = None, api=None) -> None:
    """Create the dataset repo (and branch) if needed, then upload the plan's files, resumably."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise NotPublishable("uploading needs huggingface_hub: pip install 'vqpipe[hf]' (--dry-run does not)") from None
    api = api or HfApi()  # token=None: HF_TOKEN or the saved login, as huggingface_hub resolves it
    api.create_repo(plan.repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(plan.repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    common = dict(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="dataset", revision=revision,
                  allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS))
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(**common, private=private)
    else:
        api.upload_folder(**common, commit_message="vqpipe publish")


def describe(plan: PublishPlan) -> str:
    """The file list ``--dry-run`` prints: every file the upload sends, with its size."""
    width = max(len(p) for p in plan.files)
    lines = [f"{path:<{width}}  {size:>14,} bytes" for path, size in plan.files.items()]
    return "\n".join(lines + [f"{len(plan.files)} files, {plan.total_bytes:,} bytes to {plan.repo_id}"])


def command(out: str, repo_id: str, private: bool, revision: str | None, dry_run: bool,
            allow_partial: bool) -> int:
    """``vqpipe publish``; returns the exit status."""
    plan = prepare(out, repo_id, allow_partial)
    if plan.partial:
        print(f"vqpipe: publishing an incomplete output: {'; '.join(plan.partial)}", file=sys.stderr)
    if dry_run:
        print(plan.card)
        print(describe(plan))
        return 0
    upload(plan, private, revision)
    print(f"published {len(plan.files)} files ({plan.total_bytes:,} bytes) to "
          f"https://huggingface.co/datasets/{repo_id}" + (f"/tree/{revision}" if revision else ""))
    return 0


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
