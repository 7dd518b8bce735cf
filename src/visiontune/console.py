"""What a run shows: visiontune's own lines and real warnings about the run, nothing else.

Everything is logged to stderr through one handler. Third-party notices go to the debug log
(shown with ``VISIONTUNE_LOG_LEVEL=DEBUG``): the libraries' info lines, transformers'
weight-loading report (visiontune says what happened to the head in its own line), MLflow's
messages about how a model is saved or loaded, DeepSpeed's accelerator probe. Other
third-party warnings and errors stay visible. In a log file (stderr not a terminal) colour
codes are removed and MLflow's download bars are off; training shows plain progress lines
there (training/callbacks.py), progress bars only on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

from visiontune import settings

LEVEL_ENV = "VISIONTUNE_LOG_LEVEL"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Read by the libraries when they are imported; a user's own setting wins. MLflow then logs
# through the handler here rather than its own, and copies local files without a bar.
LIBRARY_ENV = {"MLFLOW_CONFIGURE_LOGGING": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# Libraries whose warnings are about how visiontune uses them, never about the user's run
# (MLflow: saving and loading the MLflow model; a failed tracking call is visiontune's warning).
QUIET_LIBRARIES = ("mlflow",)
# (library, words of the message): third-party warnings about how visiontune calls the
# library, not about the run. transformers: the load report of the weights (visiontune says
# what happened to the head); the checkpoint's label count, which visiontune replaces.
NOISE = (("transformers", "LOAD REPORT"), ("transformers", "incompatible to the `id2label`"))
# The Azure SDKs behind azureml:// (azureml-mlflow, azureml-fsspec, azure-identity) log each
# credential they try, at WARNING and ERROR, before they raise; visiontune reports the failure
# once instead (``silenced``).
AZURE_LIBRARIES = ("azure", "azureml", "msal", "urllib3")
_LIBRARY_FILE = re.compile(r"[/\\](?:site|dist)-packages[/\\]([A-Za-z0-9_]+)[/\\]")


def _own(name: str) -> bool:
    return name in ("visiontune", "root", "py.warnings") or name.startswith("visiontune.")


def is_noise(record: logging.LogRecord) -> bool:
    """A third-party record that belongs in the debug log only."""
    if _own(record.name) or record.levelno >= logging.ERROR:
        return False
    if record.levelno < logging.WARNING:
        return True
    library = record.name.split(".", 1)[0]
    if library in QUIET_LIBRARIES:
        return True
    if any(library == name and words in record.getMessage() for name, words in NOISE):
        return True
    return record.name == "DeepSpeed" and record.module == "real_accelerator"


class _Route(logging.Filter):
    """Demotes noise to DEBUG, then applies the chosen level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if is_noise(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


class _Formatter(logging.Formatter):
    """Without colour codes when the stream is not a terminal."""

    def __init__(self, stream, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = not _isatty(stream)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return ANSI.sub("", text) if self.plain else text


class _AdoptedLogger(logging.Logger):
    """A library logger (DeepSpeed's) that keeps no console handler of its own and always
    passes its records up to the handler here."""

    @property
    def propagate(self) -> bool:  # type: ignore[override]
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass

    def addHandler(self, handler: logging.Handler) -> None:  # noqa: N802 - logging API
        if type(handler) is not logging.StreamHandler:
            super().addHandler(handler)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _level() -> int:
    value = settings.text(LEVEL_ENV).upper()  # the declared default: INFO
    level = logging.getLevelName(value) if not value.isdigit() else int(value)
    return level if isinstance(level, int) else logging.INFO


def _adopt(name: str) -> None:
    manager = logging.Logger.manager
    existing = manager.loggerDict.get(name)
    if isinstance(existing, logging.Logger):  # the library was imported already
        for handler in [h for h in existing.handlers if type(h) is logging.StreamHandler]:
            existing.removeHandler(handler)
        existing.propagate = True
        return
    previous = manager.loggerClass
    manager.setLoggerClass(_AdoptedLogger)
    try:
        logging.getLogger(name)
    finally:
        manager.loggerClass = previous


_show_warning = warnings.showwarning


def _route_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` that sends the quiet libraries' warnings to the debug log."""
    match = _LIBRARY_FILE.search(str(filename))
    if file is None and match and match.group(1) in QUIET_LIBRARIES:
        logging.getLogger("py.warnings").debug("%s: %s (%s:%s)", category.__name__,
                                               ANSI.sub("", str(message)), filename, lineno)
        return
    _show_warning(message, category, filename, lineno, file, line)


def setup(main_process: bool = True) -> None:
    """Route every log of this process to stderr: level ``VISIONTUNE_LOG_LEVEL`` (INFO) on the
    main process, WARNING on the others (one log in distributed runs)."""
    for name, value in LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    level = _level() if main_process else max(_level(), logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_visiontune", False)]:
        root.removeHandler(handler)
    if not root.handlers:  # as logging.basicConfig: a host application's logging is kept
        handler = logging.StreamHandler(sys.stderr)
        handler._visiontune = True  # type: ignore[attr-defined]
        handler.setFormatter(_Formatter(sys.stderr, "%(asctime)s %(levelname)s %(name)s: %(message)s",
                                        datefmt="%H:%M:%S"))
        handler.addFilter(_Route(level))
        root.addHandler(handler)
        root.setLevel(level)
    _adopt("DeepSpeed")
    warnings.showwarning = _route_warning


def route_transformers() -> None:
    """transformers' records to the handler here (its own prints them with a "[transformers]"
    prefix), and no weight loading/saving bars; the training bars are the Trainer's."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


_silencing = threading.Lock()
_silenced: dict[str, tuple[int, int]] = {}  # logger name -> (blocks inside, level before)


@contextlib.contextmanager
def silenced(names: tuple[str, ...]):
    """No records at all from the loggers ``names`` (and below) while the block runs: for
    libraries that log what they try before raising, where the caller reports the failure.
    Blocks may overlap across threads: the last one to leave restores the levels."""
    with _silencing:
        for name in names:
            depth, level = _silenced.get(name, (0, logging.getLogger(name).level))
            _silenced[name] = (depth + 1, level)
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        with _silencing:
            for name in names:
                depth, level = _silenced.pop(name)
                if depth > 1:
                    _silenced[name] = (depth - 1, level)
                else:
                    logging.getLogger(name).setLevel(level)
