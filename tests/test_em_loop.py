"""The EM loop end to end on a model of a few thousand parameters, and its config errors."""
import json
import os

import pytest
import torch

from tempo.config import load_config
from tempo.errors import ConfigError
from tempo.train import train
from helpers import micro_config, read

def test_two_em_steps(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model)
    summary = train(cfg)
    run = tmp_path / "run"
    rows = read(run)
    train_rows = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    for r in train_rows:
        assert r["recalibrations"] == r["step"]  # tempo: an E-step every step
        assert all(k in r for k in ("actor/pg_loss", "critic/value_loss", "drift/pseudo_acc", "no_answer_frac"))
        assert torch.isfinite(torch.tensor(r["actor/grad_norm"]))
    for key in ("mean@k", "pass@k", "maj@k", "distinct_answers", "critic_auroc_heldout", "no_answer_frac"):
        assert key in evals[-1]
    assert summary["final"]["step"] == 2
    for name in ("config.yaml", "summary.md", "curves.png", "checkpoints/step_2/policy/model.safetensors",
                 "checkpoints/step_2/critic/model.safetensors", "checkpoints/step_2/trainer_state_rank0.pt",
                 "checkpoints/step_2/manifest.json", "checkpoints/latest"):
        assert (run / name).is_file(), name
    # Stage 1 is cached: its models exist and a second run reuses them.
    assert len(list((tmp_path / "cache").glob("stage1-*/critic/config.json"))) == 1


def test_same_seed_same_metrics(tmp_path, micro_model):
    firsts = []
    for i in range(2):
        cfg = micro_config(tmp_path / str(i), micro_model, "train.steps=1", "run.save_checkpoints=false")
        train(cfg)
        firsts.append(read(tmp_path / str(i) / "run"))
    assert firsts[0] == firsts[1]


@pytest.mark.parametrize("method", ["ttrl", "empo", "m-step-only", "tempo-fixed-critic", "rlvr", "tempo-adaptive",
                                    "tempo-outcome", "grpo"])
def test_methods_are_configs(tmp_path, micro_model, method):
    cfg = micro_config(tmp_path, micro_model, f"algorithm.method={method}", "train.steps=1",
                       "eval.every=5", "run.save_checkpoints=false", "stage1.steps=0", "stage1.critic_epochs=0")
    train(cfg)
    step = [r for r in read(tmp_path / "run") if r["phase"] == "train"][0]
    # RLVR and TEMPO-outcome recalibrate at step 1; adaptive TEMPO takes its Brier yardstick there.
    assert step["recalibrations"] == (1 if method in ("rlvr", "tempo-outcome") else 0)
    assert ("critic/value_loss" in step) == (method in ("rlvr", "tempo-outcome"))
    # RLVR and GRPO draw labeled prompts only: no pseudo-reward to monitor.
    assert ("drift/pseudo_acc" in step) == (method not in ("rlvr", "grpo"))
    assert ("labeled_acc" in step) == (method not in ("ttrl", "empo", "m-step-only"))


def test_empty_labeled_set_is_a_config_error(tmp_path, micro_model):
    with pytest.raises(ConfigError, match="D_L is empty"):
        train(micro_config(tmp_path, micro_model, "task.num_labeled=0", "stage1.steps=0", "stage1.critic_epochs=0"))


def test_empty_unlabeled_set_is_a_config_error(tmp_path, micro_model):
    with pytest.raises(ConfigError, match="D_U is empty"):
        train(micro_config(tmp_path, micro_model, "task.num_unlabeled=0", "stage1.steps=0", "stage1.critic_epochs=0"))


def first_step(tmp_path, micro_model, kernels):
    cfg = micro_config(tmp_path / kernels, micro_model, f"model.kernels={kernels}", "train.steps=1",
                       "eval.every=5", "run.save_checkpoints=false")
    train(cfg)
    return read(tmp_path / kernels / "run")


