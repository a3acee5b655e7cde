"""Test-time-training methods as data: each is the same EM loop with different parts.

TTRL and EMPO are the loop without the E-step (their reward has no external anchor);
TEMPO anchors the critic to the labeled set D_L at every recalibration.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    unlabeled_reward: str  # critic | majority | cluster | none (no unlabeled prompts)
    labeled_in_m_step: bool  # labeled prompts join the policy batch with verified rewards
    recalibration: str  # every | never | adaptive: when the E-step runs
    advantage: str  # em_token (R_T − V_t, whitened) | grpo (group-normalised scores)
    description: str

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "em_token"


METHODS: dict[str, Method] = {
    "tempo": Method("critic", True, "every", "em_token",
                    "TEMPO: E-step recalibrates the critic on D_L, M-step uses its value on D_U"),
    "tempo-adaptive": Method("critic", True, "adaptive", "em_token",
                             "TEMPO, E-step only when the critic's Brier on the step's labeled rollouts rises"),
    "tempo-fixed-critic": Method("critic", True, "never", "em_token",
                                 "TEMPO with the stage-1 critic frozen (the authors' lr-0 config)"),
    "m-step-only": Method("critic", False, "never", "em_token",
                          "critic reward on D_U only, no labeled data after stage 1"),
    "ttrl": Method("majority", False, "never", "grpo",
                   "TTRL: reward = agreement with the majority-voted answer"),
    "empo": Method("cluster", False, "never", "grpo",
                   "EMPO: reward = frequency of the response's semantic answer cluster"),
    "rlvr": Method("none", True, "every", "em_token",
                   "RL with verifiable rewards on TEMPO's labeled prompts only: the control for the critic's reward on D_U"),
}
