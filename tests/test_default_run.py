"""The embedded default end to end (`make run`'s job), in a temporary directory: slow."""
from pathlib import Path

import pytest

from tempo.config import load_config
from tempo.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.mark.slow
def test_default_config_runs_to_its_summary(tmp_path):
    cfg = load_config(CONFIG, [f"run.out_dir={tmp_path / 'run'}", f"base_model.cache_dir={tmp_path / 'cache'}",
                               "run.progress=false"])
    summary = train(cfg)
    assert summary["final"]["step"] == cfg.train.steps
    # The warm-started base model is weak but not hopeless on D_U: the task is calibrated so.
    assert 0.05 <= summary["base"]["mean@k"] <= 0.6
    assert (tmp_path / "run" / "summary.md").read_text().count("|") > 20
