"""Which process writes: under torchrun every rank runs the same loop, rank 0 writes files."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """Processes started by torchrun (WORLD_SIZE), 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its GPU (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group() -> None:
    """NCCL on GPUs, gloo on CPU; torchrun's env://, or a one-process group without torchrun."""
    if dist.is_initialized():
        return
    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if "RANK" in os.environ:  # torchrun
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
