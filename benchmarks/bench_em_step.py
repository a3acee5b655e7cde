"""Seconds per EM step at the dimensions of a TRL reference run.

TRL 1.16's GRPOTrainer, tiny Qwen3 (4 layers, hidden 256, FFN 768, 4 heads / 2 KV heads,
head_dim 64, character vocabulary, 3.2M params), 8 prompts × 8 generations × 16 new tokens
per step, no reference model: 0.76 s per step (median), measured once on this machine kind,
not side by side with this benchmark. Here the same
model shape and batch run one TEMPO step (rollout, old log-probs, critic values, E-step,
M-step), so the critic's forward and update come on top of what TRL does.

    .venv/bin/python benchmarks/bench_em_step.py          # writes benchmarks/results/em_step_cpu.md
"""
from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import transformers

from tempo.base_model import build_tiny_qwen3
from tempo.build import build_models, build_splits
from tempo.config import BaseModelConfig, load_config
from tempo.em import EMTrainer
from tempo.methods import METHODS
from tempo.tokenizer import char_tokenizer

SHAPE = BaseModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, ffn_size=768)
STEPS, WARMUP = 8, 2


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok = char_tokenizer()
        model = build_tiny_qwen3(SHAPE, len(tok), tok.pad_token_id, tok.eos_token_id)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        rows = []
        for method in ("tempo", "ttrl"):
            cfg = load_config(None, [
                f"model.policy_path={tmp}", f"algorithm.method={method}", "rollout.n=8",
                "rollout.max_new_tokens=16", "train.prompts_per_step=8", "train.labeled_per_step=2",
                "algorithm.filter_groups=false", "train.mini_batches=1",
            ])
            torch.manual_seed(0)
            trainer = EMTrainer(cfg, METHODS[method], build_models(cfg, tmp, None, METHODS[method].uses_critic),
                                build_splits(cfg))
            times = []
            for i in range(WARMUP + STEPS):
                start = time.perf_counter()
                trainer.train_step()
                if i >= WARMUP:
                    times.append(time.perf_counter() - start)
            rows.append((method, statistics.median(times), min(times), max(times)))
    lines = [
        "# EM step time on CPU at the TRL reference's model shape",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {date.today()}. Model: {params / 1e6:.1f}M params; "
        f"8 prompts × 8 samples × 16 new tokens; median of {STEPS} steps after {WARMUP} warm-up.",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "| method | median s/step | min | max | TRL GRPOTrainer (earlier run, not side by side) |",
        "|---|---|---|---|---|",
        *[f"| {m} | {med:.3f} | {lo:.3f} | {hi:.3f} | 0.76 |" for m, med, lo, hi in rows],
        "",
        "TEMPO's step also runs the critic (values for every rollout, and the E-step update);",
        "TTRL's has no critic. The TRL figure was measured on another day: compare ratios with care.",
    ]
    out = Path(__file__).parent / "results" / "em_step_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
