"""Reward sources and group statistics over rolled-out answers.

Labeled rows are verified against their answers. Unlabeled rows get a pseudo-reward:
the critic's last-token value (TEMPO), membership of a most-voted semantic answer cluster
(TTRL) or the size of the response's cluster (EMPO). Hidden answers of unlabeled rows
are graded too, but only to monitor how far each pseudo-reward drifts from the truth.
"""
from __future__ import annotations

import torch

from tempo import vote
from tempo.grading import Grade, extract_answer, grade_many, is_equivalent
from tempo.metrics import pass_at_k



def score(texts: list[str], answers: list[str | None], n: int) -> list[Grade]:
    """Grade n responses per problem. Without a known answer a response counts as wrong, but
    its extracted answer is kept: TTRL's vote and EMPO's clusters need it on unlabeled data."""
    truths = [a for a in answers for _ in range(n)]
    known = [i for i, t in enumerate(truths) if t is not None]
    graded = dict(zip(known, grade_many([texts[i] for i in known], [truths[i] for i in known])))
    return [graded.get(i) or Grade(extract_answer(texts[i]), False) for i in range(len(texts))]


def group_varies(grades: list[Grade]) -> bool:
    """A group carries signal only if its responses are not all right or all wrong."""
    return len({g.correct for g in grades}) > 1


def last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last valid response token: the critic's verdict on it."""
    last = (mask.cumsum(-1) * mask).argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1)


def _offsets(rows: int, n: int) -> torch.Tensor:
    return torch.arange(0, rows + 1, n, dtype=torch.long)


def cluster_ids(answers: list[str | None], n: int) -> torch.Tensor:
    """Per-group semantic classes: equal canonical forms first, then the grader's check."""
    hashes = vote.hash_answers(answers)
    return vote.merge_equivalent(answers, hashes, _offsets(len(answers), n), is_equivalent)


def cluster_shares(grades: list[Grade], n: int) -> torch.Tensor:
    """The share of its group in each response's semantic answer cluster; a response without
    an answer is a cluster of its own (1/n), as in the authors' code."""
    ids = cluster_ids([g.extracted for g in grades], n).view(-1, n)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids != 0)[:, :, None]
    same |= torch.eye(n, dtype=torch.bool)
    return same.float().mean(-1).flatten()


def majority_reward(grades: list[Grade], n: int) -> torch.Tensor:
    """TTRL as the authors compute it: 1 for every response in a cluster tied for the most
    votes, else 0."""
    share = cluster_shares(grades, n).view(-1, n)
    return (share == share.max(-1, keepdim=True).values).float().flatten()


def cluster_reward(grades: list[Grade], n: int) -> torch.Tensor:
    """EMPO: the share of the group in the response's semantic cluster (1/n without an answer)."""
    return cluster_shares(grades, n)


def group_metrics(grades: list[Grade], k: int, pass_k: int) -> dict[str, float]:
    """mean@k, pass@pass_k (unbiased, from k samples), maj@k, distinct answers, answer entropy."""
    answers = [g.extracted for g in grades]
    correct = torch.tensor([g.correct for g in grades]).view(-1, k)
    flat = vote.hash_answers(answers)
    stats = vote.aggregate(flat, _offsets(len(answers), k))
    hashes = flat.view(-1, k)
    # The majority answer is right when a response carrying it was graded right.
    counts = correct.sum(-1).tolist()
    maj_right = [bool(stats.majority[i] != 0) and bool(correct[i][hashes[i] == stats.majority[i]].any())
                 for i in range(len(counts))]
    return {
        "mean@k": float(correct.float().mean()),
        "pass@k": sum(pass_at_k(k, c, pass_k) for c in counts) / len(counts),
        "maj@k": sum(maj_right) / len(maj_right),
        "distinct_answers": float(stats.distinct.float().mean()),
        "answer_entropy": float(stats.entropy.mean()),
    }


def drift_stats(pseudo: torch.Tensor, threshold: float, grades: list[Grade], unlabeled: torch.Tensor,
                n: int) -> dict[str, float]:
    """How well the pseudo-reward tracks the hidden truth on this step's unlabeled rows."""
    if not unlabeled.any():
        return {}
    truth = torch.tensor([g.correct for g in grades], dtype=torch.float)[unlabeled]
    p = pseudo[unlabeled].float()
    agree = ((p > threshold).float() == truth).float().mean()
    corr = torch.corrcoef(torch.stack([p, truth]))[0, 1] if p.std() > 0 and truth.std() > 0 else torch.tensor(float("nan"))
    unl_grades = [g for g, u in zip(grades, unlabeled.tolist()) if u]
    maj = group_metrics(unl_grades, n, 1)
    return {
        "drift/pseudo_acc": float(agree),
        "drift/pseudo_corr": float(corr),
        "drift/true_acc_unlabeled": float(truth.mean()),
        "drift/majority_correct": maj["maj@k"],
        "drift/answer_entropy": maj["answer_entropy"],
    }
