"""Read the part of the MLTable format that image-classification data uses.

An MLTable folder holds a YAML file named ``MLTable`` beside the annotation files::

    paths:
      - file: ./train_annotations.jsonl        # or  folder: ./annotations  /  pattern: ./*.jsonl
    transformations:
      - read_json_lines:                       # or  read_delimited: {delimiter: ",", ...}, read_parquet
          encoding: utf8
          invalid_lines: error
          include_path_column: false
      - convert_column_types:
          - columns: image_url
            column_type: stream_info

We parse the YAML ourselves instead of using the ``mltable`` package: that package pins old
dependencies (cloudpickle<3 and with it joblib<1.6, and it upgrades pip), needs native parts,
and returns ``None`` without any error for plain relative or absolute paths in a
``stream_info`` column (only ``file://`` URIs survive), which would lose rows silently.

Supported: ``paths`` entries ``file``, ``folder`` (every file below it, recursively) and
``pattern`` (a glob, ``**`` allowed), as relative paths (to the MLTable folder), absolute paths,
``file://`` URIs or object-store URIs and Azure Blob URLs (``storage.py``); the transformations ``read_json_lines``, ``read_delimited``,
``read_parquet`` (see ``columnar.py``), ``convert_column_types`` (``stream_info`` marks image columns; other types are accepted and
left to our own label parsing), ``take``, ``skip``, ``keep_columns`` and ``drop_columns``.
Anything else is refused with a message, never ignored silently.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import yaml

from visiontune.data import storage
from visiontune.data.files import FORMAT_SUFFIXES, MLTABLE_FILE
from visiontune.errors import DataError

log = logging.getLogger(__name__)

FORMAT_NAMES = {"json_lines": "JSON Lines", "delimited": "delimited", "parquet": "Parquet"}
READERS = {"read_json_lines": "json_lines", "read_delimited": "delimited",
           "read_parquet": "parquet"}

# MLTable encoding names -> Python codec names. utf-8-sig also reads files without a BOM.
ENCODINGS = {
    "utf8": "utf-8-sig", "utf-8": "utf-8-sig", "utf8bom": "utf-8-sig", "utf8-bom": "utf-8-sig",
    "ascii": "ascii", "latin1": "latin-1", "iso88591": "latin-1", "iso-8859-1": "latin-1",
    "utf16": "utf-16", "utf-16": "utf-16", "windows1252": "cp1252", "cp1252": "cp1252",
}

HEADER_MODES = (
    "all_files_same_headers", "from_first_file", "all_files_different_headers", "no_header",
)
_IGNORED_TYPES_NOTE = "string, int, float, boolean, datetime"


@dataclass
class TableSpec:
    """What to read: the files, how to parse them, and what to do to the rows afterwards."""

    base_dir: Path  # relative image paths are resolved against this folder
    files: list[Path]
    format: str  # "json_lines" | "delimited" | "parquet" | "arrow" | "shards"
    encoding: str = "utf-8-sig"
    invalid_lines: str = "error"  # json lines: "error" | "drop"
    delimiter: str = ","
    header: str = "all_files_same_headers"
    stream_columns: list[str] = field(default_factory=list)
    skip: int = 0
    take: int | None = None
    keep_columns: list[str] | None = None
    drop_columns: list[str] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)  # a saved Hugging Face dataset's


def codec(name: Any, where: str) -> str:
    key = str(name).strip().lower().replace("_", "")
    if key in ENCODINGS:
        return ENCODINGS[key]
    raise DataError(f"{where}: unknown encoding {name!r}; use one of {', '.join(sorted(ENCODINGS))}")


def local_path(text: str, base_dir: Path) -> Path:
    """A path or ``file://`` URI as a local path; relative paths are taken from base_dir.

    ValueError for ``file://host/...``: usually a relative path written with two slashes
    (``file://images/a.jpg``), which would otherwise silently point somewhere else."""
    if text[:5].lower() == "file:":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"{text!r}: a file URI with a host ({parsed.netloc!r}) is not supported; write "
                "file:///absolute/path, or a relative path without file://"
            )
        path = Path(url2pathname(unquote(parsed.path)))
    else:
        path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else base_dir / path


