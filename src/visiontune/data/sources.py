"""Read annotation rows from any supported source into Records, keeping every problem.

Sources: an MLTable folder (see ``mltable.py``), a JSON Lines file (``.jsonl``, ``.json``,
``.jsonlines``, ``.ndjson``), a CSV/TSV file (first line is the header), a Parquet file or a
folder of them, a Hugging Face dataset saved with ``save_to_disk``, WebDataset tar shards (a
``.tar`` file or a folder of them; the formats are in ``columnar.py``), or an image folder tree
``root/<class>/<image>`` (multi-class; images may sit in subfolders of a class folder).

Image references: a path relative to the MLTable folder (or to the annotation file's folder
when the file is given directly), an absolute path, a ``file://`` URI, an ``http(s)://`` URL,
an object-store URI (``s3://``, ``az://``, ``gs://``: ``storage.py``) or an ``azureml://`` URI.
Local references become absolute paths; URLs are kept as given and fetched later
(``images.py``). The data itself may be in an object store (an Azure Blob URL with a SAS too): it
is read from a local copy of its annotation files, and relative image paths in it point into the
store. An ``AmlDatastore://<datastore>/<path>`` reference (Azure's data labeling exports, as text
or as a stream_info object with a ``resourceIdentifier``) names a datastore of the workspace the
job runs in: it becomes that workspace's ``azureml://`` URI.

A bad row never disappears: it becomes a Problem with its file and 1-based line, and the caller
decides whether to stop or skip (``prepare.py``). Only a source that cannot be read at all
raises DataError here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from visiontune.data import columnar, storage
from visiontune.data.labels import Label, check_task, normalize_label, parse_text_label
from visiontune.data.files import (
    DELIMITED_SUFFIXES, FORMAT_SUFFIXES, JSON_LINES_SUFFIXES, MLTABLE_FILE, PARQUET_SUFFIXES,
    SHARD_SUFFIXES,
)
from visiontune.data.mltable import TableSpec, local_path, read_mltable
from visiontune.errors import DataError
from visiontune.tasks import MULTICLASS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
})
REMOTE_SCHEMES = ("http", "https", "azureml", *storage.OBJECT_SCHEMES)
# What Azure ML sets in a job: the workspace an AmlDatastore:// reference belongs to.
WORKSPACE_VARS = ("AZUREML_ARM_SUBSCRIPTION", "AZUREML_ARM_RESOURCEGROUP", "AZUREML_ARM_WORKSPACE_NAME")


@dataclass(frozen=True)
class Record:
    """One usable row."""

    image: str  # absolute local path, or the http(s)/azureml URL as given
    label: Label  # str (multi-class) or sorted tuple of str (multi-label)
    where: str  # "annotations.jsonl:12" (1-based line) or the image path for folder trees


@dataclass(frozen=True)
class Problem:
    """One bad row (or image), and what is wrong with it."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def load_records(
    source: str | Path, task: str, image_column: str = "image_url", label_column: str = "label",
) -> tuple[list[Record], list[Problem]]:
    """Every row of ``source`` as a Record, or as a Problem when it cannot be used."""
    check_task(task)
    path = source_path(source)
    if not (path.is_file() or path.is_dir()):  # a named pipe would block the read forever
        shown = storage.redact(str(source))
        raise DataError(f"{shown}: not a regular file or a folder" if path.exists()
                        else f"data not found: {shown}")
    spec = table_spec(path)
    if spec is not None:
        return _read_table(spec, task, image_column, label_column)
    if path.is_dir():
        return _read_folder_tree(path, task)
    raise DataError(
        f"{storage.redact(str(source))}: unknown data format; give an MLTable folder, a JSON Lines file "
        f"({', '.join(JSON_LINES_SUFFIXES)}), a CSV file ({', '.join(DELIMITED_SUFFIXES)}), "
        "a Parquet file, a Hugging Face dataset folder (save_to_disk), WebDataset .tar "
        "shards or a folder with one subfolder of images per class"
    )


