"""This trainer and TRL's GRPOTrainer side by side, in one run, on the same tiny Qwen3.

Model: 4 layers, hidden 256, FFN 768, 4 heads / 2 KV heads, head_dim 64, character
vocabulary (random init, seed 0). Batch: 8 prompts × 8 samples × 16 new tokens, generation
forced to full length on both sides (`min_new_tokens`), so that both do the same work. Each
measurement is a fresh subprocess (its own peak RSS) that takes WARMUP steps, then times STEPS;
the workers are interleaved (TRL, rlvr, ttrl, tempo, TRL, ...) for REPS repetitions, so that
a drift of the machine hits every side alike. TRL is a benchmark-only dependency:

    .venv/bin/pip install trl==1.16.0
    .venv/bin/python benchmarks/bench_vs_trl.py     # writes benchmarks/results/vs_trl_cpu.md

Our steps include everything the EM loop does (rollout, grading, old log-probs, the critic's
forward, E-step and M-step for TEMPO); TRL's include its generation and one optimiser step
(`beta=0`: no reference model, like ours).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 16
WARMUP, STEPS, REPS = 2, 5, 5
SIDES = ["trl", "rlvr", "ttrl", "tempo"]
SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, ffn_size=768)
OUT = Path(__file__).resolve().parent / "results" / "vs_trl_cpu.md"


def build_model(path: Path) -> None:
    from tempo.base_model import build_tiny_qwen3
    from tempo.config import BaseModelConfig
    from tempo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    model = build_tiny_qwen3(BaseModelConfig(**SHAPE), len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def prompts() -> list:
    from tempo.config import TaskConfig
    from tempo.task import make_splits

    splits = make_splits(TaskConfig(modulus=7, num_labeled=PROMPTS, num_unlabeled=PROMPTS, num_heldout=0, num_stage1=0))
    return splits.labeled, splits.unlabeled


def clock(phases: dict[str, float], obj, method: str, phase: str) -> None:
    """Add the wall time of every call of obj.method to phases[phase]."""
    real = getattr(obj, method)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

    setattr(obj, method, timed)


def run_ours(model: str, method: str) -> tuple[list[float], dict[str, float]]:
    """Step times, and the timed steps' mean seconds per phase of a step."""
    from tempo.build import build_models
    from tempo.config import load_config
    from tempo.em import EMTrainer
    from tempo.methods import METHODS
    from tempo.task import TaskSplits

    labeled = 2 if method == "tempo" else (PROMPTS if method == "rlvr" else 0)
    cfg = load_config(None, [
        f"model.policy_path={model}", f"algorithm.method={method}", "algorithm.filter_groups=false",
        f"rollout.n={SAMPLES}", f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.min_new_tokens={NEW_TOKENS}",
        f"train.prompts_per_step={PROMPTS}", f"train.labeled_per_step={labeled}", "train.mini_batches=1",
        f"train.micro_batch_size={PROMPTS * SAMPLES}", "algorithm.recalibrate_every=1"])
    d_l, d_u = prompts()
    m = METHODS[method]
    models = build_models(cfg, model, None, need_critic=m.uses_critic)
    trainer = EMTrainer(cfg, m, models, TaskSplits(labeled=d_l, unlabeled=d_u, heldout=[], stage1=[]))
    phases: dict[str, float] = {}
    clock(phases, models.engine, "generate", "rollout")
    clock(phases, models.engine, "sync_weights", "sync")
    clock(phases, models.policy, "infer", "old log-probs")
    clock(phases, models.policy, "train_step", "M-step")
    if models.critic is not None:
        clock(phases, models.critic, "infer", "critic forward")
        clock(phases, models.critic, "train_step", "E-step")
    times = []
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            phases.clear()
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    phases["other (grading, rewards, advantages)"] = sum(times[WARMUP:]) - sum(phases.values())
    return times[WARMUP:], {k: v / STEPS for k, v in phases.items()}


def run_trl(model: str) -> tuple[list[float], dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times, started = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - started[-1])

    def reward(completions, **kw):  # any score will do: it only feeds the group advantage
        return [float(len(set(c)) % 2) for c in completions]

    tok = AutoTokenizer.from_pretrained(model)
    d_l, _ = prompts()
    data = Dataset.from_dict({"prompt": [p.prompt for p in d_l]})
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
            max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
            max_steps=WARMUP + STEPS, learning_rate=5e-5, beta=0.0, report_to=[], logging_steps=10**6,
            save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=reward, args=args,
                              train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return times[WARMUP:], {}


def worker(side: str, model: str) -> None:
    times, phases = run_trl(model) if side == "trl" else run_ours(model, side)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"side": side, "times": times, "phases": phases, "peak_mb": peak_mb}))


def main() -> None:
    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        for rep in range(REPS):
            for side in SIDES:
                proc = subprocess.run([sys.executable, __file__, "--worker", side, str(model)], capture_output=True,
                                      text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
                results[side].append(json.loads(line[0][7:]))
                print(f"rep {rep} {side}: median {statistics.median(results[side][-1]['times']):.3f} s/step", flush=True)
    tokens = PROMPTS * SAMPLES * NEW_TOKENS
    trl_median = statistics.median(t for r in results["trl"] for t in r["times"])
    rows, profile = [], []
    for side in SIDES:
        times = [t for r in results[side] for t in r["times"]]
        med = statistics.median(times)
        per_process = ", ".join(f"{trl_median / statistics.median(r['times']):.2f}" for r in results[side])
        rows.append(f"| {side if side != 'trl' else 'TRL GRPOTrainer'} | {med:.3f} | {min(times):.3f} | {max(times):.3f} | "
                    f"{tokens / med:.0f} | {trl_median / med:.2f}× | {per_process} | "
                    f"{max(r['peak_mb'] for r in results[side]):.0f} |")
        if side != "trl":
            phases = {k: statistics.mean(r["phases"][k] for r in results[side]) for k in results[side][0]["phases"]}
            total = sum(phases.values())
            profile.append(f"| {side} | " + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in phases.items()) + " |")
    load = os.getloadavg()[0]
    OUT.write_text("\n".join([
        "# This trainer vs TRL's GRPOTrainer, side by side on CPU",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, load average {load:.2f} at the end; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; {date.today()}.",
        f"Model: tiny Qwen3 ({SHAPE}), character vocabulary. Batch: {PROMPTS} prompts × {SAMPLES} samples × "
        f"{NEW_TOKENS} new tokens, forced to full length. Each side: {REPS} fresh processes, interleaved, "
        f"{STEPS} timed steps each after {WARMUP} warm-up.",
        f"Command: `python benchmarks/bench_vs_trl.py`",
        "",
        "| side | median s/step | min | max | completion tokens/s | vs TRL (tokens/s) | each process vs TRL | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where this trainer's step goes (mean seconds per timed step, over the processes):",
        "",
        "| side | phases |",
        "|---|---|",
        *profile,
        "",
        "rlvr: 8 labeled prompts, verified reward, and like TEMPO a critic (advantage R − V, an E-step every step): "
        "TRL's work plus a critic's forward and update; ttrl: 8 unlabeled prompts, majority-vote reward, GRPO; "
        "tempo: 2 labeled + 6 unlabeled, critic forward, E-step and M-step included. This trainer runs each "
        "prompt once for its 8 samples (`model.share_prompts`, in the rollout's prefill and in the forward and "
        "backward of both models); TRL runs every row in full.",
        "",
    ]))
    print(OUT.read_text())


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