def is_remote(text: str) -> bool:
    scheme = urlparse(text).scheme.lower()
    return len(scheme) > 1 and scheme != "file"  # one letter would be a Windows drive


def _listed(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{where}: '{key}' must be a column name or a list of column names")


def _resolve_paths(entries: Any, base_dir: Path, where: str) -> list[tuple[Path, bool]]:
    """(path, named explicitly) for every file the entries select, in a stable order."""
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: 'paths' must be a non-empty list of file/folder/pattern entries")
    files: list[tuple[Path, bool]] = []
    for entry in entries:
        if not isinstance(entry, dict) or len(set(entry) & {"file", "folder", "pattern"}) != 1:
            raise DataError(
                f"{where}: each 'paths' entry needs exactly one of file, folder or pattern; "
                f"got {entry!r}"
            )
        kind = next(k for k in ("file", "folder", "pattern") if k in entry)
        value = str(entry[kind])
        remote = is_remote(value)
        if remote and not storage.is_object_uri(value):
            raise DataError(
                f"{where}: {kind} {storage.redact(value)!r} is remote; visiontune reads annotation "
                "files from local paths, from s3://, az:// and gs:// and from Azure Blob URLs "
                "(https://<account>.blob.core.windows.net/...) (download the data first, e.g. "
                "with azcopy or the Azure ML studio)"
            )
        if remote and kind == "pattern":
            found = storage.mirror_pattern(value)
            if not found:
                raise DataError(f"{where}: pattern {storage.redact(value)!r} matches no files")
            files.extend((p, False) for p in found if p.name != MLTABLE_FILE)
            continue
        try:
            path = storage.mirror(value) if remote else local_path(value, base_dir)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if kind == "file":
            if not path.is_file():
                raise DataError(f"{where}: file {storage.redact(value)!r} not found ({path})")
            files.append((path, True))
        elif kind == "folder":
            if not path.is_dir():
                raise DataError(f"{where}: folder {storage.redact(value)!r} not found ({path})")
            files.extend(
                (p, False) for p in sorted(path.rglob("*"))
                if p.is_file() and p.name != MLTABLE_FILE
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file() and p.name != MLTABLE_FILE]
            if not found:
                raise DataError(f"{where}: pattern {storage.redact(value)!r} matches no files")
            files.extend((p, False) for p in found)
    # The same file selected twice would double its rows.
    seen: dict[Path, bool] = {}
    for path, explicit in files:
        seen[path] = seen.get(path, False) or explicit
    return list(seen.items())


def read_mltable(folder: str | Path) -> TableSpec:
    """Parse ``folder/MLTable`` into a TableSpec; DataError for anything we cannot honour."""
    folder = Path(folder)
    file = folder / MLTABLE_FILE
    where = str(file)
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise DataError(f"{where}: cannot read the MLTable file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise DataError(f"{where}{line}: the MLTable file is not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where}: the MLTable file must be a YAML mapping with 'paths'")
    if "paths" not in doc:
        raise DataError(f"{where}: the MLTable file has no 'paths'")
    files = _resolve_paths(doc["paths"], folder, where)

    spec = TableSpec(base_dir=folder, files=[], format="")
    steps = doc.get("transformations") or []
    if not isinstance(steps, list):
        raise DataError(f"{where}: 'transformations' must be a list")
    for step in steps:
        if isinstance(step, str):  # a transformation without options, e.g. "- read_json_lines"
            step = {step: None}
        if not isinstance(step, dict) or len(step) != 1:
            raise DataError(f"{where}: each transformation must be a mapping with one key; got {step!r}")
        name, options = next(iter(step.items()))
        _apply_step(spec, str(name), options, where)

    if not spec.format:
        spec.format = _format_from_suffix([p for p, _ in files], where)
    spec.files = _files_for_format(files, spec.format, where)
    return spec


def _apply_step(spec: TableSpec, name: str, options: Any, where: str) -> None:
    opts = options if isinstance(options, dict) else {}
    if options is not None and not isinstance(options, (dict, list, int, str)):
        raise DataError(f"{where}: options of '{name}' must be a mapping")
    if name in READERS:
        if spec.format:
            raise DataError(f"{where}: more than one read_* transformation")
        spec.format = READERS[name]
        if name == "read_parquet":
            return  # include_path_column changes nothing that visiontune reads
        spec.encoding = codec(opts.get("encoding", "utf8"), where)
        # include_path_column and other reading options are accepted: they change nothing
        # that visiontune reads.
        if name == "read_json_lines":
            invalid = str(opts.get("invalid_lines", "error")).lower()
            if invalid not in ("error", "drop"):
                raise DataError(f"{where}: invalid_lines must be 'error' or 'drop', not {invalid!r}")
            spec.invalid_lines = invalid
        else:
            delimiter = opts.get("delimiter", ",")
            if not isinstance(delimiter, str) or len(delimiter) != 1:
                raise DataError(f"{where}: delimiter must be one character, not {delimiter!r}")
            spec.delimiter = delimiter
            header = str(opts.get("header", "all_files_same_headers")).lower()
            if header not in HEADER_MODES:
                raise DataError(f"{where}: header must be one of {', '.join(HEADER_MODES)}")
            spec.header = header
    elif name == "convert_column_types":
        items = options if isinstance(options, list) else [options]
        for item in items:
            if not isinstance(item, dict) or "columns" not in item or "column_type" not in item:
                raise DataError(
                    f"{where}: convert_column_types entries need 'columns' and 'column_type'"
                )
            columns = _listed(item["columns"], "columns", where)
            column_type = item["column_type"]
            if column_type == "stream_info":
                spec.stream_columns.extend(columns)
            elif isinstance(column_type, str):
                # Labels are validated by our own rules whatever the declared type.
                log.debug("%s: column_type %s of %s left to visiontune's parsing", where,
                          column_type, columns)
            else:
                raise DataError(
                    f"{where}: column_type {column_type!r} is not supported; use stream_info for "
                    f"image columns (or {_IGNORED_TYPES_NOTE})"
                )
    elif name in ("take", "skip"):
        value = options if not isinstance(options, dict) else options.get("count")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{where}: '{name}' needs a non-negative row count")
        # Applied in the order written: rows [skip, skip + take) of the rows read.
        if name == "take":
            spec.take = value if spec.take is None else min(spec.take, value)
        else:
            spec.skip += value
            if spec.take is not None:
                spec.take = max(0, spec.take - value)
    elif name == "keep_columns":
        spec.keep_columns = _listed(options, name, where)
    elif name == "drop_columns":
        spec.drop_columns.extend(_listed(options, name, where))
    else:
        raise DataError(
            f"{where}: transformation '{name}' is not supported; visiontune reads read_json_lines, "
            "read_delimited, read_parquet, convert_column_types, take, skip, keep_columns and "
            "drop_columns"
        )


def _format_from_suffix(files: list[Path], where: str) -> str:
    suffixes = {f.suffix.lower() for f in files}
    for fmt, wanted in FORMAT_SUFFIXES.items():
        if suffixes and suffixes <= set(wanted):
            return fmt
    raise DataError(
        f"{where}: no read_json_lines, read_delimited or read_parquet transformation, and the "
        "file types "
        f"({', '.join(sorted(suffixes)) or 'none'}) do not say which to use"
    )


def _files_for_format(files: list[tuple[Path, bool]], fmt: str, where: str) -> list[Path]:
    """Folders and patterns often also match the images: keep only annotation files from them
    (a file named explicitly is always read)."""
    wanted = FORMAT_SUFFIXES[fmt]
    kept = [p for p, explicit in files if explicit or p.suffix.lower() in wanted]
    ignored = len(files) - len(kept)
    if ignored:
        log.info("%s: ignored %d file(s) that are not %s annotation files", where, ignored,
                 FORMAT_NAMES[fmt])
    if not kept:
        raise DataError(f"{where}: 'paths' selects no {'/'.join(wanted)} annotation files")
    return kept
