"""This process's place in a distributed run, read from the launcher's ``env://`` variables
(RANK, LOCAL_RANK, WORLD_SIZE; see ``training/distributed.py``). Without torch: the CLI asks
before any command loads it, to decide which process logs."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun, Azure ML) described the process group in the environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ
