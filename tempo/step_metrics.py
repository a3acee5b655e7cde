"""What one EM step logs beside its models' own statistics: how far the unlabeled reward has
drifted from the hidden truth (monitoring only), the reward, response length and entropy."""
from __future__ import annotations

import torch

from tempo import rewards
from tempo.collect import Batch
from tempo.methods import Method


def step_metrics(method: Method, batch: Batch, mask: torch.Tensor, reward: torch.Tensor, pseudo: torch.Tensor,
                 scored: dict | None, stats: dict[str, float]) -> dict[str, float]:
    """`stats` (the models' and the collection's) with the step's own figures. Without a
    scoring pass (`scored` None) the entropy is the M-step's, summed over its mini-batches."""
    out = dict(stats)
    if method.unlabeled is not None:
        out |= rewards.drift_stats(pseudo, method.unlabeled.threshold, batch.grades, ~batch.labeled_rows, batch.n)
    entropy_sum, tokens = out.pop("actor/entropy_sum", None), out.pop("actor/tokens", None)
    return out | {
        "skipped_step": 0.0,
        "reward_mean": float(reward.mean()),
        "response_len": float(mask.sum() / len(mask)),
        "entropy": entropy_sum / tokens if scored is None else float((scored["entropy"] * mask).sum() / mask.sum()),
        "no_answer_frac": float(sum(g.extracted is None for g in batch.grades) / len(batch.grades)),
    }
