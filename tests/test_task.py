"""The embedded task and base model: deterministic, disjoint splits, real HF checkpoints."""
import dataclasses
import math
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tempo.base_model import base_model_dir, ensure_base_model, ensure_verifier_model
from tempo.config import BaseModelConfig, TaskConfig
from tempo.errors import ConvergenceError
from tempo.grading import grade
from tempo.task import STEP, Chain, Teacher, apply, make_splits, random_chain, sft_corpus, teacher_floor


def test_chain_solution_by_hand():
    chain = Chain(4, (("+", 9), ("*", 7), ("-", 2)), 13)
    assert chain.question == "4+9*7-2 mod 13\n"
    # 4+9=13≡0, 0*7=0, 0-2=−2≡11
    assert chain.solution() == "4+9=0;0*7=0;0-2=11;\\boxed{11}"
    assert grade(chain.solution(), str(chain.answer)).correct


def test_splits_are_deterministic_and_disjoint():
    cfg = TaskConfig(num_labeled=20, num_unlabeled=50, num_heldout=10)
    a, b = make_splits(cfg), make_splits(cfg)
    assert a == b
    questions = [p.prompt for p in a.labeled + a.unlabeled + a.heldout]
    assert len(set(questions)) == 80
    assert all(p.is_labeled for p in a.labeled + a.heldout) and not any(p.is_labeled for p in a.unlabeled)
    sft = {q for q, _ in sft_corpus(cfg, 200, seed=0)}
    assert not sft & set(questions)
    assert make_splits(TaskConfig(seed=1, num_labeled=20)).labeled != a.labeled


def test_chain_lengths_follow_the_knobs():
    cfg = TaskConfig(min_ops=2, max_ops=4, modulus=7)
    rng = random.Random(0)
    lengths = {len(random_chain(rng, cfg).ops) for _ in range(200)}
    assert lengths == {2, 3, 4}


def test_no_step_multiplies_by_zero():
    # "*0" would erase the chain: a wrong chain would land on the right answer.
    rng = random.Random(0)
    ops = [op for _ in range(300) for op in random_chain(rng, TaskConfig(modulus=7)).ops]
    assert ("*", 0) not in ops and any(op == "*" for op, _ in ops) and ("+", 0) in ops


def test_too_many_questions_is_an_error():
    with pytest.raises(ValueError, match="distinct questions"):
        make_splits(TaskConfig(modulus=2, min_ops=1, max_ops=1, num_labeled=100))


def test_base_model_builds_caches_and_loads(tmp_path):
    task = TaskConfig(num_labeled=4, num_unlabeled=4, num_heldout=4)
    base = BaseModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_size=64,
                           sft_examples=64, sft_heldout=16, sft_max_steps=3, sft_tolerance=10.0, sft_batch_size=8, cache_dir=str(tmp_path))
    path = ensure_base_model(task, base)
    assert path == base_model_dir(task, base)
    mtime = (path / "model.safetensors").stat().st_mtime
    assert ensure_base_model(task, base) == path and (path / "model.safetensors").stat().st_mtime == mtime
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("1+2 mod 13\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(ids[0]) == "1+2 mod 13\n"
    # A different shape gets a different cache entry.
    assert base_model_dir(task, BaseModelConfig(hidden_size=64, cache_dir=str(tmp_path))) != path
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_the_verifier_is_the_policy_trained_on_right_solutions(tmp_path):
    task = TaskConfig(num_labeled=4, num_unlabeled=4, num_heldout=4, modulus=7, slip=0.1, misconceptions=0.2)
    base = BaseModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_size=64,
                           sft_examples=64, sft_heldout=16, sft_max_steps=2, sft_tolerance=10.0, sft_batch_size=8, verifier_max_steps=2, verifier_tolerance=10.0, cache_dir=str(tmp_path))
    verifier = ensure_verifier_model(task, base)
    policy = base_model_dir(task, base)
    assert verifier == base_model_dir(task, base, "verifier") and (policy / "config.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    b = AutoModelForCausalLM.from_pretrained(verifier).state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # The verifier's settings and stage 1's pool size do not touch the base policy's cache key.
    assert base_model_dir(task, dataclasses.replace(base, verifier_max_steps=5)) == policy
    assert base_model_dir(dataclasses.replace(task, num_stage1=7), base) == policy
    assert base_model_dir(task, dataclasses.replace(base, verifier_max_steps=5), "verifier") != verifier


def test_the_teacher_slips_and_misbelieves_at_the_configured_rates():
    cfg = TaskConfig(modulus=7, min_ops=3, max_ops=5, slip=0.1, misconceptions=0.25, belief=0.7)
    teacher = Teacher(cfg)
    assert Teacher(cfg).wrong_beliefs == teacher.wrong_beliefs  # fixed by the task's seed
    assert Teacher(dataclasses.replace(cfg, seed=1)).wrong_beliefs != teacher.wrong_beliefs
    assert 0.15 * 140 < len(teacher.wrong_beliefs) < 0.35 * 140  # 7 × (7 + 7 + 6) facts
    assert all(apply(op, a, b, 7) != wrong for (a, op, b), wrong in teacher.wrong_beliefs.items())
    rng = random.Random(0)
    counts = {"fact": 0, "slip": 0, "held": 0, "believed": 0}
    for _ in range(20000):
        a, op, b = rng.randrange(7), rng.choice("+-*"), rng.randrange(1, 7)
        written = teacher.write(a, op, b, apply(op, a, b, 7), rng)
        if (a, op, b) in teacher.wrong_beliefs:
            counts["held"] += 1
            counts["believed"] += written == teacher.wrong_beliefs[(a, op, b)]
        else:
            counts["fact"] += 1
            counts["slip"] += written != apply(op, a, b, 7)
    assert abs(counts["slip"] / counts["fact"] - 0.1) < 0.015
    assert abs(counts["believed"] / counts["held"] - 0.7) < 0.03
    # A wrong step carries forward: the boxed value is the chain's written last value.
    for question, solution in sft_corpus(cfg, 200, seed=0):
        assert solution.endswith(f"\\boxed{{{solution.split(';')[-2].split('=')[1]}}}")
    clean = sft_corpus(cfg, 200, seed=0, teacher=False)
    assert all(grade(s, str(_answer(q))).correct for q, s in clean)


def _answer(question: str) -> int:
    expression, modulus = question.strip().split(" mod ")
    value, rest = int(expression[0]), expression[1:]
    for op, b in zip(rest[0::2], rest[1::2]):
        value = apply(op, value, int(b), int(modulus))
    return value


def test_teacher_floor_is_the_cross_entropy_of_the_teachers_own_choices():
    # The floor is an expectation; the teacher's own log-loss on what it wrote estimates it.
    cfg = TaskConfig(modulus=7, min_ops=3, max_ops=5, slip=0.1, misconceptions=0.25, belief=0.7)
    corpus = sft_corpus(cfg, 3000, seed=0)
    teacher, nats, tokens = Teacher(cfg), 0.0, 0
    for _, solution in corpus:
        tokens += len(solution) + 1
        for a, op, b, written in STEP.findall(solution):
            nats -= math.log(teacher.distribution(int(a), op, int(b))[int(written)])
    floor = teacher_floor(cfg, corpus, lambda s: len(s) + 1)
    assert floor == pytest.approx(nats / tokens, rel=0.05)
    assert all(abs(sum(teacher.distribution(a, op, b)) - 1) < 1e-12 for a in range(7) for op in "+-*" for b in range(7))
    assert teacher_floor(TaskConfig(modulus=7), sft_corpus(TaskConfig(modulus=7), 50, seed=0), len) == 0.0


def test_sft_that_misses_its_target_by_the_cap_is_one_line_naming_the_knob(tmp_path):
    task = TaskConfig(num_labeled=4, num_unlabeled=4, num_heldout=4, modulus=7, slip=0.1)
    base = BaseModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, ffn_size=64,
                           sft_examples=64, sft_heldout=16, sft_max_steps=2, sft_eval_every=1, sft_batch_size=8,
                           cache_dir=str(tmp_path))
    with pytest.raises(ConvergenceError, match=r"base model: held-out loss \d\.\d+ after 2 SFT steps "
                                               r"\(base_model.sft_max_steps\), target 0\.\d+ \(floor 0\.\d+\)"):
        ensure_base_model(task, base)
    assert not base_model_dir(task, base).exists()  # nothing half-built is left to be loaded


