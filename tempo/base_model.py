"""The embedded base policy: a tiny Qwen3 warm-started on worked solutions of the task.

Built deterministically from the config, cached on disk under a hash of the settings that
shape it, and saved in Hugging Face format so that the trainer loads it through the same
`from_pretrained` path as a downloaded Qwen3 or OLMo3 checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tempo.config import BaseModelConfig, TaskConfig
from tempo.task import sft_corpus, verification_corpus
from tempo.tokenizer import char_tokenizer

log = logging.getLogger("tempo")


def base_model_dir(task: TaskConfig, base: BaseModelConfig, role: str = "policy") -> Path:
    shape = {k: v for k, v in asdict(base).items() if k != "cache_dir"}
    if role == "policy":
        shape.pop("critic_sft_steps")
        shape.pop("critic_lm_steps")
        shape.pop("critic_extra_layers")
    key = json.dumps({"task": asdict(task), "base": shape}, sort_keys=True)
    prefix = "base" if role == "policy" else "critic-base"
    return Path(base.cache_dir) / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_base_model(task: TaskConfig, base: BaseModelConfig) -> Path:
    """The cached base policy's directory, building it first when it is missing."""
    out = base_model_dir(task, base)
    if (out / "config.json").is_file():
        return out
    log.info("building the embedded base model in %s", out)
    tokenizer = char_tokenizer()
    model = build_tiny_qwen3(base, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id)
    examples = solution_examples(tokenizer, sft_corpus(task, base.sft_examples, base.seed))
    train_sft(model, examples, base, base.sft_steps, tokenizer.pad_token_id)
    save(model, tokenizer, out)
    return out


def ensure_critic_base(task: TaskConfig, base: BaseModelConfig, policy_dir: Path) -> Path | None:
    """The critic before stage 1: the base policy's trunk with a value head, trained
    `critic_sft_steps` steps to check worked solutions step by step (a process reward model):
    every prefix up to a solution's first slip is labeled right, every later one wrong. So the
    critic has learned more than the policy it judges: the gap between writing and checking an
    answer that real reasoning models have, and that a tiny critic trained only on outcomes
    never finds. None: the critic starts from the policy."""
    if base.critic_sft_steps == 0:
        return None
    out = base_model_dir(task, base, role="critic")
    if (out / "config.json").is_file():
        return out
    log.info("building the embedded critic (step checker) in %s", out)
    from tempo.models.hf import load_critic_module

    tokenizer = char_tokenizer()
    tmp = out.with_name(f"{out.name}.lm-{os.getpid()}")
    lm = Qwen3ForCausalLM.from_pretrained(policy_dir)  # first learn the task better than the policy
    examples = solution_examples(tokenizer, sft_corpus(task, base.sft_examples, base.seed + 1))
    train_sft(lm, examples, base, base.critic_lm_steps, tokenizer.pad_token_id)
    deepen(lm, base.critic_extra_layers).save_pretrained(tmp)
    module = load_critic_module(str(tmp), torch.float32, init_from_policy=True)  # then learn to check
    shutil.rmtree(tmp)
    examples = checker_examples(tokenizer, verification_corpus(task, base.sft_examples, base.seed))
    train_checker(module, examples, base, base.critic_sft_steps, tokenizer.pad_token_id)
    save(module, tokenizer, out)
    return out


