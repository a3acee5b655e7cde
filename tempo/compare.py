"""`tempo compare`: several methods from one base model and budget, over seeds, side by side.

Every figure is the **final** step's (picking the best step by D_U's hidden answers would be
oracle selection), as mean ± std over the seeds; the seeds vary the EM loop's sampling and
shuffles, while stage 1 (cached) is shared.
"""
from __future__ import annotations

import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

from tempo.config import Config, save_config, validate
from tempo.logger import read_metrics
from tempo.report import evals, plot_curves
from tempo.train import train

KEYS = ("mean@k", "pass@k", "maj@k", "distinct_answers", "critic_auroc_unlabeled")
DRIFT = ("drift/pseudo_acc", "drift/pseudo_corr", "drift/majority_correct")


def _drift(run_dir: Path, last: int = 5) -> dict:
    """Drift monitor averaged over the last `last` training steps (missing values skipped)."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "train"][-last:]
    out = {}
    for key in DRIFT:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def mean_std(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def table(named: dict[str, list[dict]], keys) -> str:
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, rows in named.items():
        lines.append(f"| {name} | " + " | ".join(mean_std(rows, k) for k in keys) + " |")
    return "\n".join(lines)


def compare(cfg: Config, methods: list[str], out: str, seeds: list[int]) -> str:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    final, base, drift, minutes = {}, [], {}, {}
    series = {}
    for method in methods:
        final[method], drift[method] = [], []
        started = time.time()
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.algorithm.method = method
            run_cfg.train.seed = seed
            run_cfg.run.out_dir = str(out_dir / method / f"seed{seed}")
            validate(run_cfg)
            train(run_cfg)
            rows = evals(Path(run_cfg.run.out_dir))
            final[method].append(rows[-1])
            drift[method].append(_drift(Path(run_cfg.run.out_dir)))
            if method == methods[0]:
                base.append(rows[0])
            series.setdefault(method, rows)  # the first seed's curve
        minutes[method] = (time.time() - started) / 60
    steps = final[methods[0]][0]["step"]
    plot_curves(series, out_dir / "comparison.png", keys=("mean@k", "pass@k", "maj@k", "distinct_answers"))
    command = "tempo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("tempo") else ""
    text = "\n\n".join(filter(None, [
        f"# Comparison on D_U: {len(methods)} methods × {len(seeds)} seeds (final step {steps}, mean ± std)",
        f"Command: `{command}`" if command else "",
        "Same config and budget for every method; seeds " + ", ".join(map(str, seeds))
        + ": the methods of a seed start from that seed's stage-1 models (each seed draws its own critic, so "
        "the ± includes the critic's draw). Final step only: no step is chosen by D_U's answers.",
        "## Final step\n\n" + table({"base (after stage 1)": base, **final}, KEYS),
        "## Drift monitor (last 5 training steps, unlabeled rows)\n\n"
        "pseudo_acc: share of rows where the pseudo-reward's verdict matches the hidden truth; "
        "pseudo_corr: their correlation; majority_correct: prompts whose majority answer is right.\n\n"
        + table(drift, DRIFT),
        "Wall clock per method, all seeds (minutes): " + ", ".join(f"{m} {v:.1f}" for m, v in minutes.items()),
        "![curves, first seed](comparison.png)",
    ]))
    (out_dir / "comparison.md").write_text(text + "\n")
    print(text)
    return text
