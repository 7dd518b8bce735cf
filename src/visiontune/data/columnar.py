"""Rows from dataset formats: Parquet, Hugging Face datasets and WebDataset tar shards.

* **Parquet** (a ``.parquet`` file, a folder of them, or an MLTable with ``read_parquet``):
  the image column holds a path or URL (text), the image's bytes (binary), or a Hugging Face
  ``Image`` struct ``{bytes, path}``. Files that ``datasets`` writes carry their features in
  the schema metadata; ``ClassLabel`` indices become the class names.
* **A Hugging Face dataset saved with ``save_to_disk``** (a folder with ``state.json`` and
  ``dataset_info.json``): its Arrow files, with the features of ``dataset_info.json``.
* **WebDataset shards** (a ``.tar`` file, or a folder of them): members grouped by key
  (``000017.jpg`` + ``000017.cls``), read sequentially; the label is the ``.cls`` /
  ``.label`` / ``.txt`` member, or the label column of a ``.json`` member.

Files are read a batch of rows at a time, and only the two columns visiontune needs. Images
stored in the file are written once to ``<cache dir>/embedded/`` (one folder per source file,
keyed by its path, size and modification time), so that every later step reads them as plain
files: the image checks, the decoded cache and the data loader treat them like any other.
When ``image_column``/``label_column`` are at their defaults and absent, the one column
typed ``Image`` (``ClassLabel``) is used, with a log line. A row that cannot be used is
yielded as its problem, with the file and the 1-based row (or the shard member's key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from visiontune.data.files import cache_dir
from visiontune.data.labels import parse_text_label
from visiontune.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_COLUMN = "image_url"
DEFAULT_LABEL_COLUMN = "label"
HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DICT = "dataset_dict.json"
# WebDataset members that hold a label as text, in the order they are looked for.
SHARD_LABEL_EXTS = ("cls", "label", "labels", "txt")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
BATCH_ROWS = 1024
_SHARD_NAME = re.compile(r"^(.+?)-\d{5}-of-\d{5}\.")

Rows = Iterator[tuple[str, "dict[str, Any] | str"]]

_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"),
          (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def image_suffix(data: bytes, name: str = "") -> str:
    """A file suffix for image bytes: from their signature, else from ``name``, else ``.img``."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    suffix = Path(name).suffix.lower()
    return suffix if 1 < len(suffix) <= 6 else ".img"


def embedded_root() -> Path:

    return cache_dir() / "embedded"


def is_embedded(path: str) -> bool:
    """Whether ``path`` is an image extracted from a data file (named by its row instead)."""
    return Path(path).is_relative_to(embedded_root())


