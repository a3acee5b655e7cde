"""`tempo compare`: several methods from one base model and budget, over seeds, side by side.

Every figure is the **final** step's, or that of fixed steps named before the run (`--at`, for
a run's course: 1×, 2×, 4× a budget); never a step picked by D_U's hidden answers, which
would be oracle selection. Figures are mean ± std over the seeds; a seed draws the EM loop's
sampling and shuffles and its own stage-1 critic (cached per seed). A run that finished under the same
config in the output folder is read, not run again: a long comparison can be run in parts.
"""
from __future__ import annotations

import copy
import json
import logging
import shlex
import statistics
import sys
from pathlib import Path

from tempo.config import Config, config_diff, load_config, save_config, validate
from tempo.errors import ConfigError
from tempo.logger import read_metrics
from tempo.report import plot_curves
from tempo.train import train

# critic_auroc_heldout beside D_U's: the labeled slice is where a setting may be chosen
KEYS = ("mean@k", "pass@k", "maj@k", "distinct_answers", "critic_auroc_unlabeled", "critic_auroc_heldout")
# the pseudo-reward against the hidden truth, and how right the rows the E-step learns from are
DRIFT = ("drift/pseudo_acc", "drift/pseudo_corr", "drift/majority_correct", "drift/true_acc_unlabeled", "labeled_acc")

log = logging.getLogger("tempo")


# Keys that do not change a run's numbers: where it is written and cached, what it logs.
BESIDE_THE_RESULT = {"run.out_dir", "run.progress", "run.tensorboard", "run.profile_steps", "run.resume",
                     "run.save_checkpoints", "run.checkpoint_every", "run.keep_checkpoints", "base_model.cache_dir"}


def finished(cfg: Config, run_dir: Path) -> dict | None:
    """The summary of a run that finished in `run_dir` under `cfg` (keys beside the result
    aside), else None."""
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return None
    if set(config_diff(load_config(saved), cfg)) - BESIDE_THE_RESULT:
        return None
    return json.loads(summary.read_text())


def _drift(records: list[dict], step: int, last: int = 5) -> dict:
    """Drift monitor averaged over the `last` training steps up to `step` (missing values skipped)."""
    rows = [r for r in records if r["phase"] == "train" and r["step"] <= step][-last:]
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


def compare(cfg: Config, methods: list[str], out: str, seeds: list[int], at: list[int] | None = None,
            name: str = "comparison") -> str:
    """Each method for each seed from the same config; tables at the final step (or at each
    step of `at`, which every run must evaluate) and the curves, mean ± std over the seeds,
    in `out`/`name`.md and .png."""
    at = at or [cfg.train.steps]
    if any(step % cfg.eval.every and step != cfg.train.steps or step > cfg.train.steps for step in at):
        raise ConfigError(f"--at {','.join(map(str, at))}: each step must be one the runs evaluate "
                          f"(a multiple of eval.every={cfg.eval.every}, at most train.steps={cfg.train.steps})")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    runs: dict[str, list[list[dict]]] = {}  # each run's metrics.jsonl records
    series: dict[str, list[list[dict]]] = {}
    minutes = {}  # each run's own wall time (stage 1 included when it built it), summed
    for method in methods:
        runs[method], series[method], minutes[method] = [], [], 0.0
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.algorithm.method = method
            run_cfg.train.seed = seed
            run_cfg.run.out_dir = str(out_dir / method / f"seed{seed}")
            validate(run_cfg)
            summary = finished(run_cfg, Path(run_cfg.run.out_dir))
            if summary is None:
                summary = train(run_cfg)
            else:
                log.info("%s, seed %d: finished under this config in %s, read", method, seed, run_cfg.run.out_dir)
            minutes[method] += summary["seconds"] / 60
            runs[method].append(read_metrics(Path(run_cfg.run.out_dir) / "metrics.jsonl"))
            series[method].append([r for r in runs[method][-1] if r["phase"] == "eval"])
    base = [rows[0] for rows in series[methods[0]]]
    plot_curves(series, out_dir / f"{name}.png", keys=("mean@k", "pass@k", "maj@k", "distinct_answers"))
    command = "tempo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("tempo") else ""
    sections = []
    for step in at:
        final = {m: [next(r for r in rows if r["step"] == step) for rows in series[m]] for m in methods}
        drift = {m: [_drift(run, step) for run in runs[m]] for m in methods}
        title = "Final step" if at == [cfg.train.steps] else f"Step {step}"
        sections += [f"## {title}\n\n" + table({"base (after stage 1)": base, **final}, KEYS),
                     f"Training monitor, the 5 training steps up to step {step}\n\n" + table(drift, DRIFT)]
    which = f"final step {cfg.train.steps}" if at == [cfg.train.steps] else "steps " + ", ".join(map(str, at))
    text = "\n\n".join(filter(None, [
        f"# Comparison on D_U: {len(methods)} methods × {len(seeds)} seeds ({which}, mean ± std)",
        f"Command: `{command}`" if command else "",
        "Same config and budget for every method; seeds " + ", ".join(map(str, seeds))
        + ": the methods of a seed start from that seed's stage-1 models (each seed draws its own critic, so "
        "the ± includes the critic's draw). Fixed steps only: no step is chosen by D_U's answers.",
        "Training monitor, on the unlabeled rows: pseudo_acc, share of rows where the pseudo-reward's verdict "
        "matches the hidden truth; pseudo_corr, their correlation; majority_correct, prompts whose majority "
        "answer is right; true_acc_unlabeled, rows right. On D_L's rows: labeled_acc, rows right.",
        *sections,
        "Wall clock per method, all seeds (minutes): " + ", ".join(f"{m} {v:.1f}" for m, v in minutes.items()),
        f"![curves, mean ± std over {len(seeds)} seeds]({name}.png)",
    ]))
    (out_dir / f"{name}.md").write_text(text + "\n")
    print(text)
    return text
