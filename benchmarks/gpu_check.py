"""The trainer's own parts on a GPU (benchmarks/gpu_check.sh runs it after the kernels' check).

    python benchmarks/gpu_check.py OUT_DIR [--budget-s 200]
    python benchmarks/gpu_check.py OUT_DIR --smoke      # the same logic on CPU, tiny shapes

No download: the model is a Qwen3-0.6B-shaped one (28 layers, hidden 1024, 16/8 heads, FFN 3072,
vocabulary 151,936) with random weights, built from its config; prompts come from the embedded
task. Each part runs in a process of its own (megatron's parallel state is global) and prints
one RESULT line; OUT_DIR/system.json and OUT_DIR/system.md gather them:

  vote      the CUDA vote aggregation against the C++ one on 8,192 groups of 64 answers, and
            both timed
  hf        TEMPO steps with the HF backend (bf16 compute over fp32 master weights, HF generate):
            seconds per step and per phase, completion tokens/s, peak GPU memory, and MFU: model
            FLOPs (2N a token forward, 6N a token trained, N the matmul weights, attention left
            out) against the H200's measured 790 TFLOP/s bf16
  megatron  the same steps with the Megatron-core backend at TP=1 (bf16 weights, fp32 masters)
  vllm      the vLLM engine's log-probs against the trainer's on the same rollouts, and its
            tokens/s; "not available on this machine" where vLLM is not installed
  profile   (with --profile) one more HF step inside the trainer's profile window: torch.profiler
            (CPU and CUDA, the phases' NVTX / record_function ranges); its table of the ops and
            kernels that took the most GPU time is OUT_DIR/profile.txt

Responses are forced to full length (`rollout.min_new_tokens`): a random model rarely samples
EOS anyway, and every step then does the same work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import clock  # noqa: E402  (the same per-phase clock as the TRL benchmark)

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512)
# (prompts a step, labeled among them, samples, new tokens, micro-batch rows, timed steps)
GPU_RUN, SMOKE_RUN = (32, 8, 8, 256, 32, 2), (4, 1, 2, 4, 8, 1)
PARTS = ("vote", "megatron", "hf", "vllm")  # hf last: it carries the profiled step
PEAK_BF16_FLOPS = 790e12  # an 8192^3 bf16 matmul on the lent H200 (.library/device/KINDS.md)


def matmul_params(cfg: dict, head: bool) -> int:
    """Weights that take part in a token's matmuls: the decoder layers, and the LM head for a policy."""
    h, q, kv = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    layer = h * q * 2 + h * kv * 2 + 3 * h * cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * layer + head * h * cfg["vocab_size"]


def count_tokens(tokens: dict[str, float], obj, method: str, key: str) -> None:
    """Add the tokens each call of obj.method runs through the model (generate: tokens sampled)."""
    real = getattr(obj, method)

    def counted(*args, **kwargs):
        res = real(*args, **kwargs)
        if method == "generate":
            n = float(res.response_mask.sum()) + res.prompt_mask.sum().item()
        else:
            batches = args[0] if isinstance(args[0], list) else [args[0]]
            n = float(sum(b.attention_mask.sum() for b in batches))
        tokens[key] = tokens.get(key, 0.0) + n
        return res

    setattr(obj, method, counted)


