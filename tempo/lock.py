"""One live run per run directory: a lock file holding the owner's pid.

Two runs writing one metrics.jsonl and one checkpoints/ folder would corrupt both. A lock
left by a process that died (killed, preempted) is taken over, with a warning.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from tempo.errors import ConfigError

log = logging.getLogger("tempo")
LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def hold(run_dir: Path):
    """Hold `run_dir` for this process while the block runs."""
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = path.read_text().strip()
            holder = int(text) if text.isdigit() else 0
            if holder and holder != os.getpid() and _alive(holder):
                raise ConfigError(f"run.out_dir: {run_dir} is in use by another tempo run (pid {holder}); "
                                  f"choose another run.out_dir or stop that run") from None
            log.warning("taking over %s from a process that is gone (pid %s)", path, text or "unknown")
            path.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
