"""``model.path: hf://ORG/REPO[@REVISION][/SUBFOLDER]`` -> a local folder in the Hugging Face cache.

Only the two files a checkpoint needs (``config.json`` and the safetensors weights) are fetched, with
``huggingface_hub.snapshot_download``, into the standard cache (``HF_HUB_CACHE``, else
``$HF_HOME/hub``), where every later run -- and every worker on the same machine -- finds them. With
``HF_HUB_OFFLINE=1`` nothing is downloaded: the cached snapshot is used, or the run stops with the
command that would fill the cache.

``REVISION`` is a branch, tag or commit sha; ``refs/pr/N`` may be written as is, other revisions that
contain ``/`` percent-encoded (``@refs%2Fconvert%2Fparquet``), as ``huggingface_hub.HfFileSystem``
spells them. Pinning a commit sha makes every worker of a long run load the same weights.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from vqpipe.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from vqpipe.model.errors import CheckpointError

SCHEME = "hf://"
# Revisions that contain "/" and need no percent-encoding (same rule as HfFileSystem).
_SPECIAL_REVISION = re.compile(r"^(refs/pr/\d+|refs/convert/\w+)(/|$)")
_TRUE = {"1", "on", "yes", "true"}


class HubError(CheckpointError):
    """An ``hf://`` model path that cannot be resolved; the message names the path and the fix."""


@dataclass(frozen=True)
class HubPath:
    repo_id: str  # "ORG/REPO"
    revision: str | None  # None = the default branch
    subfolder: str  # inside the repo; "" for its root

    def url(self) -> str:
        revision = ""
        if self.revision:
            special = _SPECIAL_REVISION.match(f"{self.revision}/")
            revision = "@" + (self.revision if special else quote(self.revision, safe=""))
        return f"{SCHEME}{self.repo_id}{revision}" + (f"/{self.subfolder}" if self.subfolder else "")


def is_hub_path(path: str) -> bool:
    return path.startswith(SCHEME)


def parse(path: str) -> HubPath:
    """``hf://ORG/REPO@REV/a/b`` -> ``HubPath("ORG/REPO", "REV", "a/b")``."""
    parts = path[len(SCHEME):].strip("/").split("/", 2)
    tail = parts[2] if len(parts) == 3 else ""
    repo, sep, revision = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
    if not parts[0] or not repo:
        raise HubError(f"{path}: expected hf://ORG/REPO[@REVISION][/SUBFOLDER]")
    if sep:
        special = _SPECIAL_REVISION.match(f"{revision}/{tail}")
        if special:
            revision, tail = special[1], f"{revision}/{tail}"[special.end():]
        revision = unquote(revision)
        if not revision:
            raise HubError(f"{path}: empty revision after '@'")
    return HubPath(f"{parts[0]}/{repo}", revision or None, tail.strip("/"))


def resolve(path: str, subfolder: str | None = None) -> str:
    """The local folder ``path`` names, fetched into the Hub cache if needed.

    ``subfolder`` (``model.subfolder``) is fetched but not appended: the checkpoint loader appends it.
    Only ``config.json`` and the safetensors weights are fetched; pickle ``.bin`` weights, which vqpipe
    never loads, and the rest of a pipeline repo (a multi-GB UNet) are not.
    """
    where = parse(path)
    inner = posixpath.join(where.subfolder, subfolder or "").strip("/")
    shown = HubPath(where.repo_id, where.revision, inner).url()  # what is fetched, model.subfolder included
    patterns = [posixpath.join(inner, name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    snapshot_download, errors = _hub_api(path)
    offline = is_offline()
    try:
        root = snapshot_download(where.repo_id, revision=where.revision, allow_patterns=patterns,
                                 cache_dir=cache_dir(), local_files_only=offline)
    except errors as err:
        raise HubError(_explain(shown, where, inner, offline, err)) from None
    _check_snapshot(shown, root, inner)
    return os.path.join(root, where.subfolder) if where.subfolder else root


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now: huggingface_hub reads it once, at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str | None:
    """``HF_HUB_CACHE``, else ``$HF_HOME/hub``, as set now; None = huggingface_hub's default."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expanduser(home), "hub") if home else None


def _hub_api(path: str):
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{path}: reading models from the Hugging Face Hub needs huggingface_hub: "
                       "pip install 'vqpipe[hf]'") from None
    return snapshot_download, (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError)


def _explain(shown: str, where: HubPath, inner: str, offline: bool, err: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    if offline and isinstance(err, LocalEntryNotFoundError):
        revision = f" --revision {where.revision}" if where.revision else ""
        include = f" --include '{inner}/*'" if inner else ""
        return (f"{shown} is not in the local Hugging Face cache ({cache_dir() or constants.HF_HUB_CACHE}) "
                f"and HF_HUB_OFFLINE is set, so it cannot be downloaded. Fill the cache once where the Hub is "
                f"reachable, with the same HF_HOME / HF_HUB_CACHE: `hf download {where.repo_id}{revision}{include}`; "
                "or unset HF_HUB_OFFLINE")
    lines = str(err).strip().splitlines()
    return f"{shown}: {type(err).__name__}: {lines[0] if lines else ''}"


def _check_snapshot(shown: str, root: str, inner: str) -> None:
    if not os.path.exists(os.path.join(root, inner, CONFIG_NAME)):
        raise HubError(f"{shown}: no {CONFIG_NAME} there: check the subfolder (e.g. model.subfolder: vqvae or movq)")
    if not os.path.exists(os.path.join(root, inner, WEIGHTS_NAME)):
        raise HubError(
            f"{shown}: no {WEIGHTS_NAME} there, and vqpipe does not load pickle .bin weights: use a revision "
            "that has safetensors (a Hub 'refs/pr/N' conversion, written hf://ORG/REPO@refs/pr/N/SUBFOLDER), "
            "or convert the weights once and point model.path at the copy")
