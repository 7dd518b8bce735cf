"""What earlier image checks found, so that a run may skip decoding images that have not changed.

Every check (``visiontune data check``, and the one before each fine-tune or evaluation)
records, for each local image file, its path, size and modification time with the result: its
size in pixels, or what is wrong with it. With ``VISIONTUNE_REUSE_IMAGE_CHECK=1`` a check takes
the recorded result of every image whose path, size and modification time are unchanged, and
decodes only the others: for data already checked, the check then costs a ``stat`` per image.
Remote images are always checked (their downloaded copies make that cheap).

The record is one SQLite file in the download cache folder (``$VISIONTUNE_CACHE_DIR``); a
record that cannot be read or written only costs the time it would have saved.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from visiontune.data.files import cache_dir
from visiontune.data.mltable import is_remote, local_path

log = logging.getLogger(__name__)

FILE = "checked-images.sqlite3"
CHUNK = 500  # SQLite's limit on parameters per statement is 999 in old builds
Stamp = tuple[str, int, int]  # (absolute path, size, modification time in ns)
Result = tuple[int, int] | str


def stamp(uri: str) -> Stamp | None:
    """The identity of a local image file as a check saw it; None for remote images and files
    that cannot be read (the check reports those)."""
    if is_remote(uri):
        return None

    try:
        path = os.path.abspath(local_path(uri, Path.cwd()))
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return path, info.st_size, info.st_mtime_ns


def _connect() -> sqlite3.Connection:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(folder / FILE, timeout=30)
    connection.execute("CREATE TABLE IF NOT EXISTS checked (path TEXT PRIMARY KEY, size INTEGER, "
                       "mtime_ns INTEGER, width INTEGER, height INTEGER, problem TEXT)")
    return connection


def recall(stamps: dict[str, Stamp]) -> dict[str, Result]:
    """The recorded results of the images whose stamp is unchanged."""
    by_path = {s[0]: (uri, s) for uri, s in stamps.items()}
    found: dict[str, Result] = {}
    paths = list(by_path)
    try:
        with closing(_connect()) as connection:
            for start in range(0, len(paths), CHUNK):
                chunk = paths[start:start + CHUNK]
                rows = connection.execute(
                    "SELECT path, size, mtime_ns, width, height, problem FROM checked WHERE path "
                    f"IN ({','.join('?' * len(chunk))})", chunk)
                for path, size, mtime_ns, width, height, problem in rows:
                    uri, (_, now_size, now_mtime) = by_path[path]
                    if (size, mtime_ns) == (now_size, now_mtime):
                        found[uri] = problem if problem is not None else (width, height)
    except sqlite3.Error as exc:
        log.info("earlier image checks not available (%s): checking every image", exc)
        return {}
    return found


def remember(stamps: dict[str, Stamp], results: dict[str, Result]) -> None:
    """Record the results of the images checked now (their stamps taken before reading)."""
    rows = []
    for uri, result in results.items():
        taken = stamps.get(uri)
        if taken is None:
            continue
        width, height, problem = (None, None, result) if isinstance(result, str) else (*result, None)
        rows.append((*taken, width, height, problem))
    if not rows:
        return
    try:
        with closing(_connect()) as connection, connection:
            connection.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?, ?, ?, ?, ?)", rows)
    except sqlite3.Error as exc:
        log.debug("image check results not recorded (%s)", exc)
