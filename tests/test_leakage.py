"""D_U's hidden answers steer nothing: scrambled, they leave every training metric and weight
bit-identical; only the monitor that grades unlabeled rows against them (drift/*) may differ."""
import dataclasses
import json

import pytest
import torch

from tempo.build import build_models, build_splits
from tempo.config import load_config
from tempo.em import EMTrainer
from tempo.errors import DataError
from tempo.methods import METHODS
from helpers import micro_config


def run_steps(tmp_path, policy_path, method: str, scramble: bool, steps: int = 3):
    cfg = micro_config(tmp_path, policy_path, "stage1.steps=0", "stage1.critic_epochs=0", f"algorithm.method={method}",
                       "task.modulus=7")
    splits = build_splits(cfg)
    if scramble:  # every hidden answer wrong
        wrong = [dataclasses.replace(p, answer=str((int(p.answer) + 1) % 7)) for p in splits.unlabeled]
        splits = dataclasses.replace(splits, unlabeled=wrong)
    torch.manual_seed(0)
    models = build_models(cfg, policy_path, None, need_critic=METHODS[method].uses_critic)
    trainer = EMTrainer(cfg, models, splits)
    stats = [trainer.train_step() for _ in range(steps)]
    weights = {f"{kind}.{k}": v.clone() for kind, model in (("policy", trainer.policy), ("critic", trainer.critic))
               if model is not None for k, v in model.module.state_dict().items()}
    return stats, weights


@pytest.mark.parametrize("method", ["tempo", "ttrl", "empo"])
def test_scrambled_d_u_answers_change_the_monitor_and_nothing_else(tmp_path, boxed_writer, method):
    stats, weights = run_steps(tmp_path / "truth", boxed_writer, method, scramble=False)
    scrambled_stats, scrambled_weights = run_steps(tmp_path / "scrambled", boxed_writer, method, scramble=True)
    monitor_differs = False
    for step, (a, b) in enumerate(zip(stats, scrambled_stats)):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("drift/"):
                monitor_differs |= a[key] != b[key]
            else:
                assert a[key] == b[key], f"step {step + 1}: {key} read D_U's answers ({a[key]} != {b[key]})"
    assert monitor_differs, "the monitor never saw the answers: the test would pass vacuously"
    assert weights.keys() == scrambled_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, scrambled_weights[key]), key


@pytest.mark.parametrize("key", ["labeled_files", "heldout_files", "stage1_files"])
def test_files_sharing_a_question_with_d_u_are_refused(tmp_path, key):
    d_u, other = tmp_path / "d_u.json", tmp_path / "other.json"
    d_u.write_text(json.dumps([{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "What is 3+3?", "answer": "6"}]))
    # the same question, spaced differently and asked as a chat
    other.write_text(json.dumps([{"prompt": [{"role": "user", "content": "What is  3+3?\n"}], "answer": "6"}]))
    cfg = load_config(None, ["data.source=files", f"data.unlabeled_files=[{d_u}]", f"data.{key}=[{other}]"])
    with pytest.raises(DataError, match=r"'other-0' \(other\) asks the same question as D_U's 'd_u-1' \(d_u\)"):
        build_splits(cfg)
    other.write_text(json.dumps([{"prompt": "What is 4+4?", "answer": "8"}]))
    assert len(build_splits(cfg).unlabeled) == 2
