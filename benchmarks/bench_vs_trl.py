"""This trainer and TRL's GRPOTrainer side by side, in one run, on the same tiny Qwen3.

Model: 4 layers, hidden 256, FFN 768, 4 heads / 2 KV heads, head_dim 64, character
vocabulary (random init, seed 0). Batch: 8 prompts × 8 samples × 16 new tokens, generation
forced to full length on both sides (`min_new_tokens`), so that both do the same work. Each
measurement is a fresh subprocess (its own peak RSS) that takes WARMUP steps, then times STEPS;
the workers are interleaved (TRL, grpo, ttrl, tempo, rlvr, TRL, ...) for REPS repetitions, so that
a drift of the machine hits every side alike. TRL is a benchmark-only dependency:

    .venv/bin/pip install trl==1.16.0
    .venv/bin/python benchmarks/bench_vs_trl.py     # writes benchmarks/results/vs_trl_cpu.md

Our steps include everything the EM loop does (rollout, grading, old log-probs, the critic's
forward, E-step and M-step for TEMPO); TRL's include its generation and one optimiser step
(`beta=0`: no reference model, like ours). Both sides run at the same precision, once in fp32
and once in bf16 autocast over fp32 weights (TRL's default, `bf16=True`; ours
`model.dtype=bfloat16`): which one is faster depends on the CPU (bf16 matmuls are fast only
where the CPU has bf16 instructions).
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
SIDES = ["trl", "grpo", "ttrl", "tempo", "rlvr"]
PRECISIONS = ["float32", "bfloat16"]
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


def run_ours(model: str, method: str, dtype: str) -> tuple[list[float], dict[str, float]]:
    """Step times, and the timed steps' mean seconds per phase of a step."""
    from tempo.build import build_models
    from tempo.config import load_config
    from tempo.em import EMTrainer
    from tempo.methods import METHODS
    from tempo.task import TaskSplits

    labeled = {"tempo": 2, "rlvr": PROMPTS, "grpo": PROMPTS}.get(method, 0)
    cfg = load_config(None, [
        f"model.policy_path={model}", f"model.dtype={dtype}", f"algorithm.method={method}", "algorithm.filter_groups=false",
        f"rollout.n={SAMPLES}", f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.min_new_tokens={NEW_TOKENS}",
        f"train.prompts_per_step={PROMPTS}", f"train.labeled_per_step={labeled}", "train.mini_batches=1",
        f"train.micro_batch_size={PROMPTS * SAMPLES}", "algorithm.recalibrate_every=1"])
    d_l, d_u = prompts()
    m = METHODS[method]
    models = build_models(cfg, model, None, need_critic=m.uses_critic)
    trainer = EMTrainer(cfg, models, TaskSplits(labeled=d_l, unlabeled=d_u, heldout=[], stage1=[]))
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


def run_trl(model: str, dtype: str) -> tuple[list[float], dict[str, float]]:
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
            save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, seed=0, dataloader_num_workers=0,
            bf16=dtype == "bfloat16")
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=reward, args=args,
                              train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return times[WARMUP:], {}


def worker(side: str, model: str, dtype: str) -> None:
    times, phases = run_trl(model, dtype) if side == "trl" else run_ours(model, side, dtype)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"side": side, "times": times, "phases": phases, "peak_mb": peak_mb}))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(results: dict[str, list[dict]], dtype: str) -> tuple[list[str], list[str]]:
    """Rows of the speed table and of the phase profile, for one precision."""
    tokens = PROMPTS * SAMPLES * NEW_TOKENS
    trl_median = statistics.median(t for r in results["trl"] for t in r["times"])
    rows, profile = [], []
    for side in SIDES:
        times = [t for r in results[side] for t in r["times"]]
        med = statistics.median(times)
        per_process = ", ".join(f"{trl_median / statistics.median(r['times']):.2f}" for r in results[side])
        rows.append(f"| {dtype} | {side if side != 'trl' else 'TRL GRPOTrainer'} | {med:.3f} | {min(times):.3f} | "
                    f"{max(times):.3f} | {tokens / med:.0f} | {trl_median / med:.2f}× | {per_process} | "
                    f"{max(r['peak_mb'] for r in results[side]):.0f} |")
        if side != "trl":
            phases = {k: statistics.mean(r["phases"][k] for r in results[side]) for k in results[side][0]["phases"]}
            total = sum(phases.values())
            profile.append(f"| {dtype} | {side} | " + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})"
                                                              for k, v in phases.items()) + " |")
    return rows, profile


def main() -> None:
    import torch
    import transformers
    import trl

    results: dict[tuple[str, str], list[dict]] = {(d, s): [] for d in PRECISIONS for s in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        for rep in range(REPS):
            for dtype in PRECISIONS:
                for side in SIDES:
                    proc = subprocess.run([sys.executable, __file__, "--worker", side, str(model), dtype],
                                          capture_output=True, text=True,
                                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                    if proc.returncode or not line:
                        raise SystemExit(f"{side} ({dtype}) failed:\n{proc.stderr[-3000:]}")
                    results[dtype, side].append(json.loads(line[0][7:]))
                    print(f"rep {rep} {dtype} {side}: median "
                          f"{statistics.median(results[dtype, side][-1]['times']):.3f} s/step", flush=True)
    rows, profile = [], []
    for dtype in PRECISIONS:
        r, p = table({s: results[dtype, s] for s in SIDES}, dtype)
        rows += r
        profile += p
    load = os.getloadavg()[0]
    OUT.write_text("\n".join([
        "# This trainer vs TRL's GRPOTrainer, side by side on CPU",
        "",
        f"Machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} torch threads, load average "
        f"{load:.2f} at the end; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}; {date.today()}.",
        f"Model: tiny Qwen3 ({SHAPE}), character vocabulary. Batch: {PROMPTS} prompts × {SAMPLES} samples × "
        f"{NEW_TOKENS} new tokens, forced to full length. Each side and precision: {REPS} fresh processes, "
        f"interleaved, {STEPS} timed steps each after {WARMUP} warm-up. Each precision's ratios are against TRL "
        "at the same precision.",
        f"Command: `python benchmarks/bench_vs_trl.py`",
        "",
        "| precision | side | median s/step | min | max | completion tokens/s | vs TRL (tokens/s) | "
        "each process vs TRL | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where this trainer's step goes (mean seconds per timed step, over the processes):",
        "",
        "| precision | side | phases |",
        "|---|---|---|",
        *profile,
        "grpo: RLVR as TRL runs it (8 labeled prompts, verified reward, group-normalised advantage, no critic): "
        "the like-for-like side; ttrl: 8 unlabeled prompts, majority-vote reward, GRPO; "
        "rlvr: this trainer's control for TEMPO (8 labeled prompts, verified reward, and like TEMPO a critic: "
        "advantage R − V, an E-step every step), TRL's work plus a critic's forward and update; "
        "tempo: 2 labeled + 6 unlabeled, critic forward, E-step and M-step included. This trainer runs each "
        "prompt once for its 8 samples (`model.share_prompts`, in the rollout's prefill and in the forward and "
        "backward of both models); TRL runs every row in full.",
        "",
    ]))
    print(OUT.read_text())


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
