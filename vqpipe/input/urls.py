"""Shard URL lists: brace and glob expansion, and the output name stem of each shard.

``expand_urls("s3://b/{00000..00009}.tar", opts)`` gives ten URLs; ``"s3://b/*/*.tar"`` is
listed through fsspec. A pattern that names nothing is an error: silently processing fewer
shards than the user asked for is worse than stopping at the edge.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand

from vqpipe.output import storage

_WILDCARDS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class NoMatchError(ValueError):
    """One or more glob patterns matched no file; ``patterns`` lists them."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__(f"no shard matched: {', '.join(patterns)}")
        self.patterns = patterns


def expand_urls(urls: str | list[str], storage_options: dict[str, Any]) -> list[str]:
    """Expand braces (webdataset's ``braceexpand``: ``{000..123}`` keeps zero padding,
    ``{a,b}`` alternatives, nesting) then globs (``*?[``) through fsspec.

    Results keep the order given (globs sorted), without duplicates. Globbed results keep
    the pattern's protocol prefix (``s3://``). Raises :class:`NoMatchError` naming every
    glob pattern that matched no file, and ``ValueError`` for unbalanced braces.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u for p in patterns for u in braceexpand(p)]
    out: list[str] = []
    unmatched: list[str] = []
    for url in expanded:
        if _WILDCARDS.search(url):
            matches = _glob(url, storage_options)
            if not matches:
                unmatched.append(url)
            out.extend(matches)
        else:
            out.append(url)
    if unmatched:
        raise NoMatchError(unmatched)
    return list(dict.fromkeys(out))


def _glob(pattern: str, storage_options: dict[str, Any]) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern, **storage_options)
    found = storage.glob(fs, path)
    files = sorted(name for name, info in found.items() if info.get("type") == "file")
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    # fsspec strips the protocol from listings; put the user's spelling back so globbed and
    # literal URLs look alike (and local paths stay plain paths).
    return [scheme + name.removeprefix(scheme) for name in files]


def shard_stems(urls: list[str]) -> dict[str, str]:
    """Map each URL to a unique, file-name-safe output stem.

    The stem is the file name without ``.tar``/``.tar.gz``/``.tgz``. URLs sharing a stem get
    just enough parent components prepended, joined by ``__``, to tell them apart
    (``a/x/0.tar`` and ``b/x/0.tar`` -> ``a__x__0`` and ``b__x__0``); URLs that differ only
    by scheme or query get a short hash of the URL. Stems depend only on the URL list, so
    every run of the same list names shards the same way -- but adding a URL whose stem
    collides with an existing one renames that one, so extend a job's list with care.
    """
    parts = {url: _components(url) for url in dict.fromkeys(urls)}
    depth = dict.fromkeys(parts, 0)
    hashed: set[str] = set()
    while True:
        stems = {url: _stem(url, parts[url], depth[url], url in hashed) for url in parts}
        groups: dict[str, list[str]] = defaultdict(list)
        for url, stem in stems.items():
            groups[stem].append(url)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return stems
        progressed = False
        for url in (u for g in clashes for u in g):
            if depth[url] < len(parts[url]) - 1:
                depth[url] += 1
                progressed = True
            elif url not in hashed:
                hashed.add(url)
                progressed = True
        if not progressed:
            raise ValueError(f"cannot give unique stems to {clashes}")


def _components(url: str) -> list[str]:
    """Safe path components, outermost first, file name (suffix stripped) last."""
    split = urlsplit(url) if "://" in url else None
    path = split.path if split else url
    pieces = [split.netloc] if split and split.netloc else []
    pieces += [p for p in path.split("/") if p not in ("", ".")]
    name = pieces[-1] if pieces else "shard"
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return [_safe(p) for p in pieces[:-1] + [name]]


def _safe(component: str) -> str:
    # pyarrow's dataset discovery skips names starting with "." or "_", so a stem must not.
    return _UNSAFE.sub("_", component).lstrip("._") or "shard"


def _stem(url: str, parts: list[str], depth: int, hashed: bool) -> str:
    stem = "__".join(parts[len(parts) - 1 - depth :])
    if hashed:
        stem += "-" + hashlib.sha1(url.encode()).hexdigest()[:8]
    return stem
