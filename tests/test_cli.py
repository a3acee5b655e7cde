"""The `tempo` command: help texts, and one-line errors with exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from tempo.cli import main
from tempo.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    exe = Path(sys.executable).with_name("tempo")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_describes_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("train", "eval", "compare", "config", "E-step", "M-step"):
        assert word in out.stdout
    out = run_cli("train", "--help")
    assert out.returncode == 0
    assert "--config" in out.stdout and "section.key=value" in out.stdout and "metrics.jsonl" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "train.stesp=3"], "unknown key 'train.stesp' (did you mean 'train.steps'?)"),
    (["train", "train.steps=many"], "train.steps: expected an integer"),
    (["train", "--config", "configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    (["train", "data.source=files", "data.unlabeled_files=/nonexistent/d.json"], "/nonexistent/d.json"),
    (["train", "algorithm.method=ttlr"], "did you mean 'ttrl'?"),
    (["train", "task.stage1_max_ops=9"], "task.stage1_max_ops: must be between task.min_ops and task.max_ops"),
    (["train", "task.ops=+/"], "task.ops: '+/' must be some of +, - and *"),
    (["train", "task.ops=+-", "task.stage1_ops=*"], "task.stage1_ops: '*' must be some of task.ops ('+-')"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    out = run_cli("--debug", "train", "train.stesp=3")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_default_config_file_loads():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    assert cfg.algorithm.method == "tempo" and cfg.data.source == "embedded"


def test_config_keys_lists_every_key_with_its_help():
    from tempo.config import describe_keys

    out = run_cli("config", "--keys")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    keys = describe_keys()
    assert len(lines) == len(keys) > 100
    for (name, _, _, help), line in zip(keys, lines):
        assert len(help.split()) >= 2, name  # a description, not a placeholder
        assert line.startswith(name) and line.rstrip().endswith(help), name
