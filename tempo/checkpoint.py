"""Periodic checkpoints that a kill cannot tear, and finding the newest whole one to resume.

A checkpoint is a directory `checkpoints/step_<k>/`: the policy and the critic (safetensors,
Hugging Face layout, with their optimiser states), `trainer_state_rank<r>.pt` (every RNG, the prompt
cyclers' positions, the counters), a copy of the run's `config.yaml`, and `manifest.json`
(each file's size and SHA-256), written last. It is built in a temporary directory beside its
target and renamed into place after every file is fsynced; `checkpoints/latest` names it only
after that. A directory whose manifest is missing or does not match its files (killed
mid-write, truncated later) is never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from tempo import dist

log = logging.getLogger("tempo")

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step_"


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def commit(tmp: Path, step: int, keep: int) -> Path:
    """Seal a fully written temporary checkpoint directory as `step_<step>` (rank 0 only)."""
    files = _files(tmp)
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                        for p in files}}
    for p in files:
        _fsync(p)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda d: -len(d.parts)):
        _fsync(d)
    final = tmp.parent / f"{PREFIX}{step}"
    if final.exists():  # a checkpoint of this step left by an earlier life of the run
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = tmp.parent / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    pointer.rename(tmp.parent / LATEST)
    _fsync(tmp.parent)
    _prune(tmp.parent, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(_steps(directory), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def _steps(directory: Path) -> list[Path]:
    return [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]


def temporary(run_dir: Path, step: int) -> Path:
    """The directory a checkpoint is written into before `commit`; stale ones are removed."""
    directory = root(run_dir)
    if dist.is_main():
        for stale in directory.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return directory / f".tmp-{PREFIX}{step}"


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None when it is whole."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the write did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    for name, want in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of a run; torn or truncated ones are skipped with a warning."""
    directory = root(run_dir)
    if not directory.is_dir():
        return None
    for path in sorted(_steps(directory), key=_step_of, reverse=True):
        why = problem(path)
        if why is None:
            return path
        log.warning("checkpoint %s skipped: %s", path, why)
    return None


def clear(run_dir: Path) -> int:
    """Remove a run directory's checkpoints (a fresh start into an old run directory)."""
    directory = root(run_dir)
    if not directory.is_dir():
        return 0
    count = len(_steps(directory))
    shutil.rmtree(directory)
    return count
