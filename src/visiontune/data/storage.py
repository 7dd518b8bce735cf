"""Object storage through fsspec: ``s3://``, ``az://`` (``abfs://``, ``abfss://``) and ``gs://``
URIs, for images and for the data itself (an MLTable folder or an annotation file).

Credentials come the way each ecosystem passes them, never through visiontune's inputs: S3 from
``AWS_*`` variables, ``~/.aws`` or the instance role (``AWS_ENDPOINT_URL`` for an S3-compatible
server); Azure Blob from ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME``
with ``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN``, or the Azure SDK's default
credential chain; Google Cloud from its default credentials. URIs are shown without their query
string or password (``redact``), so a SAS token in an ``https://<account>.blob.core.windows.net``
URL never reaches a log line or an output file.

A remote data source is mirrored: its annotation files (and ``MLTable``) are copied into the
cache folder and read as local files, while relative image paths in them keep pointing at the
remote folder. Images are fetched on first read into the cache, like http(s) images, so the
data check (which reads every image, in parallel) fetches them ahead of training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from visiontune.data.files import (
    FORMAT_SUFFIXES, MLTABLE_FILE, SHARD_SUFFIXES, ImageTooLarge, cache_dir, read_at_most,
)
from visiontune.errors import DataError
from visiontune.outputs import write_text_atomic

# scheme -> the fsspec implementation's package
OBJECT_SCHEMES = {"s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
                  "gs": "gcsfs", "gcs": "gcsfs"}
ORIGIN = ".origin"  # in a mirrored source's folder: the store folder it copies
# Store metadata that changes when an object does.
_VERSION_KEYS = ("ETag", "etag", "LastModified", "last_modified", "mtime", "size")


def scheme_of(uri: str) -> str:
    return urlparse(uri).scheme.lower()


def is_object_uri(uri: str) -> bool:
    return scheme_of(uri) in OBJECT_SCHEMES


def redact(uri: str) -> str:
    """``uri`` without its query string (a SAS token, a signature) or password."""
    parsed = urlparse(uri)
    if not parsed.scheme or (not parsed.query and not parsed.password):
        return uri
    netloc = parsed.netloc.rsplit("@", 1)[-1] if parsed.password else parsed.netloc
    return urlunparse(parsed._replace(netloc=netloc, query="***" if parsed.query else ""))


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it); DataError naming the package to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        package = OBJECT_SCHEMES.get(scheme_of(uri), "an fsspec implementation")
        raise DataError(f"cannot read {redact(uri)}: {scheme_of(uri)}:// needs the {package} "
                        f"package (pip install {package})") from None
    except Exception as exc:  # bad credentials configuration, a malformed URI
        raise DataError(f"cannot read {redact(uri)}: {reason(exc)}") from None


def reason(exc: BaseException) -> str:
    """The first line of an error from a store's library (some hold escaped newlines), with
    any URI redacted."""
    text = str(exc).replace("\\n", "\n").splitlines()[0] if str(exc) else type(exc).__name__
    return redact(text) if "://" in text else text


def read_object(uri: str, limit: int) -> bytes:
    """The bytes of one object, at most ``limit``; DataError otherwise."""
    fs, path = filesystem(uri)
    try:
        size = fs.size(path)
        if size is not None and size > limit:
            raise ImageTooLarge(redact(uri), int(size), limit)
        with fs.open(path, "rb") as handle:
            return read_at_most(handle.read, limit, redact(uri))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image not found: {redact(uri)}") from None
    except Exception as exc:  # each filesystem raises its own kinds; the message is what counts
        raise DataError(f"cannot read {redact(uri)}: {reason(exc)}") from None


def join(base: str, relative: str) -> str:
    """A path relative to a remote folder, as a URI in that folder's store."""
    parsed = urlparse(base)
    path = posixpath.normpath(posixpath.join(parsed.path or "/", relative))
    return urlunparse(parsed._replace(path=path))


def mirror(uri: str) -> Path:
    """A local copy of a remote data source, to read like a local one.

    A file is copied alone; a folder with the annotation files (MLTable, JSON Lines, CSV,
    Parquet, shards, Arrow) below it, never its images. The copy lives under the cache folder,
    keyed by the URI; a file is fetched again when the store's version of it (ETag, modification
    time or size) changes. ``remote_folder`` maps the copy back to the store."""
    # What the readers read (a saved dataset's Arrow files too); images stay where they are.
    tables = (*(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes), *SHARD_SUFFIXES,
              ".arrow")
    fs, path = filesystem(uri)
    try:
        is_file = fs.isfile(path)
        if is_file:
            root = path.rsplit("/", 1)[0]
            files = {path: fs.info(path)}
        elif fs.isdir(path):
            root = path.rstrip("/")
            files = {f: info for f, info in fs.find(root, detail=True).items()
                     if f.rsplit("/", 1)[-1] == MLTABLE_FILE
                     or os.path.splitext(f)[1].lower() in tables}
        else:
            raise DataError(f"data not found: {redact(uri)}")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot list {redact(uri)}: {reason(exc)}") from None
    target = cache_dir() / "sources" / hashlib.sha256(redact(uri).encode()).hexdigest()[:20]
    target.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target / ORIGIN, f"{scheme_of(uri)}://{root}")  # ranks read it at once
    for remote, info in files.items():
        _fetch(fs, remote, info, target / remote[len(root):].lstrip("/"), uri)
    return target / path.rsplit("/", 1)[-1] if is_file else target


def mirror_pattern(uri: str) -> list[Path]:
    """Local copies of the files a glob pattern in a store matches (``**`` allowed), each
    fetched as ``mirror`` fetches a file; sorted by their URIs."""
    fs, pattern = filesystem(uri)
    try:
        matches = sorted(p for p in fs.glob(pattern) if fs.isfile(p))
    except Exception as exc:
        raise DataError(f"cannot list {redact(uri)}: {reason(exc)}") from None
    return [mirror(f"{scheme_of(uri)}://{p}") for p in matches]


def _fetch(fs: Any, remote: str, info: dict, local: Path, uri: str) -> None:
    version = json.dumps([str(info.get(k)) for k in _VERSION_KEYS], sort_keys=True)
    stamp = local.with_name(f".{local.name}.version")
    if local.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == version:
        return  # unchanged in the store: keep the copy (and what was extracted from it)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=local.parent, prefix=".part-")
    os.close(fd)
    try:
        fs.get_file(remote, temporary)
        os.replace(temporary, local)
    except Exception as exc:
        Path(temporary).unlink(missing_ok=True)
        raise DataError(f"cannot read {redact(uri)}: {reason(exc)}") from None
    write_text_atomic(stamp, version)


@functools.lru_cache(maxsize=256)
def remote_folder(folder: Path) -> str | None:
    """The store folder a local copy made by ``mirror`` stands for (None if not a copy)."""

    root = cache_dir() / "sources"
    try:
        relative = Path(folder).relative_to(root)
    except ValueError:
        return None
    if not relative.parts:
        return None
    try:
        origin = (root / relative.parts[0] / ORIGIN).read_text(encoding="utf-8")
    except OSError:
        return None
    return origin if len(relative.parts) == 1 else join(origin, "/".join(relative.parts[1:]))


def shown(file: Path) -> str:
    """How messages name a data file: its store URI for a copy, else its path."""
    folder = remote_folder(file.parent)
    return f"{folder.rstrip('/')}/{file.name}" if folder else str(file)
