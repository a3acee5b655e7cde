"""Test-time-training methods: each is the same EM loop (tempo.em) with its own parts.

A method is one entry of METHODS: where the reward of an unlabeled row comes from, how
advantages are made, when the E-step runs, and whether labeled prompts join the batch.
TTRL and EMPO are the loop without the E-step (their reward has no external anchor);
TEMPO anchors the critic to the labeled set D_L at every recalibration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tempo import algorithm, rewards
from tempo.grading import Grade


@dataclass(frozen=True)
class UnlabeledReward:
    """The pseudo-reward of an unlabeled row."""

    # From the group's own answers (TTRL, EMPO): (grades, group size) -> [rows]; None: the
    # critic's value at the last response column (TEMPO).
    self_score: Callable[[list[Grade], int], torch.Tensor] | None
    threshold: float  # the drift monitor reads a reward above this as "judged right"
    extra_votes: bool = False  # vote over max(n, algorithm.vote_samples) responses, train on n


@dataclass(frozen=True)
class Advantage:
    # (R, V, mask, n, kernels: the tempo_kernels implementation) -> [B, R]
    compute: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, int, str], torch.Tensor]
    wrong: float  # the verified reward of a wrong labeled answer
    uses_values: bool  # reads the critic's per-token values V


def em_token(reward: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, n: int,
             kernels: str) -> torch.Tensor:
    return algorithm.em_token_advantage(reward, values, mask, kernels)


def grpo(reward: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, n: int, kernels: str) -> torch.Tensor:
    return algorithm.grpo_advantage(reward, n, mask, kernels)


def em_outcome(reward: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, n: int,
               kernels: str) -> torch.Tensor:
    """The authors' `em` estimator: the terminal reward (a critic value clamped to [−1, 1] on
    unlabeled rows) normalised within its group, as GRPO, with no per-token baseline."""
    return algorithm.grpo_advantage(reward.clamp(-1.0, 1.0), n, mask, kernels)


# em_token regresses toward R ∈ {+1, −1}; TTRL's and EMPO's scores are in [0, 1].
EM_TOKEN = Advantage(em_token, wrong=-1.0, uses_values=True)
GRPO = Advantage(grpo, wrong=0.0, uses_values=False)
EM_OUTCOME = Advantage(em_outcome, wrong=-1.0, uses_values=False)


# When the E-step runs: (step, the critic's Brier on this step's labeled rows, what the
# schedule remembers, algorithm.recalibrate_every, algorithm.adaptive_brier) -> due.
Schedule = Callable[[int, float, dict, int, float], bool]


def never(step: int, brier: float, state: dict, every: int, margin: float) -> bool:
    return False


def periodic(step: int, brier: float, state: dict, every: int, margin: float) -> bool:
    return every > 0 and step % every == 0


def adaptive(step: int, brier: float, state: dict, every: int, margin: float) -> bool:
    """Only when the labeled batch's Brier rose `margin` above the first step's."""
    if state.get("brier_reference") is None:
        state["brier_reference"] = brier
        return False
    return brier > state["brier_reference"] + margin


CRITIC = UnlabeledReward(None, threshold=0.0)
MAJORITY = UnlabeledReward(rewards.majority_reward, threshold=0.5, extra_votes=True)
CLUSTER = UnlabeledReward(rewards.cluster_reward, threshold=0.5)


@dataclass(frozen=True)
class Method:
    description: str
    unlabeled: UnlabeledReward | None  # None: no unlabeled prompts
    labeled_prompts: bool  # train.labeled_per_step D_L prompts a step: verified rewards, the E-step's rows
    recalibrate: Schedule
    advantage: Advantage

    @property
    def uses_critic(self) -> bool:
        """A critic is built when the unlabeled reward or the advantage reads its values."""
        critic_reward = self.unlabeled is not None and self.unlabeled.self_score is None
        return critic_reward or self.advantage.uses_values


METHODS: dict[str, Method] = {
    "tempo": Method("TEMPO: E-step recalibrates the critic on D_L, M-step uses its value on D_U",
                    unlabeled=CRITIC, labeled_prompts=True, recalibrate=periodic, advantage=EM_TOKEN),
    "tempo-adaptive": Method("TEMPO, E-step only when the critic's Brier on the step's labeled rollouts rises",
                             unlabeled=CRITIC, labeled_prompts=True, recalibrate=adaptive, advantage=EM_TOKEN),
    "tempo-outcome": Method("TEMPO with the authors' outcome-level `em` advantage (their HiPhO script)",
                            unlabeled=CRITIC, labeled_prompts=True, recalibrate=periodic, advantage=EM_OUTCOME),
    "tempo-fixed-critic": Method("TEMPO with the stage-1 critic frozen (the authors' lr-0 config)",
                                 unlabeled=CRITIC, labeled_prompts=True, recalibrate=never, advantage=EM_TOKEN),
    "m-step-only": Method("critic reward on D_U only, no labeled data after stage 1",
                          unlabeled=CRITIC, labeled_prompts=False, recalibrate=never, advantage=EM_TOKEN),
    "ttrl": Method("TTRL: reward = agreement with the majority-voted answer",
                   unlabeled=MAJORITY, labeled_prompts=False, recalibrate=never, advantage=GRPO),
    "empo": Method("EMPO: reward = frequency of the response's semantic answer cluster",
                   unlabeled=CLUSTER, labeled_prompts=False, recalibrate=never, advantage=GRPO),
    "rlvr": Method("RL with verifiable rewards on TEMPO's labeled prompts only: the control for the critic's "
                   "reward on D_U", unlabeled=None, labeled_prompts=True, recalibrate=periodic, advantage=EM_TOKEN),
    "grpo": Method("RLVR as TRL and verl run it: verified reward on labeled prompts, group-normalised advantage, "
                   "no critic", unlabeled=None, labeled_prompts=True, recalibrate=never, advantage=GRPO),
}
