"""The losses and advantages of the EM loop (TEMPO, arXiv 2604.19295), on [B, R] response tensors.

Advantages and the policy loss run through the kernel dispatch (`tempo_kernels`: Triton on
CUDA tensors, a PyTorch path on CPU; `kernels` forces one: `model.kernels`); the value loss
is small elementwise work and stays here.
"""
from __future__ import annotations

import torch

import tempo_kernels


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def em_token_advantage(terminal_reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       kernels: str = "auto") -> torch.Tensor:
    """A_t = R_T − V(x, y_<t), whitened over every valid token of the batch."""
    return tempo_kernels.em_token_advantage(terminal_reward, values, mask, backend=kernels)


def grpo_advantage(scores: torch.Tensor, n: int, mask: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """Scores normalised within each prompt's group of n, broadcast to every token."""
    groups = torch.arange(len(scores)) // n
    adv = tempo_kernels.group_advantage(scores, groups, backend=kernels)
    return adv[:, None] * mask


def policy_loss(logp, old_logp, advantages, mask, *, kind: str, clip_low: float, clip_high: float,
                agg: str, kernels: str = "auto"):
    """GSPO (sequence-level ratio) or PPO-clip; returns (loss, {"clipfrac", "approx_kl"})."""
    return tempo_kernels.policy_loss(logp, old_logp, advantages, mask, kind=kind, clip_low=clip_low,
                                     clip_high=clip_high, agg=agg, backend=kernels)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange: float, agg: str) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 · max((v − R)², (v_clip − R)²), aggregated like the policy loss (`agg`).

    The clip shifts a whole sequence so that its mean prediction moves at most ±cliprange
    from the old values: the critic's per-sequence level changes slowly, its shape freely.
    """
    lengths = mask.sum(-1).clamp(min=1)
    shift = ((values - old_values) * mask).sum(-1) / lengths  # [B]
    v_clip = values - (shift - shift.clamp(-cliprange, cliprange))[:, None]
    target = returns[:, None]
    loss_raw, loss_clip = (values - target) ** 2, (v_clip - target) ** 2
    valid = mask != 0
    loss = 0.5 * tempo_kernels.aggregate_loss(torch.where(valid, torch.maximum(loss_raw, loss_clip), 0.0), valid, agg)
    clipfrac = masked_mean((loss_clip > loss_raw).float(), mask)
    return loss, {"vf_clipfrac": float(clipfrac)}


def loss_shares(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Each row's share of its mini-batch loss under aggregation `agg`: its tokens' share for a
    token mean, 1/rows for the sequence means. Micro-batch losses weighted by their rows'
    shares sum to the mini-batch loss."""
    if agg == "token-mean":
        return mask.sum(-1) / mask.sum().clamp(min=1)
    return torch.full((len(mask),), 1.0 / len(mask))


def engine_agreement(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max |log π_train − log π_engine| over the sampled tokens: how far the rollout
    engine's numerics (kernels, precision, a stale weight sync) are from the trainer's."""
    diff = (train_logp - engine_logp).abs() * mask
    return {"rollout/logp_diff_mean": float(diff.sum() / mask.sum().clamp(min=1)),
            "rollout/logp_diff_max": float(diff.max()) if diff.numel() else 0.0}


def tis_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: min(π_train / π_engine, cap) per sampled token. The tokens
    were drawn from the engine's distribution; the weight corrects the policy gradient toward the
    trainer's, the cap bounds its variance."""
    return torch.exp(train_logp - engine_logp).clamp(max=cap)
