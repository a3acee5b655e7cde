"""Evaluation metrics: mean@k, pass@k, maj@k, diversity, and the critic's calibration."""
from __future__ import annotations

from math import comb

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outranks a random negative (ties count half).

    NaN when only one class is present: calibration is then undefined, not perfect.
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def brier(values: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score of the critic's value read as P(correct) = (V + 1) / 2, clipped to [0, 1]."""
    p = ((values.double() + 1) / 2).clamp(0, 1)
    return float(((p - labels.double()) ** 2).mean())