def test_a_drifting_task_narrows_stage_1_only():
    # task.stage1_max_ops, task.stage1_ops: stage 1 (the verifier's solutions, the critic's pool)
    # sees shorter chains of fewer operations; D_L, D_U, the held-out slice and the base
    # policy stay the default task's.
    cfg = TaskConfig(modulus=7, min_ops=2, max_ops=5, num_labeled=20, num_unlabeled=20, num_heldout=10, num_stage1=50)
    drift = dataclasses.replace(cfg, stage1_max_ops=3, stage1_ops="+-")
    a, b = make_splits(cfg), make_splits(drift)
    assert (a.labeled, a.unlabeled, a.heldout) == (b.labeled, b.unlabeled, b.heldout)
    steps = lambda questions: [re.findall(r"[-+*]\d", q) for q in questions]
    assert {len(s) for s in steps(p.prompt for p in b.stage1)} == {2, 3}
    assert {op[0] for s in steps(p.prompt for p in b.stage1) for op in s} == {"+", "-"}
    assert {len(s) for s in steps(p.prompt for p in a.stage1)} == {2, 3, 4, 5}
    assert any("*" in p.prompt for p in a.stage1) and any("*" in p.prompt for p in b.unlabeled)
    verifier = steps(q for q, _ in sft_corpus(drift, 100, seed=0, teacher=False))
    policy = steps(q for q, _ in sft_corpus(drift, 100, seed=0))
    assert max(map(len, verifier)) == 3 and not any(op[0] == "*" for s in verifier for op in s)
    assert max(map(len, policy)) == 5 and any(op[0] == "*" for s in policy for op in s)
    base = BaseModelConfig()
    assert base_model_dir(drift, base) == base_model_dir(cfg, base)
    assert base_model_dir(drift, base, "verifier") != base_model_dir(cfg, base, "verifier")


def test_d_l_can_be_stage_1s_labeled_set():
    # task.labeled_is_stage1: D_L is the stage-1 pool; D_U, the held-out slice, the base
    # policy and stage 1 itself are unchanged.
    cfg = TaskConfig(modulus=7, num_labeled=20, num_unlabeled=20, num_heldout=10, num_stage1=50)
    stream = dataclasses.replace(cfg, labeled_is_stage1=True)
    a, b = make_splits(cfg), make_splits(stream)
    assert (a.unlabeled, a.heldout, a.stage1) == (b.unlabeled, b.heldout, b.stage1) and b.labeled == a.stage1
    assert sft_corpus(cfg, 50, seed=0) == sft_corpus(stream, 50, seed=0)
    base = BaseModelConfig()
    assert base_model_dir(stream, base) == base_model_dir(cfg, base)
    assert base_model_dir(stream, base, "verifier") == base_model_dir(cfg, base, "verifier")