def table_spec(path: Path) -> TableSpec | None:
    """The table a file or folder holds: an MLTable, a JSON Lines, CSV or Parquet file, WebDataset
    shards, a saved Hugging Face dataset, or a folder of Parquet files or of shards (all its files
    of one kind). None for anything else (an image folder tree, an image)."""
    if not path.is_dir():
        suffix = path.suffix.lower()
        formats = {s: fmt for fmt, suffixes in (*FORMAT_SUFFIXES.items(),
                                                ("shards", SHARD_SUFFIXES))
                   for s in suffixes}
        if path.name == MLTABLE_FILE:
            return read_mltable(path.parent)
        if suffix not in formats:
            return None
        return TableSpec(base_dir=path.parent, files=[path], format=formats[suffix],
                         delimiter="\t" if suffix == ".tsv" else ",")
    if (path / MLTABLE_FILE).is_file():
        return read_mltable(path)
    if columnar.is_saved_dataset(path):
        files, features = columnar.saved_dataset(path)
        return TableSpec(base_dir=path, files=files, format="arrow", features=features)
    if (path / columnar.HF_DICT).is_file():
        columnar.refuse_dataset_dict(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if files and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        for fmt, suffixes in (("parquet", PARQUET_SUFFIXES), ("shards", SHARD_SUFFIXES)):
            if all(p.suffix.lower() in suffixes for p in files):
                columnar.refuse_mixed_splits(path, files)
                return TableSpec(base_dir=path, files=files, format=fmt)
    return None


def source_path(source: str | Path) -> Path:
    text = str(source).strip()
    if not text:
        raise DataError("no data given")
    scheme = urlparse(text).scheme.lower()
    if storage.is_object_uri(text):
        return storage.mirror(text)
    if len(scheme) > 1 and scheme != "file":
        raise DataError(
            f"{storage.redact(text)}: data must be a local folder or file, or in an object store "
            f"({', '.join(s + '://' for s in storage.OBJECT_SCHEMES)}, or an Azure Blob URL "
            f"https://<account>.blob.core.windows.net/<container>/<path>[?<SAS>]); download or "
            f"mount {scheme}:// data first (image_url values inside the annotations may be URLs)"
        )
    try:
        return local_path(text, Path.cwd())
    except ValueError as exc:
        raise DataError(str(exc)) from None


def datastore_uri(reference: str) -> str:
    """``AmlDatastore://<datastore>/<path>`` as the ``azureml://`` URI of the job's workspace;
    a DataError (the whole source, not one row) outside an Azure ML job."""
    rest = reference.split("://", 1)[1].lstrip("/")
    datastore, _, path = rest.partition("/")
    if not datastore or not path:
        raise ValueError(f"image {reference!r}: expected AmlDatastore://<datastore>/<path>")
    workspace = [os.environ.get(name, "").strip() for name in WORKSPACE_VARS]
    if not all(workspace):
        raise DataError(
            f"image {reference!r}: an AmlDatastore:// reference names a datastore of the Azure ML "
            f"workspace a job runs in, and {', '.join(WORKSPACE_VARS)} are not all set here; "
            "outside a job use azureml://subscriptions/<id>/resourcegroups/<group>/workspaces/"
            "<workspace>/datastores/<datastore>/paths/<path>")
    subscription, group, name = workspace
    return (f"azureml://subscriptions/{subscription}/resourcegroups/{group}/workspaces/{name}"
            f"/datastores/{datastore}/paths/{path}")


def resolve_image(value: str, base_dir: Path) -> str:
    """Local references as absolute paths; http(s)/azureml URLs unchanged; AmlDatastore://
    references as the job workspace's azureml:// URI."""
    text = value.strip()
    scheme = urlparse(text).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return text
    if scheme == "amldatastore":
        return datastore_uri(text)
    if not text:
        raise ValueError("empty image reference")
    if len(scheme) > 1 and scheme != "file":  # a single letter is a Windows drive
        raise ValueError(
            f"image {storage.redact(text)!r}: unsupported URI scheme '{scheme}://'; use a local "
            "path, file://, http(s)://, s3://, az://, gs://, azureml:// or AmlDatastore://"
        )
    remote = storage.remote_folder(base_dir) if not scheme and not os.path.isabs(text) else None
    if remote:  # the annotations were copied from a store: so are their relative paths
        return storage.join(remote, text)
    return os.path.abspath(local_path(text, base_dir))


# ---------------------------------------------------------------------------------------------
# Tables (MLTable, JSON Lines, CSV)
# ---------------------------------------------------------------------------------------------
def _read_table(
    spec: TableSpec, task: str, image_column: str, label_column: str,
) -> tuple[list[Record], list[Problem]]:
    for column in (image_column, label_column):
        if column in spec.drop_columns or (
            spec.keep_columns is not None and column not in spec.keep_columns
        ):
            raise DataError(f"{spec.base_dir / MLTABLE_FILE}: the MLTable drops column "
                            f"{column!r}, which visiontune needs")
    if spec.stream_columns and image_column not in spec.stream_columns:
        log.warning("image column %r is not a stream_info column of the MLTable (those are: %s); "
                    "set image_column if the images are in another column", image_column,
                    ", ".join(spec.stream_columns))

    records: list[Record] = []
    problems: list[Problem] = []
    for where, row in table_rows(spec, image_column, label_column, task):
        if isinstance(row, str):
            problems.append(Problem(where, row))
            continue
        result = _to_record(row, where, spec.base_dir, task, image_column, label_column,
                            from_text=spec.format == "delimited")
        (problems if isinstance(result, Problem) else records).append(result)
    return records, problems


def table_rows(
    spec: TableSpec, image_column: str, label_column: str | None, task: str | None,
) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(where, row or what is wrong with it) for the rows the table's skip/take select, in
    every format; ``label_column`` None reads images only (prediction)."""
    dropped: list[str] = []
    headers: list[list[str]] = []
    required = (image_column,) if label_column is None else (image_column, label_column)
    index = -1
    for file in spec.files:
        display = storage.shown(file)
        if spec.format == "json_lines":
            rows = json_rows(file, spec, display, dropped)
        elif spec.format == "delimited":
            rows = csv_rows(file, spec, display, required, headers)
        elif spec.format == "parquet":
            rows = columnar.parquet_rows(file, display, image_column, label_column)
        elif spec.format == "arrow":
            rows = columnar.arrow_rows(file, display, spec.features, image_column, label_column)
        else:
            rows = columnar.shard_rows(file, display, task, image_column, label_column)
        for where, row in rows:
            index += 1
            if index < spec.skip:
                continue
            if spec.take is not None and index >= spec.skip + spec.take:
                break
            yield where, row
        if spec.take is not None and index >= spec.skip + spec.take:
            break
    if dropped:
        # invalid_lines: drop was asked for; still say how many and where.
        log.warning("dropped %d malformed JSON line(s) (invalid_lines: drop): %s%s", len(dropped),
                    ", ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")


def _to_record(
    row: dict[str, Any], where: str, base_dir: Path, task: str, image_column: str,
    label_column: str, from_text: bool,
) -> Record | Problem:
    for column in (image_column, label_column):
        if column not in row or (from_text and row[column] is None):
            present = ", ".join(k for k in row if row[k] is not None)[:120]
            return Problem(where, f"missing column {column!r} (columns: {present or 'none'})")
    image = row[image_column]
    if isinstance(image, dict) and isinstance(image.get("resourceIdentifier"), str):
        image = image["resourceIdentifier"]  # a stream_info object, as Azure's exports write it
    if not isinstance(image, str) or not image.strip():
        what = "empty" if image is None or isinstance(image, str) else f"not text ({image!r})"
        return Problem(where, f"{image_column} is {what}; expected an image path or URL")
    try:
        resolved = resolve_image(image, base_dir)
        label = (parse_text_label(row[label_column], task) if from_text
                 else normalize_label(row[label_column], task))
    except ValueError as exc:
        return Problem(where, str(exc))
    return Record(image=resolved, label=label, where=where)


def _decode_lines(file: Path, encoding: str, display: str) -> list[str]:
    """The file's lines; a decoding error stops with the line it is on."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{display}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{display}:{line}: not valid {encoding} text; set the encoding of the MLTable "
            "read_* transformation or save the file as UTF-8"
        ) from None
    # Only "\n" ends a line: JSON strings may hold other Unicode line separators.
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def json_rows(
    file: Path, spec: TableSpec, display: str, dropped: list[str],
) -> Iterator[tuple[str, dict[str, Any] | str]]:
    lines = _decode_lines(file, spec.encoding, display)
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("["):
        try:
            whole = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            raise DataError(f"{display}: holds one JSON array; expected JSON Lines "
                            "(one JSON object per line)")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{display}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if spec.invalid_lines == "drop":
                dropped.append(where)
                continue
            yield where, f"malformed JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(value, dict):
            yield where, f"expected a JSON object, got {type(value).__name__}"
            continue
        yield where, value


