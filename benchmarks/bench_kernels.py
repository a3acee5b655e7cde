"""CPU benchmark of tempo_kernels: time and peak memory, side by side in one run.

  A. log-prob + entropy, forward + backward to H and W:
       materialised  (logits -> log_softmax -> gather, + entropy; `linear_logprob_reference`)
       chunked       (`linear_logprob_torch`, the path `linear_logprob` runs on CPU)
  B. LM head + clipped policy loss, forward + backward to H and W (same H, W shapes):
       liger         liger-kernel 0.8.5 `LigerFusedLinearGRPOLoss` (plain PyTorch on CPU:
                     compiled=False, use_ref_model=False, beta=0, loss_type="dapo" = token-mean,
                     chunk_size=1 sequence)
       ours          `linear_logprob_torch` + `policy_loss_torch` (kind="ppo", agg="token-mean")

Memory: every variant runs in a FRESH subprocess. After the inputs are
allocated it records VmRSS, resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), runs forward + backward once, reads VmHWM, and reports
    op peak = VmHWM - VmRSS(after inputs) - bytes(dH) - bytes(dW)
i.e. what the op allocates beyond its inputs and the gradients it must return. The time is
measured inside the subprocess around forward + backward only (pytest-benchmark's own
figure for each test is the subprocess wall time, start-up and input allocation included).

Run (heavy: ~3-5 min on 2 cores; writes benchmarks/results/kernels_cpu.md):
    .venv/bin/pip install --no-deps liger-kernel==0.8.5   # for variant B
    .venv/bin/pytest benchmarks/bench_kernels.py -q -s
    BENCH_KERNELS_CONFIGS=small .venv/bin/pytest benchmarks/bench_kernels.py -q -s   # quick
or  .venv/bin/python benchmarks/bench_kernels.py [main|small|all]
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "results" / "kernels_cpu.md"


@dataclass(frozen=True)
class Cfg:
    name: str
    T: int  # tokens = B * R
    V: int
    d: int
    B: int  # sequences (policy-loss variants)
    dtype: str = "float32"


CONFIGS = {
    "main": [Cfg("V151936-d2048-T2048", 2048, 151_936, 2048, 4)],
    "small": [
        Cfg("V32768-d1024-T1024", 1024, 32_768, 1024, 4),
        Cfg("V151936-d1024-T1024", 1024, 151_936, 1024, 4),
    ],
}
CONFIGS["all"] = CONFIGS["small"] + CONFIGS["main"]
CONFIGS["tiny"] = [Cfg("V4099-d256-T256", 256, 4099, 256, 4)]  # smoke test of the script
VARIANTS = ["logprob_materialised", "logprob_chunked", "grpo_liger", "grpo_ours"]


# --------------------------------------------------------------------------------------
# worker (fresh process per variant)
# --------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(variant: str, cfg: Cfg) -> dict:
    import torch

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    T, V, d, B = cfg.T, cfg.V, cfg.d, cfg.B
    R = T // B
    H = torch.randn(T, d).mul_(0.05).to(dtype).requires_grad_()
    W = torch.randn(V, d).mul_(0.05).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,))
    old = (-torch.rand(B, R) * 3).contiguous()
    adv_seq = torch.randn(B)
    adv_tok = adv_seq[:, None].expand(B, R).contiguous()
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[0, R // 2:] = False  # one shorter response
    if variant == "grpo_liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=False, use_ref_model=False, chunk_size=1,
            epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
        )
    from tempo_kernels.logprob import linear_logprob_reference, linear_logprob_torch
    from tempo_kernels.policy import policy_loss_torch

    def run():
        if variant == "logprob_materialised":
            lp, ent = linear_logprob_reference(H, W, labels, 1.0, True)
            (lp.sum() + ent.sum()).backward()
            return float(lp.detach().double().sum())
        if variant == "logprob_chunked":
            lp, ent = linear_logprob_torch(H, W, labels, 1.0, True)
            (lp.sum() + ent.sum()).backward()
            return float(lp.detach().double().sum())
        if variant == "grpo_liger":
            out = liger(H.view(B, R, d), W, labels.view(B, R), mask.long(), adv_seq, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return float(loss)
        if variant == "grpo_ours":
            lp, _ = linear_logprob_torch(H, W, labels)
            loss, _ = policy_loss_torch(lp.view(B, R), old, adv_tok, mask, kind="ppo",
                                        clip_low=0.2, clip_high=0.2, agg="token-mean")
            loss.backward()
            return float(loss)
        raise ValueError(variant)

    gc.collect()
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - t0
    if exact:
        peak_kb = _status_kb("VmHWM")
    else:  # fall back to the process-lifetime peak (over-counts input allocation temporaries)
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = H.grad.nbytes + W.grad.nbytes
    return {
        "variant": variant,
        "config": cfg.name,
        "seconds": seconds,
        "op_peak_mb": (peak_kb * 1024 - base_kb * 1024 - grads) / 2**20,
        "rss_after_inputs_mb": base_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "grads_mb": grads / 2**20,
        "value": value,
        "threads": torch.get_num_threads(),
        "peak_method": "VmHWM after clear_refs" if exact else "ru_maxrss",
    }


def run_variant(variant: str, cfg: Cfg) -> dict:
    """Run one variant in a fresh Python process and return its measurements."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT / "benchmarks"))
    if proc.returncode != 0:
        return {"variant": variant, "config": cfg.name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# results file
# --------------------------------------------------------------------------------------
def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = "not installed"
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def results_path(which: str) -> Path:
    return RESULTS_MD if which == "main" else RESULTS_MD.with_name(f"kernels_cpu_{which}.md")


def write_results(results: list[dict], command: str, load: tuple, which: str = "main") -> Path:
    lines = [
        "# tempo_kernels: CPU benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM (shared with other jobs)",
        f"- load average before / after: {load[0]} / {load[1]}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in _versions().items())}",
        f"- command: `{command}`",
        "- memory: op peak = VmHWM - VmRSS(after inputs) - bytes(dH, dW), each variant in a fresh "
        "subprocess, peak counter reset with /proc/self/clear_refs",
        "- time: forward + backward, measured in the subprocess around the op, one run",
        "- the machine is shared: absolute times move with the load of other jobs (load average "
        "above); compare the ratios, measured side by side in one run",
        "- acceptance target (issue): chunked log-prob op peak <= 1/8 of the materialised path's, "
        "speed >= 0.8x",
        "",
    ]
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in results:
        by_cfg.setdefault(r["config"], {})[r["variant"]] = r
    for cfg, rows in by_cfg.items():
        lines += [f"## {cfg} (fp32)", "",
                  "| variant | time (s) | op peak (MB) | speed vs baseline | memory vs baseline | value |",
                  "|---|---:|---:|---:|---:|---:|"]
        for group, base in (("logprob_", "logprob_materialised"), ("grpo_", "grpo_liger")):
            b = rows.get(base, {})
            for name, r in rows.items():
                if not name.startswith(group):
                    continue
                if "error" in r:
                    lines.append(f"| {name} | error: {r['error']} | | | | |")
                    continue
                sp = mem = ""
                if "seconds" in b:
                    sp = f"{b['seconds'] / r['seconds']:.2f}x"
                    mem = f"{r['op_peak_mb'] / b['op_peak_mb']:.3f}" if b["op_peak_mb"] > 0 else ""
                lines.append(f"| {name} | {r['seconds']:.1f} | {r['op_peak_mb']:.0f} | {sp} | {mem} | "
                             f"{r['value']:.6g} |")
        t = next(iter(rows.values())).get("threads", "?")
        lines += ["", f"baselines: logprob_materialised, grpo_liger; torch threads: {t}. "
                  "speed = baseline time / time (>1 is faster); memory = op peak / baseline op peak.", ""]
    path = results_path(which)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def selected_configs() -> list[Cfg]:
    return CONFIGS[os.environ.get("BENCH_KERNELS_CONFIGS", "main")]


# --------------------------------------------------------------------------------------
# pytest-benchmark entry points
# --------------------------------------------------------------------------------------
_RESULTS: list[dict] = []
_LOAD0 = os.getloadavg()

try:
    import pytest

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("cfg", selected_configs(), ids=lambda c: c.name)
    def test_kernels_cpu(benchmark, cfg, variant):
        res = benchmark.pedantic(run_variant, args=(variant, cfg), rounds=1, iterations=1)
        benchmark.extra_info.update(res)
        _RESULTS.append(res)
        assert "error" not in res, res

    def test_write_results():
        if not _RESULTS:
            pytest.skip("no benchmark ran")
        load = (" ".join(f"{x:.1f}" for x in _LOAD0), " ".join(f"{x:.1f}" for x in os.getloadavg()))
        cfgs = os.environ.get("BENCH_KERNELS_CONFIGS", "main")
        cmd = f"BENCH_KERNELS_CONFIGS={cfgs} .venv/bin/pytest benchmarks/bench_kernels.py -q -s"
        print("\nwrote", write_results(_RESULTS, cmd, load, cfgs))

except ImportError:  # pragma: no cover
    pass


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        print(json.dumps(_worker(argv[1], Cfg(**json.loads(argv[2])))))
        return
    which = argv[0] if argv else "main"
    results = []
    for cfg in CONFIGS[which]:
        for v in VARIANTS:
            r = run_variant(v, cfg)
            print(json.dumps(r), flush=True)
            results.append(r)
    load = (" ".join(f"{x:.1f}" for x in _LOAD0), " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("wrote", write_results(results, f".venv/bin/python benchmarks/bench_kernels.py {which}", load, which))


if __name__ == "__main__":
    main(sys.argv[1:])
