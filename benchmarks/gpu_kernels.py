"""One-shot GPU check of tempo_kernels: correctness on CUDA, then timings; all into OUT_DIR.

    python benchmarks/gpu_kernels.py OUT_DIR [--wheels DIR] [--budget-s 480] [--skip-tests]
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py OUT_DIR --smoke    # logic check on CPU

Steps (each guarded: a failure is recorded and the script moves on):
 1. env: torch / triton / liger versions, GPU; `--wheels DIR` first installs liger-kernel
    from local wheels (pip --no-index --no-deps), the only extra it needs.
 2. tests: `pytest tests/test_kernels.py` on CUDA (the tests pick CUDA when present).
 3. checks at real sizes: Triton vs the float64 / float32 references for linear_logprob
    (fp32 and bf16, V=151,936), policy_loss, group_advantage, em_token_advantage.
 4. timings, bf16, V=151,936, d=4096, T in {8192, 16384}: forward+backward time (CUDA
    events, median) and peak memory beyond inputs and returned grads
    (max_memory_allocated - allocated after inputs - grads) of
      triton          linear_logprob (Triton path), logp only and logp + entropy
      torch_blocks    the blockwise torch path on CUDA
      materialised    (H @ W.T).float() -> log_softmax -> gather (what a plain trainer does)
      reference_fp32  linear_logprob_reference (inputs upcast to fp32)      [T=8192 only]
      liger_flce      liger-kernel LigerFusedLinearCrossEntropyLoss (fused LM head + CE)
    and the policy loss (Triton vs torch closed form vs autograd reference) and advantages.
 5. OUT_DIR/results.json and OUT_DIR/results.md (+ tests.txt).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Report:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.t0 = time.time()
        self.budget_s = budget_s
        self.only: set[str] = set()
        self.data: dict = {"sections": {}, "errors": {}}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def section(self, name, fn, *a, min_left=30.0, **kw):
        if self.only and name not in self.only and name != "env":
            return None
        if self.left() < min_left:
            self.data["errors"][name] = f"skipped: {self.left():.0f}s of budget left"
            return None
        t = time.time()
        try:
            res = fn(*a, **kw)
            self.data["sections"][name] = res
            return res
        except Exception:
            self.data["errors"][name] = traceback.format_exc()[-3000:]
            return None
        finally:
            print(f"[{name}] {time.time() - t:.1f}s", flush=True)
            self.save()

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


# --------------------------------------------------------------------------------------
def install_wheels(wheels: str) -> str:
    files = sorted(glob.glob(os.path.join(wheels, "liger_kernel-*.whl")))
    if not files:
        return f"no liger_kernel wheel in {wheels}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", files[-1]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return (p.stdout + p.stderr)[-800:]


def env_info(device) -> dict:
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "host": platform.node(),
    }
    for mod in ("triton", "liger_kernel"):
        try:
            info[mod] = __import__(mod).__version__ if mod == "triton" else _dist_version("liger-kernel")
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


def run_tests(out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "test_kernels.py", "-q", "-p", "no:cacheprovider"]
    t = time.time()
    try:
        # run from tests/ so that the repo root is not put first on sys.path (it would shadow names)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT / "tests"), timeout=timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"timeout after {timeout}s\n{e.stdout or ''}", -1
    (out / "tests.txt").write_text(text)
    return {"returncode": rc, "seconds": time.time() - t, "tail": text.strip().splitlines()[-3:]}


# --------------------------------------------------------------------------------------
def _maxrel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _maxabs(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check_logprob(device, T, V, d, dtype_name) -> dict:
    import torch
    from tempo_kernels.logprob import linear_logprob_reference, linear_logprob_triton

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(T, d, generator=g) * 0.05).to(device=device, dtype=dtype)
    w = (torch.randn(V, d, generator=g) * 0.05).to(device=device, dtype=dtype)
    lab = torch.randint(0, V, (T,), generator=g).to(device)
    gl = torch.randn(T, generator=g).to(device)
    ge = torch.randn(T, generator=g).to(device)
    ref_dt = torch.float64 if T * V <= 2**27 else torch.float32
    h64, w64 = h.to(ref_dt).requires_grad_(), w.to(ref_dt).requires_grad_()
    rlp, rent = linear_logprob_reference(h64, w64, lab, 0.9, True)
    rdh, rdw = torch.autograd.grad((rlp * gl).sum() + (rent * ge).sum(), [h64, w64])
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = linear_logprob_triton(hh, ww, lab, 0.9, True)
    dh, dw = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), [hh, ww])
    return {
        "shape": [T, V, d], "dtype": dtype_name, "reference_dtype": str(ref_dt),
        "logp_maxabs": _maxabs(lp, rlp), "entropy_maxabs": _maxabs(ent, rent),
        "dh_maxrel": _maxrel(dh, rdh), "dw_maxrel": _maxrel(dw, rdw),
    }


def check_small_ops(device, B=64, R=4096, N=8192) -> dict:
    import torch
    from tempo_kernels.advantage import (
        _em_token_advantage_triton, _group_advantage_triton,
        em_token_advantage_reference, group_advantage_reference,
    )
    from tempo_kernels.policy import policy_loss_reference, policy_loss_triton

    out = {}
    g = torch.Generator(device="cpu").manual_seed(1)
    old = -torch.rand(B, R, generator=g) * 3
    lp = old + torch.randn(B, R, generator=g) * 0.3
    adv = torch.randn(B, R, generator=g)
    lens = torch.randint(0, R + 1, (B,), generator=g)
    mask = torch.arange(R)[None] < lens[:, None]
    for kind in ("gspo", "ppo"):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            x = lp.to(device).requires_grad_()
            loss, st = policy_loss_triton(x, old.to(device), adv.to(device), mask.to(device),
                                          kind=kind, clip_c=3.0, agg=agg)
            (gx,) = torch.autograd.grad(loss, [x])
            x64 = lp.double().to(device).requires_grad_()
            rl, rst = policy_loss_reference(x64, old.double().to(device), adv.double().to(device),
                                            mask.to(device), kind=kind, clip_c=3.0, agg=agg)
            (rg,) = torch.autograd.grad(rl, [x64])
            out[f"policy_loss/{kind}/{agg}"] = {
                "loss_abs": abs(loss.item() - rl.item()), "grad_maxrel": _maxrel(gx, rg),
                "clipfrac_abs": abs(st["clipfrac"].item() - rst["clipfrac"].item()),
            }
    ids = torch.randint(0, N // 8, (N,), generator=g)
    sc = torch.randn(N, generator=g)
    a = _group_advantage_triton(sc.to(device), ids.to(device), 1e-6, True)
    out["group_advantage_maxabs"] = _maxabs(a.cpu(), group_advantage_reference(sc.double(), ids))
    rw, val = torch.randn(B, generator=g), torch.randn(B, R, generator=g)
    a = _em_token_advantage_triton(rw.to(device), val.to(device), mask.to(device), 1e-8)
    out["em_token_advantage_maxabs"] = _maxabs(a.cpu(), em_token_advantage_reference(rw.double(), val.double(), mask))
    return out


# --------------------------------------------------------------------------------------
def _time(fn, device, reps=5, warmup=1):
    import torch

    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _peak_mb(fn, device, grads_bytes, clear):
    import torch

    if device.type != "cuda":
        return None
    clear()  # the last run's grads are not part of the base
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - grads_bytes) / 2**20


def time_logprob(device, T, V, d, variants, reps) -> dict:
    import torch
    from tempo_kernels.logprob import linear_logprob_reference, linear_logprob_torch, linear_logprob_triton

    dt = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(2)
    H = (torch.randn(T, d, generator=g) * 0.05).to(device=device, dtype=dt).requires_grad_()
    W = (torch.randn(V, d, generator=g) * 0.05).to(device=device, dtype=dt).requires_grad_()
    lab = torch.randint(0, V, (T,), generator=g).to(device)

    def clear():
        H.grad = None
        W.grad = None

    def run_triton(ent):
        clear()
        lp, e = linear_logprob_triton(H, W, lab, 1.0, ent)
        ((lp.sum() + e.sum()) if ent else lp.sum()).backward()

    def run_torch_blocks():
        clear()
        lp, _ = linear_logprob_torch(H, W, lab, 1.0, False)
        lp.sum().backward()

    def run_materialised():
        clear()
        logits = (H @ W.T).float()
        lp = torch.log_softmax(logits, -1).gather(1, lab[:, None]).squeeze(1)
        lp.sum().backward()

    def run_reference():
        clear()
        lp, _ = linear_logprob_reference(H, W, lab, 1.0, False)
        lp.sum().backward()

    fns = {
        "triton_logp": lambda: run_triton(False),
        "triton_logp_entropy": lambda: run_triton(True),
        "torch_blocks": run_torch_blocks,
        "materialised": run_materialised,
        "reference_fp32": run_reference,
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def run_liger():
            clear()
            flce(W, H, lab).backward()

        fns["liger_flce"] = run_liger
    except Exception as e:  # liger not installed
        fns["liger_flce"] = None
        liger_err = f"{type(e).__name__}: {e}"
    grads = H.numel() * H.element_size() + W.numel() * W.element_size()
    res = {}
    for name in variants:
        fn = fns.get(name)
        if fn is None:
            res[name] = {"error": liger_err if name == "liger_flce" else "unknown variant"}
            continue
        try:
            ms = _time(fn, device, reps=reps)
            res[name] = {"ms": ms, "peak_mb": _peak_mb(fn, device, grads, clear)}
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": [T, V, d], "dtype": "bfloat16", "results": res}


def time_small_ops(device, B, R, reps) -> dict:
    import torch
    from tempo_kernels.advantage import (
        _em_token_advantage_torch, _em_token_advantage_triton, _group_advantage_torch, _group_advantage_triton,
    )
    from tempo_kernels.policy import policy_loss_reference, policy_loss_torch, policy_loss_triton

    g = torch.Generator(device="cpu").manual_seed(3)
    old = (-torch.rand(B, R, generator=g) * 3).to(device)
    lp0 = old + torch.randn(B, R, generator=g).to(device) * 0.3
    adv = torch.randn(B, R, generator=g).to(device)
    mask = (torch.arange(R)[None] < torch.randint(1, R + 1, (B,), generator=g)[:, None]).to(device)
    res = {}
    for name, fn in (("triton", policy_loss_triton), ("torch", policy_loss_torch), ("reference", policy_loss_reference)):
        x = lp0.clone().requires_grad_()

        def step(fn=fn, x=x):
            loss, _ = fn(x, old, adv, mask, kind="gspo", agg="seq-mean-token-mean")
            loss.backward()

        res[f"policy_loss_gspo/{name}"] = {"ms": _time(step, device, reps=reps)}
    vals = torch.randn(B, R, generator=g).to(device)
    rw = torch.randn(B, generator=g).to(device)
    res["em_token_advantage/triton"] = {"ms": _time(lambda: _em_token_advantage_triton(rw, vals, mask, 1e-8), device, reps)}
    res["em_token_advantage/torch"] = {"ms": _time(lambda: _em_token_advantage_torch(rw, vals, mask, 1e-8), device, reps)}
    N = B * 8
    sc = torch.randn(N, generator=g).to(device)
    ids = torch.arange(N, device=device) // 8
    res["group_advantage/triton"] = {"ms": _time(lambda: _group_advantage_triton(sc, ids, 1e-6, True), device, reps)}
    res["group_advantage/torch"] = {"ms": _time(lambda: _group_advantage_torch(sc, ids, 1e-6, True), device, reps)}
    return {"shape": [B, R], "results": res}


# --------------------------------------------------------------------------------------
def write_md(rep: Report, args) -> None:
    d = rep.data
    env = d["sections"].get("env", {})
    lines = ["# tempo_kernels: GPU check", "",
             f"- date: {env.get('date')}; device: {env.get('device')}; torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}); triton {env.get('triton')}; liger-kernel {env.get('liger_kernel')}",
             f"- command: `python benchmarks/gpu_kernels.py {' '.join(sys.argv[1:])}`", ""]
    t = d["sections"].get("tests")
    if t:
        lines += [f"## tests/test_kernels.py on CUDA: rc={t['returncode']} ({t['seconds']:.0f}s)",
                  "", "```", *t["tail"], "```", ""]
    checks = {k: v for k, v in d["sections"].items() if k.startswith("check")}
    if checks:
        lines += ["## correctness (Triton vs reference)", "", "```", json.dumps(checks, indent=1), "```", ""]
    for k, v in d["sections"].items():
        if not k.startswith("time"):
            continue
        lines += [f"## {k} {v.get('shape')}", "", "| variant | ms (median) | peak MB beyond inputs+grads |",
                  "|---|---:|---:|"]
        for name, r in v["results"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:120]} | |")
            else:
                pk = r.get("peak_mb")
                lines.append(f"| {name} | {r['ms']:.2f} | {'' if pk is None else f'{pk:.0f}'} |")
        lines.append("")
    if d["errors"]:
        lines += ["## errors / skipped", "", "```", json.dumps(d["errors"], indent=1)[:8000], "```"]
    (rep.out / "results.md").write_text("\n".join(lines) + "\n")


def ncu_target(device) -> None:
    """One forward+backward of each fused kernel at a Qwen3-0.6B-like LM-head shape, for ncu."""
    import torch
    from tempo_kernels.advantage import _group_advantage_triton
    from tempo_kernels.policy import policy_loss_triton

    from tempo_kernels.logprob import linear_logprob_triton

    g = torch.Generator(device="cpu").manual_seed(4)
    h = (torch.randn(4096, 1024, generator=g) * 0.05).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(151_936, 1024, generator=g) * 0.05).to(device, torch.bfloat16).requires_grad_()
    lab = torch.randint(0, 151_936, (4096,), generator=g).to(device)
    lp, ent = linear_logprob_triton(h, w, lab, 0.9, True)
    (lp.sum() + ent.sum()).backward()
    old = lp.detach().float().view(16, 256)
    x = (old + 0.1 * torch.randn(16, 256, generator=g).to(device)).requires_grad_()
    loss, _ = policy_loss_triton(x, old, torch.randn(16, 256, generator=g).to(device),
                                 torch.ones(16, 256, dtype=torch.bool, device=device), kind="gspo",
                                 agg="seq-mean-token-mean")
    loss.backward()
    _group_advantage_triton(torch.randn(2048, generator=g).to(device), torch.arange(2048, device=device) // 8, 1e-6, True)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--wheels", default=None, help="folder of local wheels (liger_kernel-*.whl)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (e.g. time_logprob_T16384)")
    ap.add_argument("--ncu-target", action="store_true", help="run each fused kernel once (under ncu), nothing else")
    args = ap.parse_args(argv)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.ncu_target:
        ncu_target(device)
        return 0
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: use --smoke (with TRITON_INTERPRET=1) to check the script on CPU")
        return 2
    rep = Report(args.out, args.budget_s)
    rep.only = set(filter(None, args.only.split(",")))
    if args.wheels:
        rep.section("install", install_wheels, args.wheels)
    rep.section("env", env_info, device)
    if not args.skip_tests and not args.smoke:
        rep.section("tests", run_tests, args.out, min(300.0, rep.left() - 120))
    if args.smoke:
        rep.section("check_logprob_fp32", check_logprob, device, 64, 1000, 64, "float32")
        rep.section("check_logprob_bf16", check_logprob, device, 64, 1000, 64, "bfloat16")
        rep.section("time_logprob_smoke", time_logprob, device, 64, 1000, 64,
                    ["triton_logp", "torch_blocks", "materialised", "reference_fp32", "liger_flce"], 1)
        rep.section("check_small_ops_smoke", check_small_ops, device, 4, 40, 64)
        rep.section("time_small_ops_smoke", time_small_ops, device, 4, 64, 1)
    else:
        rep.section("check_logprob_fp32", check_logprob, device, 2048, 151_936, 2048, "float32")
        rep.section("check_logprob_bf16", check_logprob, device, 4096, 151_936, 4096, "bfloat16")
        rep.section("check_small_ops", check_small_ops, device)
        all_v = ["triton_logp", "triton_logp_entropy", "torch_blocks", "materialised", "reference_fp32", "liger_flce"]
        rep.section("time_logprob_T8192", time_logprob, device, 8192, 151_936, 4096, all_v, 5, min_left=40)
        rep.section("time_logprob_T16384", time_logprob, device, 16384, 151_936, 4096,
                    [v for v in all_v if v != "reference_fp32"], 5, min_left=40)
        rep.section("time_small_ops", time_small_ops, device, 256, 8192, 10)
    rep.save()
    write_md(rep, args)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
