"""How visiontune runs on several processes, and how the processes wait for each other.

The same command runs unchanged under every launcher that sets the ``env://`` variables of
torch.distributed (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

- ``torchrun --nproc_per_node=N`` on one machine, and ``torchrun --nnodes=M --node_rank=i
  --master_addr=HOST --master_port=PORT`` (or ``--rdzv_backend=c10d``) on several;
- Azure ML's ``distribution: {type: pytorch, process_count_per_instance: N}`` with
  ``instance_count: M``: it starts the N x M processes itself and sets those variables (and
  NODE_RANK) for each, so no torchrun is needed. accelerate, which the Trainer uses, reads them
  and joins the process group (NCCL on GPUs, gloo on the CPU).

Rank 0 alone prints, writes the outputs and (in the pipeline) evaluates; the other ranks wait for
it at a barrier of their own gloo group. That group has a long timeout, because writing a large
model to a mounted folder or evaluating a large test set can take longer than the training's
collective timeout, and gloo notices a dead peer at once: if rank 0 fails, the waiting ranks stop
within seconds with one line instead of hanging until a timeout.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from visiontune import settings
from visiontune.errors import UserError
from visiontune.ranks import is_main_process, launched, local_rank, rank, world_size

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Rank 0's own work (outputs, MLflow model, evaluation) while the others wait; a dead rank 0 is
# noticed at once, so this only bounds a rank 0 that hangs.
MAIN_PROCESS_WAIT = timedelta(hours=6)
_SHARED_CHECK_FILE = ".visiontune_shared_folder_check"
# A network mount may show another node's new file a little late: look again for this long
# before calling the folder unshared (the environment variable changes it).
SHARED_FOLDER_WAIT_VAR = "VISIONTUNE_SHARED_FOLDER_WAIT_S"

_wait_group = None
_added_env: dict[str, str] = {}


class RankZeroFailed(UserError):
    """Another rank stopped; the reason is in rank 0's log (exit code 1: not an input error)."""

    exit_code = 1


def check_launch_environment() -> None:
    """A half-described process group fails here in one line, before anything is loaded.

    Without LOCAL_RANK accelerate would not start a GPU process group and every process would
    train alone on all the data; without MASTER_ADDR/MASTER_PORT the rendezvous waits forever."""
    if world_size() <= 1:
        return
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise UserError(
            f"distributed run (WORLD_SIZE={world_size()}) without {', '.join(missing)}: launch with "
            "torchrun, or set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every "
            "process (Azure ML's distribution: pytorch does)"
        )
    if not 0 <= rank() < world_size():
        raise UserError(f"RANK={rank()} is not within WORLD_SIZE={world_size()}")
    if torch.cuda.is_available() and local_rank() >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local_rank()} but this node has {torch.cuda.device_count()} GPU(s): start at "
            "most one process per GPU (Azure ML: process_count_per_instance <= GPUs per node)"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_one_process_world() -> bool:
    """Describe a one-process group when no launcher did; returns whether it had to.

    DeepSpeed's initialisation looks for the env:// variables and otherwise turns to MPI (asking
    for mpi4py); a run started with plain ``python`` is a world of one, so it says so.
    ``end_one_process_world`` takes the variables and the group away again, so that an
    in-process caller is left as it was."""
    if launched():
        return False
    added = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    _added_env.update(added)
    return True


def end_one_process_world() -> None:
    global _wait_group
    if not _added_env:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None
    for name in list(_added_env):
        os.environ.pop(name, None)
    _added_env.clear()


def leave_after_failure() -> None:
    """Leave the process group when this process stops on an error.

    A process that exits while its group's threads still wait for a peer that has gone is
    aborted at interpreter exit ("terminate called without an active exception", SIGABRT): its
    exit code would no longer say what happened."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway; the original error is the one to report
            pass
    _wait_group = None


def _group():
    """The gloo group rank 0's followers wait on (made once, by every rank at the same point)."""
    global _wait_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=MAIN_PROCESS_WAIT)
    return _wait_group


def prepare() -> None:
    """Make the waiting group while every rank is certainly alive (right after the Trainer
    joined the process group), so that a later wait never blocks on building it."""
    _group()


def barrier() -> None:
    """Every rank has reached this point (no-op on one process)."""
    group = _group()
    if group is not None:
        dist.barrier(group=group)


def wait_for_main_process(what: str) -> None:
    """Every rank returns only once rank 0 is done with ``what``; if rank 0 died, one line."""
    group = _group()
    if group is None:
        return
    try:
        dist.barrier(group=group)
    except RuntimeError as exc:
        if is_main_process():
            raise
        leave_after_failure()
        raise RankZeroFailed(
            f"rank {rank()}: stopped waiting for rank 0 ({what}): another process ended first; "
            "its log says why"
        ) from exc


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective: every rank must call it)."""
    group = _group()
    if group is None:
        return value
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except RuntimeError as exc:
        if is_main_process():
            raise
        leave_after_failure()
        raise RankZeroFailed(f"rank {rank()}: rank 0 ended before sharing its state") from exc
    return box[0]


def _sees(marker: Path, token: str, patience_s: float) -> bool:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if marker.read_text(encoding="utf-8").strip() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_shared_folder(folder: Path, input_name: str) -> None:
    """Every rank must see what rank 0 writes into ``folder``: the best model, checkpoints to
    resume from and the outputs are written once, by rank 0, and read by every rank.

    Checked before training, with every rank failing together, rather than when the best model is
    loaded at the end of a long run."""
    group = _group()
    if group is None:
        return
    token = broadcast_from_main(secrets.token_hex(8) if is_main_process() else None)
    marker = folder / _SHARED_CHECK_FILE
    if is_main_process():
        marker.write_text(token, encoding="utf-8")
    wait_for_main_process("checking the output folder")
    seen = _sees(marker, token, settings.number(SHARED_FOLDER_WAIT_VAR))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (rank(), socket.gethostname(), seen), group=group)
    if is_main_process():
        marker.unlink(missing_ok=True)
    blind = [(r, host) for r, host, ok in everyone if not ok]
    if blind:
        who = ", ".join(f"rank {r} on {host}" for r, host in blind)
        raise UserError(
            f"--{input_name}: {folder} is not shared by all processes ({who} cannot see what "
            "rank 0 writes there); multi-node training needs one shared folder (Azure ML: "
            "set the output's mode to mount, not upload)"
        )