def test_fused_ops_match_the_references_in_the_loop(tmp_path, micro_model, monkeypatch):
    """The whole loop with the kernels' PyTorch path (and Triton, in the interpreter) gives the
    same metrics as with the materialised float references."""
    kinds = ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    runs = {k: first_step(tmp_path, micro_model, k) for k in kinds}
    ref = runs["reference"]
    for kind in kinds[1:]:
        for row_ref, row in zip(ref, runs[kind], strict=True):
            assert row_ref.keys() == row.keys()
            for key, value in row_ref.items():
                if isinstance(value, float):
                    assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (kind, key)
                else:
                    assert row[key] == value, (kind, key)


@pytest.mark.parametrize("method", ["tempo", "ttrl"])
def test_model_kernels_reaches_every_kernel_call_of_a_step(tmp_path, micro_model, monkeypatch, method):
    """model.kernels is an argument, not process state: every dispatch of a run (stage 1, the
    EM step, evaluation) is called with it."""
    import tempo_kernels

    seen = []
    for name in ("linear_logprob", "policy_loss", "em_token_advantage", "group_advantage"):
        def spy(*args, _real=getattr(tempo_kernels, name), _name=name, backend="auto", **kw):
            seen.append((_name, backend))
            return _real(*args, backend=backend, **kw)

        monkeypatch.setattr(tempo_kernels, name, spy)
    train(micro_config(tmp_path, micro_model, "model.kernels=reference", f"algorithm.method={method}",
                       "train.steps=1", "eval.every=5", "run.save_checkpoints=false"))
    advantage = "em_token_advantage" if method == "tempo" else "group_advantage"  # (stage 1's RLVR: em_token)
    assert {"linear_logprob", "policy_loss", advantage} <= {name for name, _ in seen}
    assert {backend for _, backend in seen} == {"reference"}


def test_eval_command_scores_a_checkpoint(tmp_path, micro_model, capsys):
    from tempo.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(micro_config(tmp_path, micro_model), micro_model)
    assert 0.0 <= metrics["mean@k"] <= metrics["pass@k"] <= 1.0
    assert "mean@k" in capsys.readouterr().out


def test_rollouts_concat_repads_prompts_left_and_responses_right():
    from tempo.rollout.base import Rollouts

    def make(P, R, fill):
        return Rollouts(torch.full((1, P), fill), torch.ones(1, P, dtype=torch.long), torch.full((1, R), fill),
                        torch.ones(1, R), torch.zeros(1, R), [str(fill)], torch.zeros(1, dtype=torch.bool))

    both = Rollouts.concat([make(2, 3, 7), make(4, 1, 8)], pad_id=0)
    assert both.prompt_ids.tolist() == [[0, 0, 7, 7], [8, 8, 8, 8]]
    assert both.prompt_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert both.response_ids.tolist() == [[7, 7, 7], [8, 0, 0]]
    assert both.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert both.select(torch.tensor([1])).texts == ["8"]


def test_group_filtering_accumulates_generation_batches(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model, "algorithm.filter_groups=true", "algorithm.max_gen_batches=3",
                       "train.steps=1", "eval.every=5", "run.save_checkpoints=false")
    train(cfg)
    step = [r for r in read(tmp_path / "run") if r["phase"] == "train"][0]
    assert 1 <= step["gen_batches"] <= 3
    assert step["dropped_groups"] >= 0 and "labeled_acc" in step


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model, "train.steps=1", "run.save_checkpoints=false")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(ConfigError, match=rf"in use by another tempo run \(pid {os.getppid()}\)"):
        train(cfg)
    assert not (run / "metrics.jsonl").exists()


def test_a_stale_lock_from_a_dead_run_is_taken_over(tmp_path, micro_model, caplog):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    cfg = micro_config(tmp_path, micro_model, "train.steps=1", "run.save_checkpoints=false")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(str(dead.pid))
    with caplog.at_level("WARNING", logger="tempo"):
        train(cfg)
    assert "taking over" in caplog.text
    assert (run / "metrics.jsonl").exists() and not (run / "run.lock").exists()


