"""Shard URL lists: brace and glob expansion, one spelling per shard, and each shard's output stem.

``expand_urls("s3://b/{00000..00009}.tar", opts)`` gives ten URLs; ``"s3://b/*/*.tar"`` is
listed through fsspec and keeps only tar files. A pattern that names nothing is an error:
silently processing fewer shards than the user asked for is worse than stopping at the edge.

Every URL is normalised (:func:`normalise_url`) before duplicates are dropped, so ``dir/f.tar``,
``dir/./f.tar``, ``dir//f.tar``, ``file://dir/f.tar`` and its absolute path are one shard; and
a shard's stem (:func:`shard_stem`) is a function of its normalised URL alone, so growing,
shrinking or reordering a list never renames a shard.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand

from vqpipe.output import storage
from vqpipe.output.layout import INTERNAL_DIR

_WILDCARDS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
STEM_HASH_CHARS = 8


class NoMatchError(ValueError):
    """One or more glob patterns matched no tar file; ``patterns`` lists them."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__(f"no shard matched: {', '.join(patterns)}")
        self.patterns = patterns


@dataclass(frozen=True)
class Expanded:
    """The shard URLs of a list of patterns, and what the globs saw but did not take."""

    urls: list[str]  # normalised, in the order given (globs sorted), without duplicates
    passed_over: int  # files that globs matched but are not tar files
    globs: list[str]  # the patterns that were listed (after brace expansion)


def expand_urls(urls: str | list[str], storage_options: dict[str, Any]) -> list[str]:
    """The shard URLs of ``urls``: see :func:`expand`."""
    return expand(urls, storage_options).urls


def expand(urls: str | list[str], storage_options: dict[str, Any]) -> Expanded:
    """Expand braces (webdataset's ``braceexpand``: ``{000..123}`` keeps zero padding,
    ``{a,b}`` alternatives, nesting) then globs (``*?[``) through fsspec.

    A pattern that names an existing file is that file, not a glob (``shard[1].tar``). Globs keep
    only tar files (:data:`TAR_SUFFIXES`) and keep the pattern's protocol prefix (``s3://``).
    Raises :class:`NoMatchError` naming every glob that matched no tar file, and ``ValueError``
    for unbalanced braces.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    unmatched: list[str] = []
    globs: list[str] = []
    passed_over = 0
    for url in (u for p in patterns for u in braceexpand(p)):
        if not _WILDCARDS.search(url) or _is_file(url, storage_options):
            out.append(url)
            continue
        globs.append(url)
        matches = _glob(url, storage_options)
        tars = [m for m in matches if is_tar(m)]
        passed_over += len(matches) - len(tars)
        if not tars:
            unmatched.append(url)
        out.extend(tars)
    if unmatched:
        raise NoMatchError(unmatched)
    return Expanded(list(dict.fromkeys(normalise_url(u) for u in out)), passed_over, globs)


def is_tar(url: str) -> bool:
    return url.lower().endswith(TAR_SUFFIXES)


def _is_file(url: str, storage_options: dict[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        return storage.exists(fs, path) and fs.isfile(path)
    except OSError:  # a pattern the store cannot even look up is globbed like any other
        return False


def _glob(pattern: str, storage_options: dict[str, Any]) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern, **storage_options)
    found = storage.glob(fs, path)
    files = sorted(name for name, info in found.items() if info.get("type") == "file")
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    # fsspec strips the protocol from listings; put the user's spelling back so globbed and
    # literal URLs look alike (and local paths stay plain paths).
    return [scheme + name.removeprefix(scheme) for name in files]


def normalise_url(url: str) -> str:
    """One spelling per file: local paths (and ``file://``) absolute with ``.``, ``..`` and ``//``
    folded; other URLs with a lower-case scheme and their path as given (``a//b`` and ``a/b`` are
    two keys on an object store)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:
        return os.path.normpath(os.path.abspath(os.path.expanduser(url)))
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://{rest}"


def shard_stem(url: str) -> str:
    """The output stem of one shard: its file name without the tar suffix, made file-name safe,
    then ``-`` and the first :data:`STEM_HASH_CHARS` hex digits of the SHA-1 of its normalised URL
    (``s3://b/a/00001.tar`` -> ``00001-1b2c3d4e``). A function of the URL alone, so the same
    shard has the same stem in every run, whatever else the list holds."""
    url = normalise_url(url)
    digest = hashlib.sha1(url.encode()).hexdigest()[:STEM_HASH_CHARS]
    return f"{_name(url)}-{digest}"


def shard_stems(urls: list[str]) -> dict[str, str]:
    """``shard_stem`` of each URL; raises ``ValueError`` naming two URLs whose stems collide (same
    file name and the same hash prefix: about one pair in 4 billion)."""
    stems: dict[str, str] = {}
    owner: dict[str, str] = {}
    for url in dict.fromkeys(urls):
        stem = shard_stem(url)
        if stem in owner and normalise_url(owner[stem]) != normalise_url(url):
            raise ValueError(f"{owner[stem]} and {url} get the same output stem {stem}: rename one")
        stems[url], owner[stem] = stem, url
    return stems


def _name(url: str) -> str:
    path = urlsplit(url).path if "://" in url else url
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    # pyarrow's dataset discovery skips names starting with "." or "_", so a stem must not.
    return _UNSAFE.sub("_", name).lstrip("._") or "shard"



def glob_reaches(pattern: str, folder: str) -> bool:
    """Whether the glob ``pattern`` can match a tar file inside ``folder`` (or in its ``_vqpipe/``):
    an output folder there would read its own neighbourhood as input."""
    regex = _glob_regex(normalise_url(pattern))
    base = normalise_url(folder).rstrip("/")
    return any(regex.fullmatch(f"{base}/{probe}") for probe in ("x.tar", f"{INTERNAL_DIR}/x.tar", f"{INTERNAL_DIR}/x/x.tar"))


def _glob_regex(pattern: str) -> re.Pattern:
    """fsspec's glob syntax as a regex: ``*`` and ``?`` stay within one path component, ``**``
    crosses them, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        char = pattern[i]
        close = pattern.find("]", i + 2) if char == "[" else -1
        if char == "[" and close > 0:
            body = pattern[i + 1:close]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("!") else re.escape(body)) + "]")
            i = close + 1
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
        i += 1
    return re.compile("".join(out))
