"""The embedded base policy: a tiny Qwen3 warm-started on worked solutions of the task.

Built deterministically from the config, cached on disk under a hash of the settings that
shape it, and saved in Hugging Face format so that the trainer loads it through the same
`from_pretrained` path as a downloaded Qwen3 or OLMo3 checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tempo.config import BaseModelConfig, TaskConfig
from tempo.errors import ConvergenceError
from tempo.task import sft_corpus, teacher_floor
from tempo.tokenizer import char_tokenizer

log = logging.getLogger("tempo")


def base_model_dir(task: TaskConfig, base: BaseModelConfig, kind: str = "base") -> Path:
    """Cache directory of the base policy (`kind="base"`) or of the verifier built on it."""
    shape = {k: v for k, v in asdict(base).items() if k != "cache_dir"}
    corpus = {k: v for k, v in asdict(task).items() if k not in ("num_stage1", "labeled_is_stage1")}  # see task.sft_corpus
    if kind == "base":  # the policy does not depend on the verifier's settings, stage 1's included
        shape = {k: v for k, v in shape.items() if not k.startswith("verifier_")}
        corpus.pop("stage1_max_ops")
        corpus.pop("stage1_ops")
    key = json.dumps({"task": corpus, "base": shape}, sort_keys=True)
    return Path(base.cache_dir) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_base_model(task: TaskConfig, base: BaseModelConfig) -> Path:
    """The cached base policy's directory, building it first when it is missing: SFT from
    scratch on the imperfect teacher's solutions until its held-out loss is within
    `base_model.sft_tolerance` of the teacher's floor (what a perfect imitator would pay)."""
    out = base_model_dir(task, base)
    if (out / "config.json").is_file():
        return out
    log.info("building the embedded base model in %s", out)
    tokenizer = char_tokenizer()
    model = build_tiny_qwen3(base, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id)
    train, heldout = _split(sft_corpus(task, base.sft_examples + base.sft_heldout, base.seed), base.sft_heldout)
    floor = teacher_floor(task, heldout, lambda text: len(tokenizer(text)["input_ids"]) + 1)
    fit = train_sft(model, tokenizer, train, heldout, base, "base model", steps=base.sft_max_steps,
                    peak_lr=base.sft_lr, target=floor + base.sft_tolerance, floor=floor)
    return _save(model, tokenizer, out, fit)


def ensure_verifier_model(task: TaskConfig, base: BaseModelConfig) -> Path:
    """The cached verifier's directory (the critic's trunk): the base policy trained on right
    solutions until its held-out loss on them is under `base_model.verifier_tolerance`, so
    that it knows the facts the policy gets wrong."""
    out = base_model_dir(task, base, kind="verifier")
    if (out / "config.json").is_file():
        return out
    policy = ensure_base_model(task, base)
    log.info("building the embedded verifier in %s", out)
    tokenizer = char_tokenizer()
    model = Qwen3ForCausalLM.from_pretrained(policy)
    corpus = sft_corpus(task, base.sft_examples + base.sft_heldout, base.seed, teacher=False)
    train, heldout = _split(corpus, base.sft_heldout)
    fit = train_sft(model, tokenizer, train, heldout, base, "verifier", steps=base.verifier_max_steps,
                    peak_lr=base.verifier_lr, target=base.verifier_tolerance, floor=0.0)
    return _save(model, tokenizer, out, fit)


def _split(corpus: list, heldout: int) -> tuple[list, list]:
    """(training rows, held-out rows): the last `heldout` questions are never trained on."""
    return corpus[:-heldout], corpus[-heldout:]


def _save(model, tokenizer, out: Path, fit: dict) -> Path:
    """The model, its tokenizer and how its training ended (`build.json`), published at once."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(fit, indent=1))
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


def _encode(tokenizer, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels): question then solution and EOS; the loss is on the solution and EOS."""
    encoded = [(tokenizer(q)["input_ids"], tokenizer(s)["input_ids"] + [tokenizer.eos_token_id]) for q, s in rows]
    width = max(len(q) + len(s) for q, s in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for r, (q, s) in enumerate(encoded):
        ids[r, : len(q) + len(s)] = torch.tensor(q + s)
        labels[r, len(q): len(q) + len(s)] = torch.tensor(s)
    return ids, labels


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss


@torch.no_grad()
def heldout_loss(model, tokenizer, rows: list[tuple[str, str]], batch: int = 256) -> float:
    """Next-token loss on held-out rows, nats a solution token (EOS included)."""
    model.eval()
    nats = tokens = 0.0
    for i in range(0, len(rows), batch):
        ids, labels = _encode(tokenizer, rows[i: i + batch])
        n = int((labels[:, 1:] != -100).sum())
        nats += _loss(model, ids, labels, tokenizer.pad_token_id).item() * n
        tokens += n
    model.train()
    return nats / tokens


def train_sft(model, tokenizer, corpus: list[tuple[str, str]], heldout: list[tuple[str, str]],
              base: BaseModelConfig, what: str, *, steps: int, peak_lr: float, target: float, floor: float) -> dict:
    """Next-token loss on the solution and EOS, until the held-out loss is at most `target`
    (checked every `base_model.sft_eval_every` steps). AdamW with weight decay, a linear
    warm-up, then a constant rate: no schedule tied to a step count, since the stop is not.
    At `steps` without reaching the target, a ConvergenceError names the figures and the knobs."""
    gen = torch.Generator().manual_seed(base.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=base.sft_weight_decay)
    model.train()
    started, loss = time.perf_counter(), heldout_loss(model, tokenizer, heldout)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = peak_lr * min(1.0, step / max(1, base.sft_warmup_steps))
        idx = torch.randint(len(corpus), (base.sft_batch_size,), generator=gen).tolist()
        ids, labels = _encode(tokenizer, [corpus[i] for i in idx])
        train_loss = _loss(model, ids, labels, tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % base.sft_eval_every and step != steps:
            continue
        loss = heldout_loss(model, tokenizer, heldout)
        log.info("%s SFT step %d (at most %d): held-out loss %.4f, target %.4f (floor %.4f), %.0fs",
                 what, step, steps, loss, target, floor, time.perf_counter() - started)
        if loss <= target:
            return {"steps": step, "heldout_loss": loss, "floor": floor, "seconds": time.perf_counter() - started}
    knob = "base_model.sft_max_steps" if what == "base model" else "base_model.verifier_max_steps"
    raise ConvergenceError(
        f"{what}: held-out loss {loss:.4f} after {steps} SFT steps ({knob}), target {target:.4f} (floor {floor:.4f}); "
        f"raise {knob}, or change base_model.seed or base_model.sft_lr")