def test_eval_scores_a_checkpoint_with_only_a_d_u_file(tmp_path, micro_model, capsys):
    from tempo.cli import main

    d_u = tmp_path / "d_u.jsonl"
    d_u.write_text("".join(json.dumps({"prompt": f"{i}+1 mod 7\n", "answer": str((i + 1) % 7)}) + "\n" for i in range(5)))
    code = main(["eval", "--config", "none", "--checkpoint", micro_model, "data.source=files",
                 f"data.unlabeled_files=[{d_u}]", "eval.k=2", "eval.pass_k=1", "rollout.max_new_tokens=8"])
    assert code == 0
    table = capsys.readouterr().out
    assert micro_model in table and "mean@k" in table


def test_profile_window_traces_the_phases_of_its_steps(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model, "train.steps=3", "eval.every=5", "run.save_checkpoints=false",
                       "run.profile_steps=2-3")
    train(cfg)
    trace = json.loads((tmp_path / "run" / "profile" / "steps_2-3.json").read_text())
    names = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"]
    for phase in ("rollout", "values", "advantages", "E-step", "M-step", "weight sync"):
        assert names.count(phase) == 2, phase  # one range a step, two steps in the window
    table = (tmp_path / "run" / "profile" / "steps_2-3.txt").read_text()
    assert "M-step" in table and "Self CPU" in table


@pytest.mark.parametrize("text", ["3", "a-b", "0-2", "4-2", "2:3"])
def test_bad_profile_window_is_a_config_error(text):
    with pytest.raises(ConfigError, match="run.profile_steps"):
        load_config(None, [f"run.profile_steps={text}"])


def test_stage1_critic_stops_on_its_held_out_questions_and_reports_it(tmp_path, micro_model):
    cfg = micro_config(tmp_path, micro_model, "train.steps=0", "task.num_stage1=12", "stage1.steps=0",
                       "stage1.critic_epochs=40", "stage1.critic_validation=4", "stage1.critic_batch=16",
                       "stage1.critic_lr=0.02")
    train(cfg)
    (built,) = (tmp_path / "cache").glob("stage1-*/build.json")
    fit = json.loads(built.read_text())
    assert fit["rows"] == (12 - 4) * cfg.rollout.n  # the held-out questions' rows are not fitted
    assert 1 <= fit["epochs"] < 40  # stopped by the rule, not the cap: 32 rows are soon fitted
    assert "validation_auroc" in fit and fit["validation_loss"] > 0  # (AUROC NaN: the micro model is never right)


def test_stage1_critic_stops_when_its_held_out_auroc_reaches_the_target(tmp_path, boxed_writer):
    # The writer answers a random digit, right about 1 time in 7: the AUROC is a number.
    def fit(target):
        cfg = micro_config(tmp_path / str(target), boxed_writer, "train.steps=0", "task.num_stage1=40",
                           "task.modulus=7", "stage1.steps=0", "stage1.critic_epochs=3", "stage1.critic_samples=3",
                           "stage1.critic_validation=24", "stage1.critic_batch=8", "stage1.critic_decay=true",
                           f"stage1.critic_target_auroc={target}")
        train(cfg)
        (built,) = (tmp_path / str(target) / "cache").glob("stage1-*/build.json")
        return json.loads(built.read_text())

    reached = fit(0.0)  # any AUROC reaches 0
    assert reached["epochs"] == 1 and reached["validation_auroc"] >= 0.0
    assert reached["rows"] == (40 - 24) * 3  # stage1.critic_samples responses a question, not rollout.n


