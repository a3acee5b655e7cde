"""Checkpoints, exact resume after SIGKILL, torn checkpoints, config changes and non-finite updates."""
import json
import logging
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tempo import algorithm, checkpoint
from tempo.errors import NonFiniteError, ResumeError
from tempo.train import train
from helpers import micro_config, micro_overrides, read

STEPS = 4

# A run that SIGKILLs itself: right after the checkpoint of step `kill` is sealed (between
# steps), or when the checkpoint of step `kill + 1` has its files written but is not sealed yet
# (during the write).
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    kill, where = int(sys.argv[2]), sys.argv[3]
    from tempo import checkpoint
    from tempo.config import load_config
    from tempo.train import train
    commit = checkpoint.commit
    def dying_commit(tmp, step, keep):
        if where == "during-write" and step == kill + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        out = commit(tmp, step, keep)
        if where == "between-steps" and step == kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    checkpoint.commit = dying_commit
    train(load_config(None, sys.argv[4:]))
""")


def overrides(tmp_path, policy, name, *extra):
    return micro_overrides(tmp_path, policy, f"run.out_dir={tmp_path / name}", f"train.steps={STEPS}", "eval.every=2",
                           "run.checkpoint_every=1", *extra)


@pytest.mark.parametrize("where", ["between-steps", "during-write"])
def test_a_run_killed_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, micro_model, where):
    from tempo.config import load_config

    train(load_config(None, overrides(tmp_path, micro_model, "whole")))
    reference = read(tmp_path / "whole")

    args = overrides(tmp_path, micro_model, "killed")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(torch.get_num_threads()), "2", where, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "killed"
    assert checkpoint.latest(run).name == "step_2"
    assert max(r["step"] for r in read(run)) >= 2  # it got that far before the kill

    train(load_config(None, args + ["run.resume=auto"]))
    resumed = read(run)
    assert [(r["step"], r["phase"]) for r in resumed] == [(r["step"], r["phase"]) for r in reference]
    assert resumed == reference  # every metric of every step, to the last bit
    assert checkpoint.latest(run).name == f"step_{STEPS}"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the torn write was cleaned up


def test_a_torn_checkpoint_is_skipped_for_the_one_before(tmp_path, micro_model, caplog):
    from tempo.config import load_config

    train(load_config(None, overrides(tmp_path, micro_model, "run", "train.steps=3", "run.keep_checkpoints=0")))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_1", "step_2", "step_3"]
    weights = run / "checkpoints/step_3/policy/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after the fact
    with caplog.at_level(logging.WARNING, logger="tempo"):
        assert checkpoint.latest(run).name == "step_2"
    assert "step_3 skipped: policy/model.safetensors has" in caplog.text
    (run / "checkpoints/step_2/manifest.json").unlink()  # as if killed before it was sealed
    assert checkpoint.latest(run).name == "step_1"


def test_old_checkpoints_are_pruned_and_latest_points_at_the_newest(tmp_path, micro_model):
    from tempo.config import load_config

    train(load_config(None, overrides(tmp_path, micro_model, "run", "run.keep_checkpoints=2")))
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_3", "step_4"]
    assert (ckpts / "latest").read_text() == "step_4"
    manifest = json.loads((ckpts / "step_4/manifest.json").read_text())
    assert {"policy/model.safetensors", "critic/model.safetensors", "trainer_state_rank0.pt",
            "config.yaml"} <= set(manifest["files"])


def test_resume_refuses_a_changed_config_unless_forced(tmp_path, micro_model):
    from tempo.config import load_config

    args = overrides(tmp_path, micro_model, "run", "train.steps=2")
    train(load_config(None, args))
    with pytest.raises(ResumeError, match="differs from the checkpoint's in train.policy_lr"):
        train(load_config(None, args + ["train.policy_lr=0.1", "run.resume=auto"]))
    # More steps is allowed: a finished run is extended from its last checkpoint.
    train(load_config(None, args + ["train.steps=3", "run.resume=auto"]))
    assert [r["step"] for r in read(tmp_path / "run") if r["phase"] == "train"] == [1, 2, 3]
    train(load_config(None, args + ["train.policy_lr=0.1", "train.steps=4", "run.resume=force"]))
    assert [r["step"] for r in read(tmp_path / "run") if r["phase"] == "train"] == [1, 2, 3, 4]


def test_a_fresh_run_replaces_an_old_run_directory(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model, "train.steps=1")
    train(cfg)
    train(cfg)
    assert [r["step"] for r in read(tmp_path / "run") if r["phase"] == "train"] == [1]


def test_non_finite_policy_loss_skips_the_update_and_stops_the_run(tmp_path, micro_model, monkeypatch):
    from tempo.config import load_config

    def nan_loss(logp, *args, **kwargs):
        loss, stats = real(logp, *args, **kwargs)
        return loss * float("nan"), stats

    real = algorithm.policy_loss
    monkeypatch.setattr(algorithm, "policy_loss", nan_loss)
    args = overrides(tmp_path, micro_model, "run", "train.max_bad_steps=3", "run.checkpoint_every=1")
    with pytest.raises(NonFiniteError, match=r"M-step \(policy\): 3 steps in a row up to step 3"):
        train(load_config(None, args))
    rows = [r for r in read(tmp_path / "run") if r["phase"] == "train"]
    assert [r["actor/nonfinite"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["critic/nonfinite"] == 0.0 for r in rows)  # the E-step still learns
    # The policy never moved, and the checkpoints written before the stop are whole.
    start = load_file(next((tmp_path / "cache").glob("stage1-*/policy/model.safetensors")))
    kept = checkpoint.latest(tmp_path / "run")
    assert kept is not None and kept.name == "step_2"
    after = load_file(kept / "policy/model.safetensors")
    assert all(torch.equal(start[k], after[k]) for k in start)
    critic_start = load_file(next((tmp_path / "cache").glob("stage1-*/critic/model.safetensors")))
    critic_after = load_file(kept / "critic/model.safetensors")
    assert any(not torch.equal(critic_start[k], critic_after[k]) for k in critic_start)


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, micro_model, monkeypatch):
    from tempo.config import load_config

    calls = {"n": 0}

    def nan_once(logp, *args, **kwargs):
        calls["n"] += 1
        loss, stats = real(logp, *args, **kwargs)
        return (loss * float("inf") if calls["n"] == 1 else loss), stats

    real = algorithm.policy_loss
    monkeypatch.setattr(algorithm, "policy_loss", nan_once)
    train(load_config(None, overrides(tmp_path, micro_model, "run", "train.max_bad_steps=2",
                                      "train.mini_batches=1", "stage1.steps=0")))
    rows = [r for r in read(tmp_path / "run") if r["phase"] == "train"]
    assert [r["actor/nonfinite"] for r in rows] == [1.0, 0.0, 0.0, 0.0]


def test_non_finite_critic_values_skip_the_step_and_name_the_e_step(tmp_path, micro_model, monkeypatch):
    from tempo.config import load_config
    from tempo.models.hf import HFModel

    def nan_values(self, batch):
        out = real(self, batch)
        return {"values": out["values"] * float("nan")} if self.kind == "critic" else out

    real = HFModel.forward
    monkeypatch.setattr(HFModel, "forward", nan_values)
    args = overrides(tmp_path, micro_model, "run", "train.max_bad_steps=2", "stage1.steps=0", "stage1.critic_epochs=0")
    with pytest.raises(NonFiniteError, match=r"E-step \(critic\): 2 steps in a row"):
        train(load_config(None, args))
    rows = [r for r in read(tmp_path / "run") if r["phase"] == "train"]
    assert [(r["nonfinite_values"], r["skipped_step"]) for r in rows] == [(1.0, 1.0), (1.0, 1.0)]
    assert "actor/pg_loss" not in rows[0]  # neither model was updated


def test_the_default_configs_shapes_resume_exactly_across_every_cycle(tmp_path):
    """The default config's shapes (model, 32 prompts × 8 samples × 48 tokens, two mini-batches)
    on a random model (exactness does not need a trained one): killed after step 4's checkpoint
    and resumed, then on to step 12, past D_L's reshuffle (step 9) and D_U's (step 11)."""
    from pathlib import Path

    from tempo.base_model import build_tiny_qwen3
    from tempo.config import BaseModelConfig, load_config
    from tempo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    build_tiny_qwen3(BaseModelConfig(), len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")

    def args(name):
        return ["--config", config, f"model.policy_path={tmp_path / 'model'}", "stage1.critic_epochs=0",
                "train.steps=12", "eval.every=100", "eval.max_prompts=32", "run.checkpoint_every=2", "run.progress=false",
                "run.tensorboard=false", f"run.out_dir={tmp_path / name}", f"base_model.cache_dir={tmp_path / 'cache'}"]

    def cli(*extra):  # through the CLI, as a user runs it
        return subprocess.run([sys.executable, "-m", "tempo.cli", "train", *extra], capture_output=True, text=True,
                              timeout=600)

    assert cli(*args("whole")).returncode == 0
    killed = textwrap.dedent("""
        import os, signal, sys
        from tempo import checkpoint
        commit = checkpoint.commit
        def dying_commit(tmp, step, keep):
            out = commit(tmp, step, keep)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        checkpoint.commit = dying_commit
        from tempo.cli import main
        main(["train", *sys.argv[1:]])
    """)
    proc = subprocess.run([sys.executable, "-c", killed, *args("killed")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = cli(*args("killed"), "--resume")
    assert proc.returncode == 0 and "(step 4)" in proc.stderr, proc.stderr[-2000:]
    reference, resumed = read(tmp_path / "whole"), read(tmp_path / "killed")
    assert [r["step"] for r in resumed if r["phase"] == "train"] == list(range(1, 13))
    assert resumed == reference  # every metric of every step, to the last bit