def build_model(path: Path, smoke: bool) -> None:
    """Random weights in a real shape, the character tokenizer (ids beyond it decode to nothing)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tempo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(**(SMOKE if smoke else QWEN3_06B), max_position_embeddings=4096, tie_word_embeddings=True,
                      rope_theta=1_000_000.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(path)  # bf16 on disk, as released checkpoints
    tok.save_pretrained(path)


def run_config(model: Path, backend: str, smoke: bool, profile: str = ""):
    from tempo.config import load_config

    prompts, labeled, n, tokens, micro, _ = SMOKE_RUN if smoke else GPU_RUN
    return load_config(None, [
        f"model.policy_path={model}", f"model.backend={backend}", "model.dtype=bfloat16",
        "algorithm.method=tempo", "algorithm.filter_groups=false", "algorithm.recalibrate_every=1",
        f"rollout.n={n}", f"rollout.max_new_tokens={tokens}", f"rollout.min_new_tokens={tokens}",
        f"train.prompts_per_step={prompts}", f"train.labeled_per_step={labeled}", "train.mini_batches=2",
        f"train.micro_batch_size={micro}", "train.policy_lr=1e-6", f"run.profile_steps={profile}",
        "task.num_unlabeled=64", "task.num_labeled=16", "task.num_heldout=0", "task.num_stage1=0"])


def em_steps(model: Path, backend: str, smoke: bool, profile: bool, out: Path) -> dict:
    """One warm-up step, then timed TEMPO steps (E-step and M-step every step)."""
    import torch

    from tempo.build import build_models, build_splits
    from tempo.em import EMTrainer
    from tempo.profiling import ProfileWindow

    prompts, _, n, tokens, _, steps = SMOKE_RUN if smoke else GPU_RUN
    cfg = run_config(model, backend, smoke, profile=f"{steps + 2}-{steps + 2}" if profile else "")  # after the timed
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    models = build_models(cfg, str(model), None, need_critic=True)
    trainer = EMTrainer(cfg, models, build_splits(cfg))
    build_s = time.perf_counter() - started
    phases: dict[str, float] = {}
    tokens_run: dict[str, float] = {}
    for obj, method, key in ((models.engine, "generate", "generate"), (models.policy, "infer", "policy_fwd"),
                             (models.policy, "train_step", "policy_train"), (models.critic, "infer", "critic_fwd"),
                             (models.critic, "train_step", "critic_train")):
        count_tokens(tokens_run, obj, method, key)
    clock(phases, models.engine, "generate", "rollout")
    clock(phases, models.engine, "sync_weights", "weight sync")
    clock(phases, models.policy, "infer", "old log-probs")
    clock(phases, models.policy, "train_step", "M-step")
    clock(phases, models.critic, "infer", "critic forward")
    clock(phases, models.critic, "train_step", "E-step")
    window = ProfileWindow(cfg.run.profile_steps, out)
    times, stats = [], {}
    for step in range(1, steps + 2):
        if step == 2:  # after the warm-up
            phases.clear()
            tokens_run.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    counted = dict(tokens_run)
    phases = {k: v / sum(times) for k, v in phases.items()}  # share of the timed steps
    shape = SMOKE if smoke else QWEN3_06B
    n_pol, n_crit = matmul_params(shape, True), matmul_params(shape, False)
    flops = (2 * n_pol * (counted.get("generate", 0) + counted.get("policy_fwd", 0))
             + 6 * n_pol * counted.get("policy_train", 0)
             + 2 * n_crit * counted.get("critic_fwd", 0) + 6 * n_crit * counted.get("critic_train", 0)) / len(times)

    last = {k: stats[k] for k in ("reward_mean", "entropy", "actor/pg_loss", "critic/value_loss", "actor/grad_norm",
                                  "critic/grad_norm") if k in stats}
    res = {
        "backend": backend, "build_s": build_s, "step_s": times, "median_step_s": statistics.median(times),
        "completion_tokens_per_s": prompts * n * tokens / statistics.median(times),
        "phase_share": {k: round(v, 3) for k, v in phases.items()},
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "tokens_per_step": {k: v / len(times) for k, v in counted.items()},
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / statistics.median(times) / PEAK_BF16_FLOPS,
        "last_step": last, "finite": all(math.isfinite(v) for v in last.values()),
    }
    if profile:  # after the figures are out: tracing a step and tabulating it take a while
        print("RESULT " + json.dumps(res, default=str), flush=True)
        step = steps + 2
        window.before(step)
        trainer.train_step()
        window.after(step)
        shutil.copy(out / "profile" / f"steps_{step}-{step}.txt", out / "profile.txt")
        shutil.rmtree(out / "profile")  # the Chrome trace is too large to bring back
        res["profiled_step"] = "profile.txt"
    return res


def vote_check(smoke: bool) -> dict:
    """torch.ops.tempo_vote.aggregate on CUDA tensors against the C++ kernel (answer hashes: 0 is
    "no answer"; a few distinct answers per group, so that votes and ties happen)."""
    import torch

    from tempo import vote

    if vote._ext is None:
        return {"error": "tempo._vote_ext is not built"}
    groups, size = (64, 8) if smoke else (8192, 64)
    g = torch.Generator().manual_seed(0)
    hashes = (torch.randint(0, 6, (groups, size), generator=g) * torch.randint(1, 2**40, (groups, 1), generator=g)).flatten()
    offsets = torch.arange(0, groups * size + 1, size)
    truth = torch.randint(0, 6, (groups,), generator=g) * torch.randint(1, 2**40, (groups,), generator=g)
    aggregate = torch.ops.tempo_vote.aggregate

    def timed(*args) -> tuple[float, tuple]:
        res = aggregate(*args)  # warm-up
        start = time.perf_counter()
        for _ in range(10):
            res = aggregate(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 10 * 1e3, res

    cpu_ms, cpu = timed(hashes, offsets, truth)
    out = {"groups": groups, "answers_per_group": size, "cpp_ms": cpu_ms}
    if not (vote._ext.with_cuda and torch.cuda.is_available()):
        return out | {"status": "C++ only: " + ("no GPU" if not torch.cuda.is_available() else
                                                 "the extension was built without CUDA")}
    cuda_ms, gpu = timed(hashes.cuda(), offsets.cuda(), truth.cuda())
    mismatched = [i for i, (x, y) in enumerate(zip(cpu, gpu))
                  if not torch.allclose(y.cpu().double(), x.double(), rtol=1e-6, atol=1e-6)]  # entropy: summed in another order
    out |= {"cuda_ms": cuda_ms, "outputs_equal": not mismatched}
    if mismatched:
        out["error"] = f"CUDA and C++ differ in outputs {mismatched}"
    return out


def vllm_parity(model: Path, smoke: bool) -> dict:
    """vLLM's sampling log-probs against the trainer's recomputed ones, on the same rows."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"status": "not available on this machine (vllm is not installed)"}
    import torch

    from tempo.build import build_models, build_splits
    from tempo.em import EMTrainer

    cfg = run_config(model, "hf", smoke)
    cfg.rollout.engine = "vllm"
    cfg.algorithm.method = "ttrl"
    models = build_models(cfg, str(model), None, need_critic=False)
    trainer = EMTrainer(cfg, models, build_splits(cfg))
    prompts = models.prompt_texts(trainer.collector.unlabeled.take(cfg.train.prompts_per_step), cfg.data.template)
    start = time.perf_counter()
    rollouts = models.engine.generate(prompts, cfg.rollout.n)
    gen_s = time.perf_counter() - start
    tokens = rollouts.token_batch()
    ours = models.policy.infer(tokens, cfg.train.micro_batch_size)["logp"]
    mask = tokens.response_mask.bool()
    diff = (ours - rollouts.logprobs).abs()[mask]
    # The weight sync an M-step ends with: sync_weights only records the export, the next
    # rollout loads it; time a one-prompt rollout with and without a pending load.
    def one_prompt_s() -> float:
        start = time.perf_counter()
        models.engine.generate(prompts[:1], 1)
        return time.perf_counter() - start

    bare_s = one_prompt_s()
    start = time.perf_counter()
    models.engine.sync_weights(models.policy.export_weights())
    sync_s = time.perf_counter() - start + one_prompt_s() - bare_s
    return {"status": "ran", "completion_tokens_per_s": float(mask.sum()) / gen_s, "weight_sync_s": sync_s,
            "logp_diff_mean": float(diff.mean()), "logp_diff_max": float(diff.max()),
            "rows": len(tokens), "torch": torch.__version__, "vllm": vllm.__version__}


