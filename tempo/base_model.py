"""The embedded base policy: a tiny Qwen3 warm-started on worked solutions of the task.

Built deterministically from the config, cached on disk under a hash of the settings that
shape it, and saved in Hugging Face format so that the trainer loads it through the same
`from_pretrained` path as a downloaded Qwen3 or OLMo3 checkpoint.
"""
from __future__ import annotations

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
from tempo.task import sft_corpus
from tempo.tokenizer import char_tokenizer

log = logging.getLogger("tempo")


def base_model_dir(task: TaskConfig, base: BaseModelConfig, kind: str = "base") -> Path:
    """Cache directory of the base policy (`kind="base"`) or of the verifier built on it."""
    shape = {k: v for k, v in asdict(base).items() if k != "cache_dir"}
    if kind == "base":  # the policy does not depend on the verifier's settings
        shape = {k: v for k, v in shape.items() if not k.startswith("verifier_")}
    corpus = {k: v for k, v in asdict(task).items() if k != "num_stage1"}  # see task.sft_corpus
    key = json.dumps({"task": corpus, "base": shape}, sort_keys=True)
    return Path(base.cache_dir) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_base_model(task: TaskConfig, base: BaseModelConfig) -> Path:
    """The cached base policy's directory, building it first when it is missing: SFT from
    scratch on the imperfect teacher's solutions."""
    out = base_model_dir(task, base)
    if (out / "config.json").is_file():
        return out
    log.info("building the embedded base model in %s", out)
    tokenizer = char_tokenizer()
    model = build_tiny_qwen3(base, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id)
    train_sft(model, tokenizer, sft_corpus(task, base.sft_examples, base.seed), base, base.sft_steps, base.sft_lr)
    return _save(model, tokenizer, out)


def ensure_verifier_model(task: TaskConfig, base: BaseModelConfig) -> Path:
    """The cached verifier's directory (the critic's trunk): the base policy trained on for
    `verifier_steps` on right solutions, so that it knows facts the policy gets wrong."""
    out = base_model_dir(task, base, kind="verifier")
    if (out / "config.json").is_file():
        return out
    policy = ensure_base_model(task, base)
    log.info("building the embedded verifier in %s", out)
    tokenizer = char_tokenizer()
    model = Qwen3ForCausalLM.from_pretrained(policy)
    corpus = sft_corpus(task, base.sft_examples, base.seed, teacher=False)
    train_sft(model, tokenizer, corpus, base, base.verifier_steps, base.verifier_lr)
    return _save(model, tokenizer, out)


def _save(model, tokenizer, out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, out)
    return out


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


def train_sft(model, tokenizer, corpus: list[tuple[str, str]], base: BaseModelConfig, steps: int,
              peak_lr: float) -> None:
    """Next-token loss on the solution and EOS only, cosine learning rate, fixed seed."""
    gen = torch.Generator().manual_seed(base.seed)
    encoded = [(tokenizer(q)["input_ids"], tokenizer(s)["input_ids"] + [tokenizer.eos_token_id])
               for q, s in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        lr = peak_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(encoded), (base.sft_batch_size,), generator=gen).tolist()
        rows = [encoded[i] for i in idx]
        width = max(len(q) + len(s) for q, s in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for r, (q, s) in enumerate(rows):
            ids[r, : len(q) + len(s)] = torch.tensor(q + s)
            labels[r, len(q): len(q) + len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("SFT step %d/%d loss %.4f", step + 1, steps, loss.item())
