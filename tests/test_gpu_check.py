"""benchmarks/gpu_check.py's logic on CPU (--smoke: tiny shapes), so that the GPU check a lent
machine runs once does not fail on a bug that CPU could have shown."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--smoke", "--profile"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "system.md").is_file()
    assert "M-step" in (out / "profile.txt").read_text()  # the profiled step's table
    return json.loads((out / "system.json").read_text())


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_tempo_steps_on_both_backends(smoke, backend):
    res = smoke["parts"][backend]
    assert "error" not in res, res.get("error")
    assert res["backend"] == backend and res["finite"]
    assert len(res["step_s"]) == 1 and res["completion_tokens_per_s"] > 0
    # every phase of a TEMPO step was timed, and they fit in the step
    assert {"rollout", "critic forward", "E-step", "M-step", "weight sync"} <= set(res["phase_share"])
    assert 0 < sum(res["phase_share"].values()) <= 1.01
    assert res["model_tflops_per_step"] > 0 and 0 <= res["mfu"] < 1
    assert math.isfinite(res["last_step"]["critic/value_loss"])


def test_vote_and_vllm_report_what_this_machine_lacks(smoke):
    assert smoke["parts"]["vote"]["status"] == "C++ only: no GPU" and smoke["parts"]["vote"]["cpp_ms"] > 0
    assert smoke["parts"]["vllm"]["status"].startswith("not available on this machine")
    assert smoke["env"]["vote_extension"] in ("C++ only", "C++ and CUDA")
