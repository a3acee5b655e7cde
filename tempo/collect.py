"""Steps 1 and 2 of the EM loop: the prompts a step trains on, rolled out and graded.

`train.mixing` says how labeled (D_L) and unlabeled (D_U) prompts meet in a step: a fixed
count from each, or one flagged stream (the authors' batches). Labeled groups whose rewards
all agree carry no signal and are dropped, and more prompts are rolled out in their place,
up to `algorithm.max_gen_batches` generation batches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tempo import rewards
from tempo.build import Models
from tempo.config import Config
from tempo.data import Problem
from tempo.errors import RefillError
from tempo.evaluate import roll
from tempo.grading import Grade
from tempo.methods import Method
from tempo.profiling import phase
from tempo.rollout.base import Rollouts
from tempo.task import TaskSplits


@dataclass
class Batch:
    """Rolled-out groups of one step, n rows per prompt."""

    problems: list[Problem]
    rollouts: Rollouts
    grades: list[Grade]  # unlabeled rows are graded only to monitor drift, never to train
    self_reward: torch.Tensor  # [rows] TTRL/EMPO pseudo-reward of unlabeled rows, else 0
    n: int

    @property
    def correct(self) -> torch.Tensor:
        return torch.tensor([g.correct for g in self.grades])

    @property
    def labeled_rows(self) -> torch.Tensor:
        return torch.tensor([p.is_labeled for p in self.problems]).repeat_interleave(self.n)


class Cycler:
    """Draws prompts without replacement, reshuffling (seeded) at the end of each pass."""

    def __init__(self, items: list[Problem], rng: random.Random):
        self.items, self.rng, self.order = items, rng, []

    def take(self, k: int) -> list[Problem]:
        out = []
        while len(out) < k and self.items:
            if not self.order:
                self.order = self.rng.sample(range(len(self.items)), len(self.items))
            out.append(self.items[self.order.pop()])
        return out


class Collector:
    """Draws a step's prompts from D_L and D_U (seeded cyclers, part of the resume state),
    rolls them out and keeps the groups that train."""

    def __init__(self, cfg: Config, method: Method, models: Models, splits: TaskSplits, rng: random.Random):
        self.cfg, self.method, self.models = cfg, method, models
        self.labeled = Cycler(splits.labeled, rng)
        self.unlabeled = Cycler(splits.unlabeled, rng)
        # train.mixing=flagged: one stream of the prompts the method trains on, each flagged
        self.stream = Cycler((splits.labeled if method.labeled_prompts else []) +
                             (splits.unlabeled if method.unlabeled is not None else []), rng)

    def state_dict(self) -> dict:
        return {"labeled_order": list(self.labeled.order), "unlabeled_order": list(self.unlabeled.order),
                "stream_order": list(self.stream.order)}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.order, self.unlabeled.order = list(state["labeled_order"]), list(state["unlabeled_order"])
        self.stream.order = list(state.get("stream_order", []))

    def roll(self, problems: list[Problem], n: int) -> tuple[Rollouts, list[Grade]]:
        with phase("rollout"):
            return roll(self.models, problems, n, self.cfg.data.template)

    def _kept_groups(self, problems: list[Problem], rollouts: Rollouts, grades: list[Grade],
                     self_reward: torch.Tensor, stats: dict[str, float]) -> Batch:
        """The groups of one generate call that train: every unlabeled group, and the labeled
        groups with a signal (rewards that differ; all of them when `algorithm.filter_groups`
        is off). Counts the labeled rollouts' accuracy and the dropped groups in `stats`."""
        n = self.cfg.rollout.n
        keep = []
        for i, p in enumerate(problems):
            group = grades[i * n:(i + 1) * n]
            if p.is_labeled:
                stats["labeled_right"] += sum(g.correct for g in group)
                stats["labeled_rolled"] += n
                if self.cfg.algorithm.filter_groups and not rewards.group_varies(group):
                    stats["dropped_groups"] += 1
                    continue
            keep.append(i)
        rows = torch.tensor([i * n + j for i in keep for j in range(n)], dtype=torch.long)
        return Batch([problems[i] for i in keep], rollouts.select(rows), [grades[r] for r in rows.tolist()],
                     self_reward[rows], n)

    def _unlabeled_groups(self, problems: list[Problem], rollouts: Rollouts, grades: list[Grade],
                          votes: int) -> Batch:
        """D_U groups: all `votes` responses score (TTRL votes), the first n are trained on."""
        n, source = self.cfg.rollout.n, self.method.unlabeled
        self_reward = source.self_score(grades, votes) if source.self_score else torch.zeros(len(grades))
        rows = torch.tensor([i * votes + j for i in range(len(problems)) for j in range(n)], dtype=torch.long)
        return Batch(problems, rollouts.select(rows), [grades[r] for r in rows.tolist()], self_reward[rows], n)

    def collect(self) -> tuple[Batch | None, dict[str, float]]:
        if self.cfg.train.mixing == "flagged":
            return self._collect_flagged()
        cfg, m, n = self.cfg, self.method, self.cfg.rollout.n
        # RLVR draws the same labeled prompts a step as TEMPO and nothing else: the control for
        # "does the critic's reward on D_U help?"
        want_labeled = cfg.train.labeled_per_step if m.labeled_prompts else 0
        want_unlabeled = 0 if m.unlabeled is None else cfg.train.prompts_per_step - want_labeled
        votes = max(n, cfg.algorithm.vote_samples) if m.unlabeled is not None and m.unlabeled.extra_votes else n
        stats = {"gen_batches": 0.0, "dropped_groups": 0.0, "labeled_right": 0.0, "labeled_rolled": 0.0}
        parts, kept = [], 0
        labeled, unlabeled = self.labeled.take(want_labeled), self.unlabeled.take(want_unlabeled)
        if unlabeled:
            # The first labeled prompts ride in the unlabeled prompts' generate call when they
            # want as many samples: the engine runs one large batch faster than two small ones.
            ride, labeled = (labeled, []) if votes == n else ([], labeled)
            rollouts, grades = self.roll(ride + unlabeled, votes)
            cut = len(ride) * n
            if ride:
                stats["gen_batches"] += 1
                parts.append(self._kept_groups(ride, rollouts.select(torch.arange(cut)), grades[:cut],
                                               torch.zeros(cut), stats))
                kept = len(parts[-1].problems)
            parts.append(self._unlabeled_groups(unlabeled, rollouts.select(torch.arange(cut, len(grades))),
                                                grades[cut:], votes))
        # Labeled groups dropped for lack of signal are replaced by new prompts, up to a cap.
        while (labeled or kept < want_labeled) and stats["gen_batches"] < cfg.algorithm.max_gen_batches:
            labeled = labeled or self.labeled.take(want_labeled - kept)
            rollouts, grades = self.roll(labeled, n)
            stats["gen_batches"] += 1
            parts.append(self._kept_groups(labeled, rollouts, grades, torch.zeros(len(grades)), stats))
            kept += len(parts[-1].problems)
            labeled = []
        stats = self._accuracy(stats)
        if not any(p.problems for p in parts):  # every group was filtered out: nothing to learn from this step
            return None, stats
        return self._joined(parts), stats

    def _joined(self, parts: list[Batch], cut: int | None = None) -> Batch:
        """One batch of the parts' groups in order; with `cut`, of the first `cut` groups."""
        n, taken, left = self.cfg.rollout.n, [], cut
        for p in parts:
            k = len(p.problems) if left is None else min(len(p.problems), left)
            if k:
                taken.append(p if k == len(p.problems) else Batch(
                    p.problems[:k], p.rollouts.select(torch.arange(k * n)), p.grades[:k * n], p.self_reward[:k * n], n))
            left = None if left is None else left - k
        return Batch([q for p in taken for q in p.problems],
                     Rollouts.concat([p.rollouts for p in taken], self.models.tokenizer.pad_token_id),
                     [g for p in taken for g in p.grades], torch.cat([p.self_reward for p in taken]), n)

    @staticmethod
    def _accuracy(stats: dict[str, float]) -> dict[str, float]:
        """Accuracy over every labeled rollout, before groups without signal were dropped."""
        right, rolled = stats.pop("labeled_right"), stats.pop("labeled_rolled")
        if rolled:
            stats["labeled_acc"] = right / rolled
        return stats

    def _collect_flagged(self) -> tuple[Batch, dict[str, float]]:
        """The authors' batches: prompts_per_step prompts a generation batch from one shuffled
        stream, labeled groups without signal dropped, whole batches drawn again until
        prompts_per_step groups are kept, then cut to that many, in stream order."""
        cfg, n, want = self.cfg, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        source = self.method.unlabeled
        stats = {"gen_batches": 0.0, "dropped_groups": 0.0, "labeled_right": 0.0, "labeled_rolled": 0.0}
        parts, kept = [], 0
        while kept < want:
            if stats["gen_batches"] == cfg.algorithm.max_gen_batches:
                raise RefillError(f"algorithm.max_gen_batches: {cfg.algorithm.max_gen_batches} generation batches kept "
                                  f"{kept} of train.prompts_per_step={want} prompts (labeled groups whose "
                                  f"rollouts all agree are dropped); raise it, or use train.mixing=fixed")
            drawn = self.stream.take(want)
            rollouts, grades = self.roll(drawn, n)
            stats["gen_batches"] += 1
            scores = source.self_score(grades, n) if source and source.self_score else torch.zeros(len(grades))
            parts.append(self._kept_groups(drawn, rollouts, grades, scores, stats))
            kept += len(parts[-1].problems)
        return self._joined(parts, cut=want), self._accuracy(stats)