def part(name: str, model: Path, smoke: bool, profile: bool, out: Path) -> None:
    try:
        if name == "vote":
            res = vote_check(smoke)
        elif name == "vllm":
            res = vllm_parity(model, smoke)
        else:
            res = em_steps(model, name, smoke, profile, out)
    except Exception:
        res = {"error": traceback.format_exc()[-4000:]}
    print("RESULT " + json.dumps(res, default=str), flush=True)


def env() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mod in ("transformers", "triton", "megatron.core", "vllm", "liger_kernel"):
        try:
            info[mod] = getattr(__import__(mod, fromlist=["_"]), "__version__", "present")
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    from tempo import vote

    info["vote_extension"] = "absent" if vote._ext is None else ("C++ and CUDA" if vote._ext.with_cuda else "C++ only")
    return info


def write_md(out: Path, data: dict) -> None:
    lines = ["# The trainer on a GPU (benchmarks/gpu_check.py)", "",
             "```", json.dumps(data["env"], indent=1), "```", ""]
    v = data["parts"].get("vote", {})
    lines += [f"vote aggregation, {v.get('groups')} groups × {v.get('answers_per_group')} answers: C++ "
              f"{v.get('cpp_ms', float('nan')):.2f} ms, CUDA {v.get('cuda_ms', float('nan')):.2f} ms, outputs equal: "
              f"{v.get('outputs_equal', v.get('status', v.get('error')))}", ""]
    lines += ["| part | median s/step | completion tokens/s | peak GPU GiB | MFU | phases (share of a step) |",
              "|---|---|---|---|---|---|"]
    for name in PARTS[1:]:
        r = data["parts"].get(name, {})
        if "median_step_s" in r:
            peak = "" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["phase_share"].items())
            lines.append(f"| {name} | {r['median_step_s']:.2f} | {r['completion_tokens_per_s']:.0f} | {peak} | "
                         f"{r['mfu']:.1%} | {shares} |")
        elif "logp_diff_max" in r:
            lines.append(f"| {name} | | {r['completion_tokens_per_s']:.0f} | | | |log π_train − log π_vllm| "
                         f"mean {r['logp_diff_mean']:.2e}, max {r['logp_diff_max']:.2e} |")
        else:
            lines.append(f"| {name} | {(r.get('status') or r.get('error', 'not run')).strip().splitlines()[-1][:160]} | | | | |")
    lines += ["", "```", json.dumps(data["parts"], indent=1, default=str)[:12000], "```"]
    (out / "system.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script's logic")
    ap.add_argument("--profile", action="store_true", help="one more HF step inside the profile window")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--budget-s", type=float, default=200.0, help="the parts' timeout, together")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:  # a child process
        part(args.part, args.model, args.smoke, args.profile, args.out)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: use --smoke to check the script on CPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    data: dict = {"env": env(), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model, args.smoke)
        for name in args.parts.split(","):
            left = deadline - time.time()
            if left < 20:
                data["parts"][name] = {"status": f"skipped: {left:.0f}s of the budget left"}
                continue
            cmd = [sys.executable, __file__, str(args.out), "--part", name, "--model", str(model)]
            cmd += ["--smoke"] * args.smoke + ["--profile"] * (args.profile and name == "hf")
            start = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                res = json.loads(line[-1][7:]) if line else {"error": f"rc={proc.returncode}\n{proc.stderr[-3000:]}"}
            except subprocess.TimeoutExpired as e:  # keep a result the part printed before it ran out
                printed = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                line = [l for l in printed.splitlines() if l.startswith("RESULT ")]
                res = json.loads(line[-1][7:]) if line else {}
                res["error"] = f"timeout after {left:.0f}s" + (" (in the profiled step)" if line else "")
            res["wall_s"] = round(time.time() - start, 1)
            data["parts"][name] = res
            print(f"[{name}] {json.dumps(res, default=str)[:600]}", flush=True)
            (args.out / "system.json").write_text(json.dumps(data, indent=1, default=str))
    write_md(args.out, data)
    print((args.out / "system.md").read_text())
    return 0 if all("error" not in r for r in data["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