def deepen(lm: Qwen3ForCausalLM, extra: int) -> Qwen3ForCausalLM:
    """`lm` with `extra` more decoder layers on top, each starting as the identity (its output
    projections zero). A checker needs them: whether a written step is right is known only
    after the position before it has predicted it, i.e. at the top of the stack, so comparing
    the prediction with the token written next needs layers above that."""
    if extra == 0:
        return lm
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers += extra
    cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * extra
    with torch.random.fork_rng():
        torch.manual_seed(0)
        deeper = Qwen3ForCausalLM(cfg)
    missing, unexpected = deeper.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and all(".layers." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in deeper.model.layers[-extra:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return deeper


def save(model, tokenizer, out: Path) -> None:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, out)


def publish(tmp: Path, out: Path) -> None:
    """Atomically move a finished build into the cache; a concurrent build that got there
    first wins and this one is dropped, so readers never see a half-written directory."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp)


def build_tiny_qwen3(base: BaseModelConfig, vocab_size: int, pad_id: int, eos_id: int) -> Qwen3ForCausalLM:
    torch.manual_seed(base.seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=base.hidden_size, intermediate_size=base.ffn_size,
        num_hidden_layers=base.num_layers, num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads, head_dim=base.head_dim,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
    )
    return Qwen3ForCausalLM(cfg)


Example = tuple[list[int], list[int]]  # token ids, labels (-100: no loss)


def solution_examples(tokenizer, corpus: list[tuple[str, str]]) -> list[Example]:
    """Next-token loss on the solution and EOS only."""
    out = []
    for q, s in corpus:
        q_ids, s_ids = tokenizer(q)["input_ids"], tokenizer(s)["input_ids"] + [tokenizer.eos_token_id]
        out.append((q_ids + s_ids, [-100] * len(q_ids) + s_ids))
    return out


def checker_examples(tokenizer, corpus: list[tuple[str, str, int | None]]) -> list[Example]:
    """Question + solution, and per position the target of the value read there: +1 while the
    prefix is free of slips, −1 from the first wrong token on (-100 on the question, which
    is not judged, except its last token: the state before the first response token)."""
    out = []
    for q, s, wrong_at in corpus:
        q_ids = tokenizer(q)["input_ids"]
        enc = tokenizer(s, return_offsets_mapping=True)
        s_ids = enc["input_ids"]
        bad = len(s_ids) if wrong_at is None else next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > wrong_at)
        # The value at a position judges the prefix that ends there.
        targets = [1] * bad + [-1] * (len(s_ids) - bad)
        out.append((q_ids + s_ids, [-100] * (len(q_ids) - 1) + [1] + targets))
    return out


def _batches(examples: list[Example], base: BaseModelConfig, steps: int, pad_id: int):
    """(step, lr, ids, labels) for `steps` random batches, cosine learning rate, fixed seed."""
    gen = torch.Generator().manual_seed(base.seed)
    for step in range(steps):
        lr = base.sft_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(examples), (base.sft_batch_size,), generator=gen).tolist()
        rows = [examples[i] for i in idx]
        width = max(len(x) for x, _ in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        for r, (x, y) in enumerate(rows):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
        yield step, lr, ids, labels


def _optimise(model, opt, lr: float, loss: torch.Tensor) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_checker(module, examples: list[Example], base: BaseModelConfig, steps: int, pad_id: int) -> None:
    """Value regression (0.5·(v − target)²) on every judged position."""
    opt = torch.optim.AdamW(module.parameters(), lr=base.sft_lr, weight_decay=0.0)
    module.train()
    for step, lr, ids, labels in _batches(examples, base, steps, pad_id):
        values = module(input_ids=ids, attention_mask=(ids != pad_id).long()).logits.squeeze(-1)
        judged = labels != -100
        loss = 0.5 * ((values - labels.float())[judged] ** 2).mean()
        _optimise(module, opt, lr, loss)
        if step % 100 == 0 or step == steps - 1:
            log.info("critic step-checker step %d/%d loss %.4f", step + 1, steps, loss.item())


def train_sft(model, examples: list[Example], base: BaseModelConfig, steps: int, pad_id: int) -> None:
    """Next-token loss on the labeled positions."""
    opt = torch.optim.AdamW(model.parameters(), lr=base.sft_lr, weight_decay=0.0)
    model.train()
    for step, lr, ids, labels in _batches(examples, base, steps, pad_id):
        loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss
        _optimise(model, opt, lr, loss)
        if step % 100 == 0 or step == steps - 1:
            log.info("SFT step %d/%d loss %.4f", step + 1, steps, loss.item())
