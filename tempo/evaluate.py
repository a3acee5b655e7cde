"""Evaluation as a function of (models, problems, eval config): used by the EM loop every
`eval.every` steps and by `tempo eval` on a checkpoint, which needs nothing but D_U."""
from __future__ import annotations

import torch

from tempo import rewards
from tempo.build import Models, build_models, build_splits
from tempo.config import Config
from tempo.data import Problem
from tempo.grading import Grade
from tempo.metrics import auroc, brier
from tempo.report import markdown_table
from tempo.rollout.base import Rollouts


def roll(models: Models, problems: list[Problem], n: int, template: str) -> tuple[Rollouts, list[Grade]]:
    """n responses per problem, graded against its answer (None: ungraded)."""
    rollouts = models.engine.generate(models.prompt_texts(problems, template), n)
    return rollouts, rewards.score(rollouts.texts, [p.answer for p in problems], n)


@torch.no_grad()
def evaluate(models: Models, unlabeled: list[Problem], heldout: list[Problem], cfg: Config) -> dict[str, float]:
    """mean@k, pass@k, maj@k and diversity on D_U with its hidden answers (to report, never to
    choose settings by), the same on the held-out labeled slice, and with a critic its AUROC
    and Brier on both."""
    e = cfg.eval
    problems = unlabeled[: e.max_prompts or None]
    rollouts, scored = roll(models, problems, e.k, cfg.data.template)
    out = rewards.group_metrics(scored, e.k, e.pass_k)
    out["no_answer_frac"] = sum(s.extracted is None for s in scored) / len(scored)
    if models.critic is not None:
        out.update(calibration(models, rollouts, scored, "unlabeled", cfg.train.micro_batch_size))
    if heldout:  # labeled and never trained on: what a user may look at to choose settings
        held_rollouts, held_scored = roll(models, heldout, e.k, cfg.data.template)
        held = rewards.group_metrics(held_scored, e.k, e.pass_k)
        out.update({f"heldout_{k}": held[k] for k in ("mean@k", "pass@k", "maj@k")})
        if models.critic is not None:
            out.update(calibration(models, held_rollouts, held_scored, "heldout", cfg.train.micro_batch_size))
    return out


def calibration(models: Models, rollouts: Rollouts, scored: list[Grade], name: str, micro_batch: int) -> dict[str, float]:
    """The critic's verdict (value at the last response column) against the truth."""
    tokens = rollouts.token_batch()
    values = models.critic.infer(tokens, micro_batch)["values"]
    last = rewards.last_token(values, tokens.response_mask)
    truth = torch.tensor([s.correct for s in scored], dtype=torch.float)
    return {f"critic_auroc_{name}": auroc(last, truth), f"critic_brier_{name}": brier(last, truth)}


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """`tempo eval`: a policy checkpoint (and `model.critic_path`, if given) on D_U."""
    critic = cfg.model.critic_path or None
    models = build_models(cfg, checkpoint, critic, need_critic=critic is not None)
    splits = build_splits(cfg)
    metrics = evaluate(models, splits.unlabeled, splits.heldout, cfg)
    print(markdown_table({checkpoint: {"step": "-", **metrics}}))
    return metrics
