"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc's malloc serves a large block (from 128 KB, a threshold it raises on the fly up to
32 MB) with its own ``mmap`` and returns it with ``munmap`` when freed, and it trims freed
heap memory off the top of the heap. A CPU training step allocates and frees tens of
activation and gradient tensors of megabytes each, so glibc maps many of them afresh at every
step and the kernel faults in and zeroes their pages again: many page faults a step and a
visible share of the machine's time in the kernel, varying from run to run with the order of
the first allocations.

``tune()`` sets the two thresholds (what the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables set at start-up) so that blocks up to 32 MB
come from the heap and up to 1 GB of freed heap stays mapped for the next step;
``release()`` hands the freed heap back before and after training. The page faults and the
training speed with and without it: BENCHMARKS.md, *Levers*.

A kept heap is kept per arena, and glibc gives each new thread its own arena (up to eight per
core): the compute threads' and the image decoders' freed blocks then stay where the main
thread cannot reuse them. ``tune()`` also limits malloc to one arena (``MALLOC_ARENA_MAX=1``),
so every thread's freed memory serves every other's: a lower peak at the same speed
(BENCHMARKS.md, *Levers*). The CLI calls ``tune()``; Python code that calls
visiontune's functions keeps its process's settings. Other C libraries (musl, macOS) and
``VISIONTUNE_MALLOC_TUNING=0`` leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

from visiontune import settings

log = logging.getLogger(__name__)

ENV_SWITCH = "VISIONTUNE_MALLOC_TUNING"
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # glibc's mallopt takes an int
ARENA_MAX = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters, <malloc.h>

_tuned: bool | None = None


@functools.cache
def _glibc():
    """The C library the process runs on, when it is glibc: looked up once, in the symbols
    already loaded (no ``find_library``, which runs ``ldconfig`` at every call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt does nothing
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Set glibc's thresholds and arena count once per process (forked workers inherit them).
    True when set."""
    global _tuned
    if _tuned is None:
        libc = _glibc() if settings.flag(ENV_SWITCH) else None
        _tuned = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                      and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                      and (not settings.flag("VISIONTUNE_MALLOC_ONE_ARENA")
                           or libc.mallopt(_M_ARENA_MAX, ARENA_MAX)))
        log.debug("malloc thresholds and arena count %s", "set" if _tuned else "left as they are")
    return _tuned


def release() -> None:
    """Hand the freed heap back to the kernel (``malloc_trim``) when ``tune()`` kept it: before
    training, what checking and caching the images freed; after it, the steps' memory, so that
    what comes next (evaluation, saving, an ONNX export) does not pile up on it."""
    libc = _glibc() if _tuned else None
    if libc is not None:
        libc.malloc_trim(0)
