"""Which process writes: under torchrun every rank runs the same loop, rank 0 writes files."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    """Ranks other than 0 wait for a file that rank 0 is building (before any process group)."""
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank {os.environ.get('RANK')}: gave up waiting for {path}")
        time.sleep(1.0)