def csv_rows(
    file: Path, spec: TableSpec, display: str, required: tuple[str, ...],
    headers: list[list[str]],
) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Rows of one delimited file; ``headers`` carries the first file's header to the next."""
    text = "\n".join(_decode_lines(file, spec.encoding, display))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=spec.delimiter)
    header: list[str] | None = None
    wants_header = spec.header != "no_header" and not (
        spec.header == "from_first_file" and headers
    )
    if spec.header == "from_first_file" and headers:
        header = headers[0]
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{display}:{start}: cannot parse the file ({exc})") from None
        if not any(cell.strip() for cell in row):
            continue
        where = f"{display}:{start}"
        if header is None and wants_header:
            header = [h.strip() for h in row]
            _check_header(header, headers, spec, required, where)
            headers.append(header)
            continue
        names = header or [f"Column{i}" for i in range(1, len(row) + 1)]
        if header is None and not headers:
            headers.append([])  # checked once: a file without a header names columns ColumnN
            missing = [c for c in required if c not in names]
            if missing:
                raise DataError(
                    f"{display}: has no header (header: no_header), so its columns are named "
                    f"Column1..Column{len(row)}; set image_column/label_column to those names"
                )
        if header is not None and len(row) > len(header):
            yield where, (f"row has {len(row)} fields but the header has {len(header)} (quote "
                          f"values that contain '{spec.delimiter}')")
            continue
        values: dict[str, Any] = {name: None for name in names}
        values.update(zip(names, row))
        yield where, values


