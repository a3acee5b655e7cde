"""Does the embedded default reach its regime whatever the seed and the processor's arithmetic?

    python benchmarks/regime_sweep.py [--seeds 0,1,2,3,4] [--settings default,avx2] [--out FILE]

For each dispatch setting and seed (base_model.seed = train.seed = the seed), in a fresh
process and a cache of its own, builds what `make run` builds before its first EM step: the
base policy (SFT until its held-out loss is near the teacher's floor), the verifier and the
stage-1 critic; then the step-0 evaluation. One row each: the SFT's held-out loss against the
floor and its steps, the verifier's steps, the stage-1 critic's passes, the critic's AUROC and
maj@8 − mean@8 on the held-out labeled slice (the regime check's two figures), and minutes.
The table goes to benchmarks/results/regime_sweep.md (default).

Settings imitate other processors on this one (ATen, MKL and oneDNN dispatch):
  default   what this processor picks
  avx2      ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  sse       ATEN_CPU_CAPABILITY=default (no vector extensions in ATen's kernels)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse": {"ATEN_CPU_CAPABILITY": "default"},
}


def row(setting: str, seed: int, config: str, extra: list[str]) -> dict:
    """Build and evaluate in a child process (the dispatch is read when torch loads)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "tempo.cli", "train", "--config", config, f"base_model.seed={seed}",
               f"train.seed={seed}", "train.steps=0", f"base_model.cache_dir={tmp}/cache", f"run.out_dir={tmp}/run",
               "run.save_checkpoints=false", "run.tensorboard=false", "run.progress=false", *extra]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **SETTINGS[setting]}, capture_output=True, text=True)
        minutes = (time.time() - start) / 60
        if proc.returncode:
            return {"setting": setting, "seed": seed, "minutes": minutes, "error": proc.stderr.strip().splitlines()[-1]}
        cache = Path(tmp) / "cache"
        built = {kind: json.loads(next(cache.glob(f"{kind}-*/build.json")).read_text())
                 for kind in ("base", "verifier", "stage1")}
        base = json.loads((Path(tmp) / "run" / "summary.json").read_text())["base"]
        return {"setting": setting, "seed": seed, "minutes": minutes, "sft": built["base"],
                "verifier": built["verifier"], "stage1": built["stage1"], "auroc": base["critic_auroc_heldout"],
                "vote_gain": base["heldout_maj@k"] - base["heldout_mean@k"], "heldout_mean": base["heldout_mean@k"],
                "du_mean": base["mean@k"]}


def passes(fit: dict) -> str:
    """Stage 1's critic passes (held-out pool AUROC), and those of a first fit it started over from."""
    text = f"{fit.get('epochs', 0):.0f} ({fit.get('validation_auroc', 0):.3f})"
    if "first_fit" in fit:
        text += f" after a first fit's {passes(fit['first_fit'])} and a restart at stage1.critic_retry_lr"
    return text


def table(rows: list[dict], tolerance: float) -> str:
    lines = ["| setting | seed | SFT steps | held-out loss − floor | verifier steps | stage-1 passes (pool AUROC) "
             "| critic AUROC | maj@8 − mean@8 (points) | held-out mean@8 | regime | minutes |", "|---" * 11 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['seed']} | error: {r['error'][:150]} |||||||| {r['minutes']:.1f} |")
            continue
        gap, ok = r["sft"]["heldout_loss"] - r["sft"]["floor"], r["auroc"] >= 0.80 and r["vote_gain"] >= 0.05
        lines.append(f"| {r['setting']} | {r['seed']} | {r['sft']['steps']} | {gap:.4f} (floor {r['sft']['floor']:.4f}) "
                     f"| {r['verifier']['steps']} | {passes(r['stage1'])} "
                     f"| {r['auroc']:.3f} "
                     f"| {100 * r['vote_gain']:+.1f} | {r['heldout_mean']:.3f} | {'passes' if ok else 'FAILS'} "
                     f"| {r['minutes']:.1f} |")
    passed = sum("error" not in r and r["auroc"] >= 0.80 and r["vote_gain"] >= 0.05 for r in rows)
    lines.append(f"\n{passed} of {len(rows)} rows pass the regime check (AUROC ≥ 0.80 and maj@8 − mean@8 ≥ +5 "
                 f"points, both on the held-out labeled slice); every SFT stopped within {tolerance} of its floor "
                 f"or the row shows its error.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--settings", default="default,avx2")
    ap.add_argument("--rows", default="", help="setting:seed pairs in this order, instead of --seeds x --settings")
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "regime_sweep.md")
    ap.add_argument("overrides", nargs="*", help="config overrides for every row (section.key=value)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tempo.config import load_config

    tolerance = load_config(ROOT / args.config, args.overrides).base_model.sft_tolerance
    rows, started, load = [], time.time(), os.getloadavg()[0]
    order = [(setting, int(seed)) for setting in args.settings.split(",") for seed in args.seeds.split(",")]
    if args.rows:
        order = [(r.split(":")[0], int(r.split(":")[1])) for r in args.rows.split(",")]
    for setting, seed in order:
        rows.append(row(setting, seed, args.config, args.overrides))
        print(json.dumps(rows[-1]), flush=True)
        which = f"--rows {args.rows}" if args.rows else f"--seeds {args.seeds} --settings {args.settings}"
        text = (f"# Regime sweep (`python benchmarks/regime_sweep.py {which}"
                f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`)\n\n"
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average at the start "
                f"{load:.2f}; {(time.time() - started) / 60:.0f} min in all.\n\n{table(rows, tolerance)}\n")
        args.out.write_text(text)
    print(text)
    return 0 if all("error" not in r and r["auroc"] >= 0.80 and r["vote_gain"] >= 0.05 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
