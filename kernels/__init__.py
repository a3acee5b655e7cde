"""Kernels of the TEMPO trainer, each beside its pure-PyTorch reference.

Installed as `tempo_kernels`; independent of the `tempo` package (never imports it).

The trainer calls the dispatch functions below. Each runs Triton on CUDA tensors and a
PyTorch path on CPU tensors; its ``backend="triton"|"torch"|"reference"`` argument forces
one (see `tempo_kernels._common`). The references, the explicit paths and the tensor-parallel
building blocks live in the submodules (`logprob`, `advantage`, `policy`).
"""
from .advantage import em_token_advantage, group_advantage
from .logprob import (
    ShardStats,
    combine_shard_stats,
    linear_logprob,
    rescale_shard_stats,
    shard_stats_to_logprob,
    vocab_shard_grad,
    vocab_shard_stats,
)
from .policy import aggregate_loss, policy_loss

__all__ = [
    "linear_logprob",
    "group_advantage",
    "em_token_advantage",
    "policy_loss",
    "aggregate_loss",
    # tensor-parallel building blocks of linear_logprob
    "ShardStats",
    "vocab_shard_stats",
    "rescale_shard_stats",
    "combine_shard_stats",
    "shard_stats_to_logprob",
    "vocab_shard_grad",
]
