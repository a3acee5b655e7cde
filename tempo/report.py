"""End-of-run report: a markdown summary table and a PNG of the curves, from metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tempo.logger import read_metrics

HEADLINE = ("mean@k", "pass@k", "maj@k", "distinct_answers", "critic_auroc_heldout", "critic_brier_heldout")
CURVES = ("mean@k", "pass@k", "maj@k", "critic_auroc_heldout")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "eval"]


def summarise(rows: list[dict]) -> dict:
    """Base (step 0) and final evaluations. No "best step": choosing one by D_U's hidden
    answers would be oracle selection."""
    return {"base": rows[0], "final": rows[-1]}


def regime(base: dict) -> str:
    """Whether the miniature sits in the paper's regime before any method runs: a critic that
    separates right from wrong answers, and majority voting that helps the base policy. Both
    are read on the held-out labeled slice (D_U's answers are for the final score only)."""
    lines = []
    auroc = base.get("critic_auroc_heldout")
    if auroc is not None:
        lines.append(f"critic AUROC {auroc:.3f} ({'passes' if auroc >= 0.80 else 'FAILS'}: a useful verifier "
                     f"needs 0.80)")
    if "heldout_maj@k" in base:
        gap = (base["heldout_maj@k"] - base["heldout_mean@k"]) * 100
        lines.append(f"majority vote over the base policy's samples maj@k − mean@k {gap:+.1f} points "
                     f"({'passes' if gap >= 5 else 'FAILS'}: TTRL's initial rise needs +5)")
    if not lines:
        return "Regime check: no held-out labeled slice (task.num_heldout / data.heldout_files), nothing to check."
    return "Regime check (step 0, before any update, on the held-out labeled slice): " + "; ".join(lines) + "."


def markdown_table(named: dict[str, dict], keys=HEADLINE) -> str:
    lines = ["| | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, row in named.items():
        lines.append(f"| {name} | {row['step']} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


# Each panel's stated range (accuracies and AUROC are probabilities), so that a one-point
# wobble does not look like a trend, and its chance level where one is defined.
RANGES = {"mean@k": (0, 1), "pass@k": (0, 1), "maj@k": (0, 1), "critic_auroc_heldout": (0, 1)}


def plot_curves(series: dict[str, list[list[dict]]], path: Path, keys=CURVES,
                chance: dict[str, float] | None = None) -> None:
    """One panel a metric over steps, one line a series: the mean over its runs (seeds), with a
    band of ± one standard deviation when there are several; the base value (step 0) dotted in
    the series' colour, chance dashed grey (`chance`: the answer-guessing rate for accuracies;
    AUROC's is 0.5)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = {"critic_auroc_heldout": 0.5, **(chance or {})}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for name, runs in series.items():
            by_step: dict[int, list[float]] = {}
            for rows in runs:
                for r in rows:
                    if r.get(key) is not None:
                        by_step.setdefault(r["step"], []).append(r[key])
            steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))  # every run has it
            if not steps:
                continue
            mean = [statistics.mean(by_step[s]) for s in steps]
            line, = ax.plot(steps, mean, marker="o", ms=3, label=name)
            ax.axhline(mean[0], color=line.get_color(), ls=":", lw=1)
            if len(runs) > 1:
                std = [statistics.stdev(by_step[s]) for s in steps]
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, lw=0)
        if key in chance:
            ax.axhline(chance[key], color="grey", ls="--", lw=1, label="chance")
        if key in RANGES:
            ax.set_ylim(*RANGES[key])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, method: str, seconds: float, chance: dict[str, float] | None = None) -> dict:
    rows = evals(run_dir)
    summary = summarise(rows)
    table = markdown_table(summary)
    gain = (summary["final"]["mean@k"] - summary["base"]["mean@k"]) * 100
    text = (f"# {method}: {run_dir}\n\n{regime(summary['base'])}\n\n{table}\n\n"
            f"D_U mean@k change, base to final: {gain:+.1f} points; wall clock {seconds / 60:.1f} min.\n")
    (run_dir / "summary.md").write_text(text)
    summary["seconds"] = seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_curves({method: [rows]}, run_dir / "curves.png", chance=chance)
    print(text)
    return summary
