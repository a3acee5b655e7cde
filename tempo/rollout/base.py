"""What the EM loop needs from a rollout engine (HF generate on CPU, vLLM on GPUs)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import torch

from tempo.config import RolloutConfig
from tempo.errors import ConfigError
from tempo.models.base import TokenBatch


@dataclass
class Rollouts:
    """n responses per prompt; prompt i's samples are rows i*n .. i*n+n-1."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] right-padded
    response_mask: torch.Tensor  # [B, R] float: tokens up to and including EOS
    # [B, R] the engine's log-prob of each sampled token, or None: the trainer always recomputes
    # log-probs with the policy (the fused kernel), so an engine reports them only when they
    # come free (vLLM) and can be compared with the trainer's.
    logprobs: torch.Tensor | None
    texts: list[str]  # decoded responses, special tokens removed
    truncated: torch.Tensor  # [B] bool: hit max_new_tokens without EOS

    def select(self, rows: torch.Tensor) -> "Rollouts":
        return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                        self.response_mask[rows], None if self.logprobs is None else self.logprobs[rows],
                        [self.texts[i] for i in rows.tolist()],
                        self.truncated[rows])

    @staticmethod
    def concat(parts: list["Rollouts"], pad_id: int) -> "Rollouts":
        """Stack several generate calls, re-padding prompts (left) and responses (right)."""
        P = max(p.prompt_ids.shape[1] for p in parts)
        R = max(p.response_ids.shape[1] for p in parts)

        def left(t, width, value):
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        def right(t, width, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Rollouts(
            torch.cat([left(p.prompt_ids, P, pad_id) for p in parts]),
            torch.cat([left(p.prompt_mask, P, 0) for p in parts]),
            torch.cat([right(p.response_ids, R, pad_id) for p in parts]),
            torch.cat([right(p.response_mask, R, 0) for p in parts]),
            None if any(p.logprobs is None for p in parts) else torch.cat([right(p.logprobs, R, 0) for p in parts]),
            [t for p in parts for t in p.texts],
            torch.cat([p.truncated for p in parts]),
        )

    def token_batch(self) -> TokenBatch:
        return TokenBatch(
            input_ids=torch.cat([self.prompt_ids, self.response_ids], 1),
            attention_mask=torch.cat([self.prompt_mask, self.response_mask.long()], 1),
            response_mask=self.response_mask,
        )


class RolloutEngine(ABC):
    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg

    @abstractmethod
    def generate(self, prompts: list[str], n: int, *, temperature: float | None = None) -> Rollouts:
        """Sample n responses for each formatted prompt (temperature defaults to the config's)."""

    @abstractmethod
    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the policy's new weights (HF names) after an M-step."""


def check_prompt_lengths(lengths: list[int], prompts: list[str], limit: int) -> None:
    """A prompt over `rollout.max_prompt_tokens` is an error naming it (the memory plan counts on the limit)."""
    if lengths and max(lengths) > limit:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        raise ConfigError(f"rollout.max_prompt_tokens: a prompt has {lengths[i]} tokens, more than {limit}: "
                          f"{prompts[i][:80]!r}")


def pad_responses(responses: list[list[int]], eos_id: int, pad_id: int, max_len: int):
    """Right-pad token lists; the mask keeps tokens up to and including the first EOS."""
    width = max(1, max((len(r) for r in responses), default=1))
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(responses), width)
    truncated = torch.zeros(len(responses), dtype=torch.bool)
    for i, r in enumerate(responses):
        end = r.index(eos_id) + 1 if eos_id in r else len(r)
        truncated[i] = eos_id not in r and len(r) >= max_len
        ids[i, :end] = torch.tensor(r[:end], dtype=torch.long)
        mask[i, :end] = 1.0
    return ids, mask, truncated
