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


def base_model_dir(task: TaskConfig, base: BaseModelConfig) -> Path:
    shape = {k: v for k, v in asdict(base).items() if k != "cache_dir"}
    key = json.dumps({"task": asdict(task), "base": shape}, sort_keys=True)
    return Path(base.cache_dir) / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


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


def train_sft(model, examples: list[Example], base: BaseModelConfig, steps: int, pad_id: int) -> None:
    """Next-token loss on the labeled positions."""
    opt = torch.optim.AdamW(model.parameters(), lr=base.sft_lr, weight_decay=0.0)
    model.train()
    for step, lr, ids, labels in _batches(examples, base, steps, pad_id):
        loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss
        _optimise(model, opt, lr, loss)
        if step % 100 == 0 or step == steps - 1:
            log.info("SFT step %d/%d loss %.4f", step + 1, steps, loss.item())