def test_stage1_critic_under_the_retry_auroc_starts_over_from_its_trunk_at_the_retry_rate(tmp_path, boxed_writer):
    """A fit that ends under stage1.critic_retry_below is the fit a fresh critic at
    stage1.critic_retry_lr makes on the same rollouts; the first one is reported beside it."""
    def fit(name, *overrides):
        cfg = micro_config(tmp_path / name, boxed_writer, "train.steps=0", "task.num_stage1=40", "task.modulus=7",
                           "stage1.steps=0", "stage1.critic_epochs=1", "stage1.critic_samples=3",
                           "stage1.critic_validation=24", "stage1.critic_batch=8", *overrides)
        train(cfg)
        (built,) = (tmp_path / name / "cache").glob("stage1-*/build.json")
        return json.loads(built.read_text())

    retried = fit("retried", "stage1.critic_lr=0.02", "stage1.critic_retry_lr=0.001", "stage1.critic_retry_below=1")
    fresh = fit("fresh", "stage1.critic_lr=0.001")
    first = fit("first", "stage1.critic_lr=0.02")
    assert retried["first_fit"] == first
    assert {k: v for k, v in retried.items() if k != "first_fit"} == fresh
    assert fresh["validation_loss"] != first["validation_loss"]
    assert "first_fit" not in fit("passed", "stage1.critic_lr=0.02", "stage1.critic_retry_lr=0.001",
                                  "stage1.critic_retry_below=0")


def test_regime_check_reads_the_held_out_slice():
    from tempo.report import regime

    base = {"mean@k": 0.1, "maj@k": 0.1, "heldout_mean@k": 0.40, "heldout_maj@k": 0.52, "critic_auroc_heldout": 0.79}
    text = regime(base)
    assert "critic AUROC 0.790 (FAILS: a useful verifier needs 0.80)" in text
    assert "maj@k − mean@k +12.0 points (passes" in text  # the held-out slice's, not D_U's 0.0


def test_evaluation_leaves_the_training_trajectory_alone(tmp_path, micro_model):
    """Evaluating every step or only at the end: the same training steps, the same final scores."""
    runs = {}
    for every in (1, 3):
        train(micro_config(tmp_path / str(every), micro_model, "train.steps=3", f"eval.every={every}",
                           "run.save_checkpoints=false"))
        runs[every] = read(tmp_path / str(every) / "run")
    assert [r for r in runs[1] if r["phase"] == "train"] == [r for r in runs[3] if r["phase"] == "train"]
    final = [[r for r in runs[every] if r["phase"] == "eval"][-1] for every in (1, 3)]
    assert final[0] == final[1] and final[0]["step"] == 3


def test_compare_tabulates_named_steps_over_seeds(tmp_path, micro_model):
    from tempo.compare import compare

    cfg = micro_config(tmp_path, micro_model, "train.steps=3", "eval.every=2", "run.save_checkpoints=false")
    with pytest.raises(ConfigError, match="--at 1"):
        compare(cfg, ["tempo"], str(tmp_path / "cmp"), [0], at=[1])
    text = compare(cfg, ["tempo", "ttrl"], str(tmp_path / "cmp"), [0, 1], at=[2, 3])
    assert "## Step 2" in text and "## Step 3" in text and "Final step" not in text
    for method in ("tempo", "ttrl"):
        finals = [[r for r in read(tmp_path / "cmp" / method / f"seed{s}") if r["phase"] == "eval"][-1]
                  for s in (0, 1)]
        assert [r["step"] for r in finals] == [3, 3]
        row = next(line for line in text.split("## Step 3")[1].splitlines() if line.startswith(f"| {method} |"))
        mean = sum(r["mean@k"] for r in finals) / 2
        assert row.split(" | ")[1].startswith(f"{mean:.3f} ± ")
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # finished runs under the same config are read, not run again; another config runs again
    metrics = tmp_path / "cmp" / "tempo" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    cfg.base_model.cache_dir, cfg.run.tensorboard = str(tmp_path / "moved-cache"), not cfg.run.tensorboard
    assert compare(cfg, ["tempo", "ttrl"], str(tmp_path / "cmp"), [0, 1], at=[2, 3]) == text  # beside the result
    assert metrics.stat().st_mtime_ns == stamp
    cfg.algorithm.clip_high = 0.001
    compare(cfg, ["tempo"], str(tmp_path / "cmp"), [0], at=[2, 3])
    assert metrics.stat().st_mtime_ns != stamp
