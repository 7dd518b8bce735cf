"""Output folders: checked before any work, locked while a run writes them, filled in place.

An output folder may be a mount point (Azure ML mounts each output), so it is never removed
or renamed and nothing is moved into it from another file system: new contents are assembled
in a hidden staging folder inside it, then moved into place entry by entry, the entry that
marks the folder complete last (after the old one was removed first), so an interrupted
write leaves either the old complete folder or one that no reader takes as complete.

Nothing visiontune did not write is ever removed: a folder holding other files is refused
with one line before any data or model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

from visiontune.errors import UserError

STAGING_PREFIX = ".visiontune-staging-"
LOCK_FILE = ".visiontune.lock"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file whole or not at all: readers see the old file or the new one, never a part
    (written beside it under a unique name, then renamed over it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data, **dumps) -> Path:
    """``write_text_atomic`` of ``data`` as indented JSON (values JSON lacks as strings, unless
    ``default`` says otherwise)."""
    return write_text_atomic(path, json.dumps(data, **{"indent": 2, "default": str, **dumps}) + "\n")


def check_folder(path: str | Path, input_name: str, *, replaceable: Callable[[Path], bool] | None = None,
                 create: bool = True) -> Path:
    """``path`` as a folder this run may write: not a file, creatable and writable, and either
    empty or (``replaceable``) holding an earlier output of the same kind. One line naming
    ``--input_name`` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--{input_name}: {folder} is a file, not a folder")
    remove_stale_staging(folder)
    if replaceable is not None and folder.is_dir():
        names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
        if names and not replaceable(folder):
            raise UserError(
                f"--{input_name}: {folder} holds files visiontune did not write "
                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); give an empty or "
                "new folder (an earlier output of the same kind there is replaced)")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--{input_name}: cannot create {folder} ({exc.strerror})") from None
    probe_parent = folder if folder.is_dir() else _nearest_existing(folder)
    try:
        with tempfile.TemporaryFile(dir=probe_parent):
            pass
    except OSError as exc:
        raise UserError(f"--{input_name}: cannot write in {probe_parent} ({exc.strerror})") from None
    return folder


def check_file_target(path: str | Path, input_name: str) -> Path:
    """``path`` as a file this run may write (before any work): not a folder, and its folder
    creatable and writable. Nothing is created."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"--{input_name}: {target} is a folder; give a file path")
    check_folder(target.parent, input_name, create=False)
    return target


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.is_dir():
            return parent
    return Path(".")


def remove_stale_staging(folder: Path) -> None:
    """Staging folders a killed run left behind (their names hold the process id that made
    them; another live run's are left alone)."""
    if folder.is_dir():
        for entry in folder.glob(STAGING_PREFIX + "*"):
            if not _process_alive(entry.name[len(STAGING_PREFIX):].split("-", 1)[0]):
                shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: str) -> bool:
    """Whether process ``pid`` (a decimal string) runs on this host; False for anything else."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged(folder: Path, *, complete_marker: str, keep: Callable[[str], bool] = lambda name: False
           ) -> Iterator[Path]:
    """Yields an empty staging folder inside ``folder``; when the block succeeds, its entries
    replace ``folder``'s (those ``keep`` names stay), ``complete_marker`` removed first and moved
    in last. On failure the staging folder is removed and ``folder`` is left as it was (not
    there, when it was not)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
            raise
        (folder / complete_marker).unlink(missing_ok=True)  # incomplete from here
        new = {p.name for p in staging.iterdir()}
        for old in folder.iterdir():
            if old == staging or old.name == LOCK_FILE or keep(old.name) or old.name.startswith(STAGING_PREFIX):
                continue
            if old.name not in new:
                _remove(old)
        for name in sorted(new - {complete_marker}) + ([complete_marker] if complete_marker in new else []):
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class FolderLock:
    """Held by the one run writing ``folder``: a second run on the same folder stops at once
    with one line naming the running one. The lock is the kernel's (``flock``), so a run killed
    even by SIGKILL releases it; the file beside it says who holds it. On file systems without
    ``flock`` the file alone decides, and one whose process is gone (same host) is taken over."""

    def __init__(self, folder: Path, input_name: str):
        self.path = Path(folder) / LOCK_FILE
        self.input_name = input_name
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "FolderLock":
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                if busy or not self._holder_gone():  # without flock the file alone decides
                    os.close(fd)
                    raise UserError(
                        f"--{self.input_name}: {self.path.parent} is in use by another run "
                        f"({self._holder()}); wait for it to finish or choose another folder"
                        + ("" if busy else f" (or remove {self.path} if that run is gone)")) from None
            try:  # the file may have been removed by the run that held it: lock the current one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # releases the flock
                self._fd = None
            if self._created:  # a run refused before it wrote anything leaves no folder
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()

    def _record(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _holder(self) -> str:
        record = self._record()
        if not record:
            return "its lock file is being written"
        return f"process {record.get('pid')} on {record.get('host')}, since {record.get('started')}"

    def _holder_gone(self) -> bool:
        record = self._record()
        if not record.get("pid"):
            return True
        if record.get("host") != socket.gethostname():
            return False
        pid = str(record["pid"])
        return pid.isdigit() and not _process_alive(pid)


MLFLOW_WRITER = "visiontune"  # the MLmodel metadata's ``written_by``


def is_visiontune_mlflow_model(folder: Path) -> bool:
    """An MLflow model that visiontune wrote (its ``MLmodel`` says so), which may be replaced."""
    try:
        meta = (yaml.safe_load((Path(folder) / "MLmodel").read_text(encoding="utf-8")) or {}).get("metadata") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return False
    # written_by from this version on; inference_backend marks the models of earlier ones
    return isinstance(meta, dict) and (meta.get("written_by") == MLFLOW_WRITER or "inference_backend" in meta)
