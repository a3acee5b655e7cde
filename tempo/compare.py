"""`tempo compare`: several methods from one base model, seed and budget, side by side."""
from __future__ import annotations

import copy
import shlex
import sys
import time
from pathlib import Path

from tempo.config import Config, save_config, validate
from tempo.logger import read_metrics
from tempo.report import evals, markdown_table, plot_curves
from tempo.train import train

KEYS = ("mean@k", "pass@k", "maj@k", "distinct_answers", "answer_entropy", "critic_auroc_unlabeled")
DRIFT = ("drift/pseudo_acc", "drift/pseudo_corr", "drift/majority_correct", "drift/answer_entropy")


def _drift_rows(run_dir: Path, last: int = 5) -> dict:
    """Drift monitor averaged over the last `last` training steps (NaNs skipped)."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "train"][-last:]
    out = {"step": rows[-1]["step"] if rows else 0}
    for key in DRIFT:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def compare(cfg: Config, methods: list[str], out: str) -> str:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    series, minutes = {}, {}
    for method in methods:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.algorithm.method = method
        run_cfg.run.out_dir = str(out_dir / method)
        validate(run_cfg)
        started = time.time()
        train(run_cfg)
        minutes[method] = (time.time() - started) / 60
        series[method] = evals(out_dir / method)
    base = series[methods[0]][0]
    final = {m: rows[-1] for m, rows in series.items()}
    best = {m: max(rows, key=lambda r: r.get("mean@k") or 0.0) for m, rows in series.items()}
    drift = {m: _drift_rows(out_dir / m) for m in methods}
    plot_curves(series, out_dir / "comparison.png", keys=("mean@k", "pass@k", "maj@k", "distinct_answers"))
    command = "tempo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("tempo") else ""
    text = "\n\n".join([
        f"# Comparison on D_U ({len(methods)} methods, same base model, seed and budget)",
        f"Command: `{command}`" if command else "",
        "## Final step\n\n" + markdown_table({"base (after stage 1)": base, **final}, KEYS),
        "## Best step by mean@k\n\n" + markdown_table(best, KEYS),
        "## Drift monitor (mean of the last 5 training steps, unlabeled rows)\n\n"
        "pseudo_acc: share of rows where the pseudo-reward's verdict matches the hidden truth; "
        "pseudo_corr: their correlation; majority_correct: prompts whose majority answer is right.\n\n"
        + markdown_table(drift, DRIFT),
        "Wall clock per method (minutes): " + ", ".join(f"{m} {v:.1f}" for m, v in minutes.items()),
        "![curves](comparison.png)",
    ])
    (out_dir / "comparison.md").write_text(text + "\n")
    print(text)
    return text