class Embedded:
    """Where the images stored inside one source file are written, once."""

    def __init__(self, source: Path):
        info = source.stat()
        key = hashlib.sha256(
            f"{source.resolve()}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()[:20]
        self.folder = embedded_root() / f"{source.stem[:40]}-{key}"
        self._made = False  # the folder is made by the first image: files of paths need none

    def write(self, name: str, data: bytes) -> str:
        """The path of ``data`` saved as ``name``: written atomically unless already there
        (ranks and repeated runs share the files)."""
        path = self.folder / name
        try:
            if path.stat().st_size == len(data):
                return str(path)
        except FileNotFoundError:
            pass
        if not self._made:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made = True
        temporary = path.with_name(f".{name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return str(path)


# ---------------------------------------------------------------------------------------------
# Features: Hugging Face's description of the columns
# ---------------------------------------------------------------------------------------------
def _class_names(feature: Any) -> list[str] | None:
    """The ClassLabel names of a column, or of the items of a list column; None otherwise."""
    if not isinstance(feature, dict):
        if isinstance(feature, list) and feature:  # datasets writes [feature] for lists too
            return _class_names(feature[0])
        return None
    kind = feature.get("_type")
    if kind == "ClassLabel":
        return [str(n) for n in feature.get("names") or []] or None
    if kind in ("Sequence", "List", "LargeList"):
        return _class_names(feature.get("feature"))
    return None


def _is_image_feature(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def parquet_features(schema: Any) -> dict[str, Any]:
    """The ``datasets`` features stored in a Parquet/Arrow schema's metadata ({} if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    features = (info.get("info") or {}).get("features") if isinstance(info, dict) else None
    return features if isinstance(features, dict) else {}


def _looks_like_image(field: Any) -> bool:
    import pyarrow as pa

    kind = field.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} \
        >= {"bytes", "path"}


def choose_columns(
    schema: Any, features: dict[str, Any], image_column: str, label_column: str | None, where: str,
) -> tuple[str, str | None]:
    """The image and label columns to read: as given, or the only Image/ClassLabel column when
    the defaults are absent; DataError naming the columns otherwise. No label column: None."""
    names = list(schema.names)
    image, label = image_column, label_column
    if image not in names and image_column == DEFAULT_IMAGE_COLUMN:
        typed = [n for n in names if _is_image_feature(features.get(n))
                 or (n not in features and _looks_like_image(schema.field(n)))]
        if len(typed) == 1:
            image = typed[0]
            log.info("%s: images read from column %r (its only image column)", where, image)
    if label is not None and label not in names and label_column == DEFAULT_LABEL_COLUMN:
        typed = [n for n in names if _class_names(features.get(n))]
        if len(typed) == 1:
            label = typed[0]
            log.info("%s: labels read from column %r (its only ClassLabel column)", where, label)
    missing = [c for c in (image, label) if c is not None and c not in names]
    if missing:
        raise DataError(
            f"{where}: no column {', '.join(repr(c) for c in missing)} (columns: "
            f"{', '.join(names)}); set image_column/label_column to the right names")
    return image, label


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
def _image_value(value: Any, embedded: Embedded, row: int) -> str | None:
    """A reference the rest of the data layer reads: stored bytes become a file; a path or URL
    stays as written. None when the row holds no image."""
    name = ""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path") or ""
        if not data:
            return name or None
        value = data
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            return None
        return embedded.write(f"{row:09d}{image_suffix(data, name)}", data)
    return value  # text, or something _to_record reports


def _label_value(value: Any, names: list[str] | None) -> Any:
    """ClassLabel indices as their names; ValueError for an index outside the names."""
    if names is None:
        return value
    if isinstance(value, list):
        return [_label_value(v, names) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return names[value]
        if value == -1:
            raise ValueError("label -1: the dataset marks this row as unlabelled")
        raise ValueError(f"label index {value} is outside the {len(names)} ClassLabel names")
    return value


def _table_rows(
    batches: Iterator[Any], display: str, image: str, label: str | None,
    names: list[str] | None, embedded: Embedded, image_column: str, label_column: str | None,
) -> Rows:
    row = 0
    for batch in batches:
        images = batch.column(image).to_pylist()
        labels = batch.column(label).to_pylist() if label else [None] * len(images)
        for image_value, label_value in zip(images, labels):
            row += 1
            where = f"{display}:{row}"
            reference = _image_value(image_value, embedded, row)
            if reference is None:
                yield where, f"column {image!r} holds no image (null or empty)"
                continue
            values = {image_column: reference}
            if label_column is not None:
                try:
                    values[label_column] = _label_value(label_value, names)
                except ValueError as exc:
                    yield where, str(exc)
                    continue
            yield where, values


def _wanted(image: str, label: str | None) -> list[str]:
    return [image] if label is None else [image, label]


def parquet_rows(file: Path, display: str, image_column: str, label_column: str | None) -> Rows:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{display}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
    features = parquet_features(reader.schema_arrow)
    image, label = choose_columns(reader.schema_arrow, features, image_column, label_column,
                                  display)
    names = _class_names(features.get(label))
    batches = reader.iter_batches(batch_size=BATCH_ROWS, columns=_wanted(image, label))
    yield from _table_rows(batches, display, image, label, names, Embedded(file), image_column,
                           label_column)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: save_to_disk folders
# ---------------------------------------------------------------------------------------------
def is_saved_dataset(folder: Path) -> bool:
    return (folder / HF_STATE).is_file() and (folder / HF_INFO).is_file()


def refuse_dataset_dict(folder: Path) -> None:
    """A DatasetDict folder holds several splits: the user names one."""
    try:
        splits = json.loads((folder / HF_DICT).read_text(encoding="utf-8")).get("splits") or []
    except (OSError, ValueError, AttributeError):
        splits = []
    example = folder / (splits[0] if splits else "train")
    raise DataError(f"{folder}: a Hugging Face DatasetDict with the splits "
                    f"{', '.join(map(str, splits)) or '(none listed)'}; give one split's folder, "
                    f"e.g. {example}")


def refuse_mixed_splits(folder: Path, files: list[Path]) -> None:
    """The Hub's layout keeps every split in one folder (``train-00000-of-00002.parquet``,
    ``test-00000-of-00001.parquet``): reading the folder would mix them."""
    splits = sorted({m.group(1) for f in files if (m := _SHARD_NAME.match(f.name))})
    if len(splits) > 1:
        raise DataError(
            f"{folder}: holds the splits {', '.join(splits)} (by their file names); give one "
            f"split's files, e.g. an MLTable with 'pattern: ./{splits[0]}-*{files[0].suffix}'")


def saved_dataset(folder: Path) -> tuple[list[Path], dict[str, Any]]:
    """The Arrow files and the features of a ``save_to_disk`` folder."""
    where = str(folder)
    try:
        state = json.loads((folder / HF_STATE).read_text(encoding="utf-8"))
        info = json.loads((folder / HF_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read the saved dataset's {HF_STATE}/{HF_INFO} ({exc})") \
            from None
    names = [d.get("filename") for d in state.get("_data_files") or [] if isinstance(d, dict)]
    files = [folder / n for n in names if isinstance(n, str)]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise DataError(f"{where}: the saved dataset's data files are missing "
                        f"({', '.join(missing) or 'none listed in ' + HF_STATE})")
    features = info.get("features") if isinstance(info, dict) else None
    return files, features if isinstance(features, dict) else {}


def arrow_rows(file: Path, display: str, features: dict[str, Any], image_column: str,
               label_column: str | None) -> Rows:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except Exception as exc:
        raise DataError(f"{display}: cannot read as an Arrow stream ({str(exc).splitlines()[0]})") \
            from None
    features = features or parquet_features(reader.schema)
    image, label = choose_columns(reader.schema, features, image_column, label_column, display)
    names = _class_names(features.get(label))
    batches = (batch.select(_wanted(image, label)) for batch in reader)
    yield from _table_rows(batches, display, image, label, names, Embedded(file), image_column,
                           label_column)


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _shard_sample(members: dict[str, bytes], label_column: str | None,
                  ) -> tuple[bytes | None, str, Any]:
    """(image bytes, its extension, label) of one sample; ValueError when it has no label."""
    image_ext = next((e for e in SHARD_IMAGE_EXTS if e in members), "")
    label: Any = None
    if label_column is None:
        return members.get(image_ext), image_ext, None
    for ext in (label_column.lower(), *SHARD_LABEL_EXTS):
        if ext in members and ext not in SHARD_IMAGE_EXTS:
            label = members[ext].decode("utf-8").strip()
            break
    else:
        if "json" in members:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict) or label_column not in meta:
                raise ValueError(f"no {label_column!r} in the sample's .json")
            label = meta[label_column]
        else:
            raise ValueError(f"no label member (.{label_column}, "
                             f"{', '.join('.' + e for e in SHARD_LABEL_EXTS)} or .json)")
    return members.get(image_ext), image_ext, label


def shard_rows(file: Path, display: str, task: str | None, image_column: str,
               label_column: str | None) -> Rows:
    """Samples of one tar shard, in order; the tar is read once, front to back. Text labels
    read as in CSV cells (``cat``, ``3``; multi-label ``cat,dog`` or a JSON list)."""
    embedded = Embedded(file)

    def sample(key: str, members: dict[str, bytes]) -> tuple[str, dict[str, Any] | str]:
        where = f"{display}:{key}"
        try:
            data, ext, label = _shard_sample(members, label_column)
            if isinstance(label, str) and task is not None:
                label = parse_text_label(label, task)
                label = list(label) if isinstance(label, tuple) else label
        except (ValueError, UnicodeDecodeError) as exc:
            return where, str(exc)
        if data is None:
            return where, (f"no image member (.{', .'.join(SHARD_IMAGE_EXTS)}); "
                           f"members: {', '.join(sorted(members))}")
        name = key.replace("/", "__") + "." + ext
        values = {image_column: embedded.write(name, data)}
        if label_column is not None:
            values[label_column] = label
        return where, values

    key, members = None, {}
    try:
        with tarfile.open(file, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key and key is not None:
                    yield sample(key, members)
                    members = {}
                key = member_key
                handle = tar.extractfile(member)
                members[ext] = handle.read() if handle else b""
    except tarfile.TarError as exc:
        raise DataError(f"{display}: cannot read as a tar shard ({exc})") from None
    if key is not None:
        yield sample(key, members)
