"""Helpers shared by several test modules (their fixtures are in conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tempo.config import BaseModelConfig, load_config
from torchrun_megatron import token_batch

TESTS = Path(__file__).parent
# Layouts, backends and processes must agree within this (see tests/torchrun_megatron.py's OPTIM).
TOL = 1e-5

# -- the micro model's runs -------------------------------------------------------------------

MICRO = BaseModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, ffn_size=32)


def micro_overrides(tmp_path, policy_path, *extra) -> list[str]:
    """The overrides of a run on the micro model; later ones (`extra`) win."""
    return [
        f"model.policy_path={policy_path}", f"run.out_dir={tmp_path / 'run'}", f"base_model.cache_dir={tmp_path / 'cache'}",
        "task.num_labeled=8", "task.num_unlabeled=8", "task.num_heldout=4", "task.min_ops=1", "task.max_ops=2",
        "rollout.n=4", "rollout.max_new_tokens=12", "train.prompts_per_step=4", "train.labeled_per_step=2",
        "train.micro_batch_size=8", "train.steps=2", "eval.every=1", "eval.k=4", "eval.pass_k=2",
        "stage1.steps=1", "stage1.critic_epochs=1", "algorithm.filter_groups=false",
        "run.progress=false", "run.tensorboard=false", *extra,
    ]


def micro_config(tmp_path, policy_path, *extra):
    return load_config(None, micro_overrides(tmp_path, policy_path, *extra))


def read(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- processes under torchrun -----------------------------------------------------------------

def torchrun(nproc: int, *args: str, worker: str, timeout: int = 300) -> None:
    """Launch tests/`worker` on `nproc` gloo processes; fail with their output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TESTS / worker), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def assert_same_run(got: dict, ref: dict, tol: float = TOL) -> None:
    # Padding columns are never read; under a sliding window some have no key to attend to,
    # and each implementation fills those rows its own way.
    valid = token_batch().response_mask.bool()
    for part in ("policy_infer", "critic_infer", "policy_infer_after"):
        for key in ref[part]:
            diff = (got[part][key] - ref[part][key])[valid].abs().max().item()
            assert diff < tol, f"{part}/{key} differs by {diff}"
    for part in ("policy_step", "critic_step"):
        for key, value in ref[part].items():
            assert got[part][key] == pytest.approx(value, rel=tol, abs=tol), f"{part}/{key}"
    for part in ("policy_weights", "critic_weights"):
        assert set(got[part]) == set(ref[part])
        for name, value in ref[part].items():
            diff = (got[part][name] - value).abs().max().item()
            assert diff < tol, f"{part}/{name} differs by {diff} after one step"
