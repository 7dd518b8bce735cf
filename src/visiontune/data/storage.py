"""Object storage through fsspec: ``s3://``, ``az://`` (``abfs://``, ``abfss://``) and ``gs://``
URIs, and Azure Blob URLs (``https://<account>.blob.core.windows.net/<container>/<path>``, or
``.dfs.``) with or without a SAS query, for images and for the data itself (an MLTable folder
or an annotation file).

Credentials come the way each ecosystem passes them, never through visiontune's inputs: S3 from
``AWS_*`` variables, ``~/.aws`` or the instance role (``AWS_ENDPOINT_URL`` for an S3-compatible
server); Azure Blob from ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME``
with ``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN``, or the Azure SDK's default
credential chain; Google Cloud from its default credentials. The one exception is a Blob URL's
SAS query, which a user pastes with the URL. URIs are shown without their query string or
password (``redact``), so a SAS token never reaches a log line or an output file.

A remote data source is mirrored: its annotation files (and ``MLTable``) are copied into the
cache folder and read as local files, while relative image paths in them keep pointing at the
remote folder. Images are fetched on first read into the cache, like http(s) images, so the
data check (which reads every image, in parallel) fetches them ahead of training.

Where a Blob URL's SAS is kept: in this process's memory alone (``_FOLDER_SAS``, filled by
``mirror``), never on disk or in the environment. The mirror's ``.origin`` marker, its cache
folder's name, the image URLs of its rows (and so every message and output naming them) and the
download cache's keys all hold the URL without its query; an image below such a folder is read
through the store with the folder's SAS, looked up when it is fetched, and only from that host.
Data-loading workers forked from the process inherit it, every rank of a distributed run reads
the source itself, and the data check fetches every image ahead of training. A local emulator's
path-style URL (Azurite, as the Azure SDK reads it:
``http://127.0.0.1:<port>/<account>/<container>/<path>?<SAS>``) is read the same way when it
carries a SAS, so the emulator needs no other switch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse, urlsplit, urlunparse

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
# Azure Blob URL hosts: <account><suffix>. adlfs speaks the Blob API, which a Data Lake (dfs)
# account's blob endpoint serves too.
BLOB_HOSTS = (".blob.core.windows.net", ".dfs.core.windows.net")
# Hosts whose URLs the Azure SDK reads path-style (the account first in the path): an emulator.
EMULATOR_HOSTS = ("127.0.0.1", "localhost")
# The SAS (or "": the account's usual credentials) of each Blob folder mirrored in this process,
# keyed by the folder's URL without a query. In memory only: see the module's docstring.
_FOLDER_SAS: dict[str, str] = {}


@dataclass(frozen=True)
class BlobUrl:
    """An Azure Blob URL taken apart."""

    base: str  # scheme://host, plus /<account> for an emulator: a store path is appended to it
    endpoint: str  # the Blob service endpoint to connect to
    account: str
    path: str  # <container>/<path>, as the store names it (not percent-encoded)
    sas: str  # the query as given, "" without one


def blob_url(uri: str) -> BlobUrl | None:
    """``uri`` as an Azure Blob URL, or None: ``https://<account>.blob.core.windows.net/...``
    (or ``.dfs.``), with or without a SAS; an emulator's path-style URL only with a SAS, or
    below a folder mirrored with one."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None
    host = (parts.hostname or "").lower()
    for suffix in BLOB_HOSTS:
        if scheme == "https" and host.endswith(suffix) and len(host) > len(suffix):
            account = host[: -len(suffix)]
            return BlobUrl(f"https://{parts.netloc}", f"https://{account}.blob.core.windows.net",
                           account, unquote(parts.path).strip("/"), parts.query)
    signed = "sig" in parse_qs(parts.query) or folder_sas(uri) is not None
    if host in EMULATOR_HOSTS and signed:
        account, _, path = parts.path.lstrip("/").partition("/")
        if account:
            base = f"{scheme}://{parts.netloc}/{account}"
            return BlobUrl(base, base, account, unquote(path).strip("/"), parts.query)
    return None


def scheme_of(uri: str) -> str:
    return urlparse(uri).scheme.lower()


def is_object_uri(uri: str) -> bool:
    """A URI of an object store: by its scheme, or an Azure Blob URL."""
    return scheme_of(uri) in OBJECT_SCHEMES or blob_url(uri) is not None


def folder_sas(uri: str) -> str | None:
    """For an http(s) URL without a query below a Blob folder mirrored in this process (an image
    a relative path in its annotations names): that folder's SAS ("" for none), to read it
    through the store with. None for any other URL, which is fetched as given."""
    if not _FOLDER_SAS or "?" in uri or scheme_of(uri) not in ("http", "https"):
        return None
    below = [(len(f), sas) for f, sas in tuple(_FOLDER_SAS.items())
             if uri.startswith(f.rstrip("/") + "/")]
    return max(below)[1] if below else None  # the innermost folder's


def _in_store(uri: str, path: str, sas: bool = False) -> str:
    """The URI of ``path`` in the store ``uri`` is in (with ``uri``'s SAS when ``sas``)."""
    blob = blob_url(uri)
    if blob is None:
        return f"{scheme_of(uri)}://{path}"
    return f"{blob.base}/{quote(path)}" + (f"?{blob.sas}" if sas and blob.sas else "")


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
        blob = blob_url(uri)
        if blob is not None:
            return _blob_filesystem(blob, uri), blob.path
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        blob = blob_url(uri) is not None
        kind = "an Azure Blob URL" if blob else f"{scheme_of(uri)}://"
        package = "adlfs" if blob else OBJECT_SCHEMES.get(scheme_of(uri), "an fsspec implementation")
        raise DataError(f"cannot read {redact(uri)}: {kind} needs the {package} "
                        f"package (pip install {package})") from None
    except Exception as exc:  # bad credentials configuration, a malformed URI
        raise DataError(f"cannot read {redact(uri)}: {reason(exc)}") from None


def _blob_filesystem(blob: BlobUrl, uri: str) -> Any:
    """adlfs for a Blob URL. With a SAS, a connection string: it names the endpoint (an
    emulator's http one too) and, unlike an account name with a SAS, takes precedence over the
    AZURE_STORAGE_* variables, which may hold another account's credentials. Without one, the
    account's usual credentials."""
    from adlfs import AzureBlobFileSystem

    sas = blob.sas or folder_sas(uri) or ""
    if sas:
        return AzureBlobFileSystem(
            connection_string=f"BlobEndpoint={blob.endpoint};SharedAccessSignature={sas}")
    return AzureBlobFileSystem(account_name=blob.account)


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
    if parsed.scheme.lower() in ("http", "https"):  # a Blob folder's URL: its path is encoded
        relative = quote(relative)
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
    origin = _in_store(uri, root)  # never the SAS: it stays in memory (_FOLDER_SAS)
    write_text_atomic(target / ORIGIN, origin)  # ranks read it at once
    if (blob := blob_url(uri)) is not None:  # without a SAS of its own: that of a folder above
        _FOLDER_SAS[origin] = blob.sas or folder_sas(f"{origin}/") or ""
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
    return [mirror(_in_store(uri, p, sas=True)) for p in matches]


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