def _check_header(
    header: list[str], headers: list[list[str]], spec: TableSpec, required: tuple[str, ...],
    where: str,
) -> None:
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DataError(f"{where}: the header repeats column(s) {', '.join(duplicated)}")
    if spec.header == "all_files_same_headers" and headers and header != headers[0]:
        raise DataError(
            f"{where}: the header differs from the first file's ({', '.join(headers[0])}); "
            "use header: all_files_different_headers in the MLTable"
        )
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{where}: no column {', '.join(repr(c) for c in missing)} in the header "
            f"(columns: {', '.join(header)}); set image_column/label_column to the right names"
        )


# ---------------------------------------------------------------------------------------------
# Folder tree: root/<class>/<image>
# ---------------------------------------------------------------------------------------------
def _read_folder_tree(root: Path, task: str) -> tuple[list[Record], list[Problem]]:
    if task != MULTICLASS:
        raise DataError(
            f"{root}: an image folder tree gives one class per image; {task} needs an MLTable, "
            "JSON Lines or CSV file with a list of labels per image"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        annotation = sorted(p.name for p in root.iterdir()
                            if p.suffix.lower() in JSON_LINES_SUFFIXES + DELIMITED_SUFFIXES)
        hint = f"; to read {annotation[0]}, pass that file" if annotation else ""
        raise DataError(
            f"{root}: no MLTable file and no class subfolders (expected root/<class>/<image>)"
            + hint
        )
    records: list[Record] = []
    ignored = 0
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            image = os.path.abspath(path)
            records.append(Record(image=image, label=class_dir.name, where=image))
    if ignored:
        log.info("%s: ignored %d file(s) without an image file extension (%s)", root, ignored,
                 ", ".join(sorted(IMAGE_SUFFIXES)))
    return records, []
