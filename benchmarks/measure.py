"""Run one command and measure it: wall time, peak memory of its process tree, and how much of
the machine other processes took meanwhile (the benchmark machine may be shared).

* Peak memory: the largest sum, over the process and all its descendants (data-loader
  workers...), of their proportional set size (PSS: shared pages split between the processes
  that map them, so forked workers are not counted twice), sampled every ``SAMPLE_S``. Also
  the peak RSS of the largest single process (``ru_maxrss`` of the child, from ``wait4``).
* Foreign load: busy CPU time of the whole machine (/proc/stat) minus the CPU time of the
  command's own process tree, as a share of the machine's capacity during the run.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_S = 0.5
QUIET_BELOW = 0.15  # foreign share of the machine under which it counts as quiet


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the machine."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def machine_busy_share(seconds: float = 3.0) -> float:
    """Share of the machine's CPU capacity that was busy over ``seconds``."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet(max_wait_s: float, log=print) -> float:
    """Wait (up to ``max_wait_s``) until other processes leave the machine nearly idle; returns
    the last busy share seen."""
    deadline = time.monotonic() + max_wait_s
    share = machine_busy_share()
    told = False
    while share >= QUIET_BELOW and time.monotonic() < deadline:
        if not told:
            log(f"  waiting for a quiet machine (busy {share:.0%})...")
            told = True
        share = machine_busy_share(5.0)
    return share


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        parent = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _proc_kb(path: str, field: str) -> int | None:
    """The kB value of ``field`` ("Pss:", "VmRSS:") in a /proc file; None when absent."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_kb(pid: int) -> int:
    """PSS of one process (RSS where smaps_rollup is unavailable), in kB."""
    pss = _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
    if pss is None:
        pss = _proc_kb(f"/proc/{pid}/status", "VmRSS:")
    return pss or 0


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_tree_mb: float
    peak_rss_mb: float
    foreign_share: float
    log_path: str
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)


def run_measured(cmd: list[str], log_path: str | Path, env: dict | None = None,
                 cwd: str | Path | None = None, timeout_s: float | None = None) -> Measured:
    """Run ``cmd`` to completion; its output (stdout and stderr) goes to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = _cpu_jiffies()
    start = time.monotonic()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               cwd=cwd, text=True, errors="replace", bufsize=1)
    lines: list[tuple[float, str]] = []
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = sum(_memory_kb(pid) for pid in _descendants(process.pid))
            peak[0] = max(peak[0], total)
            stop.wait(SAMPLE_S)

    def read() -> None:
        with log_path.open("w", encoding="utf-8") as out:
            for line in process.stdout:
                lines.append((time.monotonic() - start, line.rstrip("\n")))
                out.write(line)

    sampler = threading.Thread(target=sample, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    sampler.start()
    reader.start()
    try:
        _, status, usage = os.wait4(process.pid, 0) if timeout_s is None else _wait4_timeout(process, timeout_s)
    finally:
        stop.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    sampler.join()
    wall = time.monotonic() - start
    busy1, total1 = _cpu_jiffies()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    ours = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    foreign = max(0.0, (busy1 - busy0) / hz - ours) / max(1e-9, (total1 - total0) / hz)
    return Measured(process.returncode, wall, peak[0] / 1024, usage.ru_maxrss / 1024, foreign,
                    str(log_path), lines)


def _wait4_timeout(process: subprocess.Popen, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            process.kill()
            return os.wait4(process.pid, 0)
        time.sleep(0.2)


if __name__ == "__main__":  # python -m benchmarks.measure CMD...: measure any command
    result = run_measured(sys.argv[1:], "/dev/stdout")
    print(result)
