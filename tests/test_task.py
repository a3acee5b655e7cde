"""The embedded task and base model: deterministic, disjoint splits, real HF checkpoints."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tempo.base_model import base_model_dir, ensure_base_model
from tempo.config import BaseModelConfig, TaskConfig
from tempo.grading import grade
from tempo.task import Chain, make_splits, random_chain, sft_corpus


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
                           sft_examples=64, sft_steps=3, sft_batch_size=8, cache_dir=str(tmp_path))
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
