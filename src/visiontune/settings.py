"""Every environment switch visiontune reads, declared once: its name, default and meaning.

Modules read them through ``flag``, ``text`` and ``number`` (so a default lives only here);
docs/performance.md and docs/troubleshooting.md say when to change them, and a test keeps
every ``VISIONTUNE_*`` name in the source declared here and documented."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from visiontune.inputs import parse_bool


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any  # a flag's bool, a number, a text, or None (unset: decided by the code)
    meaning: str


SETTINGS = {s.name: s for s in (
    Setting("VISIONTUNE_LOG_LEVEL", "INFO", "the console's log level (DEBUG shows third-party notices)"),
    Setting("VISIONTUNE_CPU_BF16", None, "precision 16 on a CPU: 1 bf16 on any CPU, 0 float32; "
                                         "unset: bf16 where the CPU has it natively"),
    Setting("VISIONTUNE_TF32", True, "TF32 matrix products on GPUs of compute capability 8.0 and newer"),
    Setting("VISIONTUNE_FAST_DEPTHWISE", True, "the faster bf16 depthwise backward (CPUs with native bf16)"),
    Setting("VISIONTUNE_INPLACE_HARDTANH", True, "the in-place ReLU6 of CPU training"),
    Setting("VISIONTUNE_MALLOC_TUNING", True, "glibc malloc thresholds that keep freed tensor memory"),
    Setting("VISIONTUNE_MALLOC_ONE_ARENA", True, "one glibc malloc arena (off: glibc's own count; "
                                                 "with the thresholds above)"),
    Setting("VISIONTUNE_CHANNELS_LAST", True, "CNNs trained and run in channels-last memory format"),
    Setting("VISIONTUNE_FUSED_ADAMW", True, "the adamw and adamw_hf optimizers as torch's fused "
                                            "AdamW (off: its loop over tensors)"),
    Setting("VISIONTUNE_DIRECT_TRANSFORMS", True, "augmentations by direct kernel calls (off: "
                                                  "torchvision's v2.Compose dispatch; same pixels)"),
    Setting("VISIONTUNE_LOADER_PREFETCH", 2, "batches each data-loader worker keeps in flight"),
    Setting("VISIONTUNE_BATCH_READ_THREADS", 8, "threads that read a batch's images at once in each "
                                                "data-loader worker (1: one after another)"),
    Setting("VISIONTUNE_GC_FREEZE", True, "the objects alive when training begins kept out of the "
                                          "garbage collector's reach until it ends"),
    Setting("VISIONTUNE_PERSISTENT_WORKERS", True, "data-loader workers kept between the "
                                                   "training and validation loaders"),
    Setting("VISIONTUNE_SKIP_TRITON", True, "leave triton unloaded on a machine without a GPU"),
    Setting("VISIONTUNE_IMAGE_CACHE", True, "the decoded-image cache"),
    Setting("VISIONTUNE_IMAGE_CACHE_DIR", None, "where the decoded-image cache is "
                                                "(default ~/.cache/visiontune/decoded)"),
    Setting("VISIONTUNE_IMAGE_CACHE_MAX_GB", 20.0, "the decoded-image cache's size limit per "
                                                   "folder (least recently used entries go first)"),
    Setting("VISIONTUNE_JPEG_DRAFT", True, "reduced-scale JPEG decoding where the transform crops at random"),
    Setting("VISIONTUNE_REUSE_IMAGE_CHECK", False, "skip decoding the images an earlier check "
                                                   "saw unchanged (path, size, modification time)"),
    Setting("VISIONTUNE_CACHE_DIR", None, "where downloaded images, and images stored inside "
                                          "data files, are kept (default ~/.cache/visiontune/images)"),
    Setting("VISIONTUNE_SHARED_FOLDER_WAIT_S", 30.0, "how long a process looks for the other nodes' "
                                                     "marker in a shared output folder"),
)}


def _declared(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"{name} is not a declared setting (visiontune.settings.SETTINGS)") from None


def is_set(name: str) -> bool:
    return bool(os.environ.get(_declared(name).name, "").strip())


def flag(name: str, default: bool | None = None) -> bool:
    """An on/off switch, read as boolean inputs are read; its declared default (or ``default``,
    for a switch whose default the code decides) when it is unset or not a boolean."""
    declared = _declared(name).default
    fallback = declared if default is None else default
    try:
        return parse_bool(os.environ.get(name, ""))
    except ValueError:
        return bool(fallback)


def text(name: str) -> str | None:
    """A text setting, or its declared default when unset."""
    value = os.environ.get(_declared(name).name, "").strip()
    return value or _declared(name).default


def number(name: str) -> float:
    """A number setting, or its declared default when unset or not a number."""
    try:
        return float(os.environ.get(_declared(name).name, ""))
    except ValueError:
        return float(_declared(name).default)


def markdown_table() -> str:
    """The table of docs/performance.md (a test keeps the page equal to it)."""
    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return "-" if value is None else f"`{value}`"

    rows = [f"| `{s.name}` | {shown(s.default)} | {s.meaning} |" for s in SETTINGS.values()]
    return "\n".join(["| variable | default | what it switches or sets |", "|---|---|---|", *rows])
