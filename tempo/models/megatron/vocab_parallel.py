"""Log-probs and entropy over a vocabulary split across the tensor-parallel group, without
[N, V] logits: each rank's shard statistics from `tempo_kernels`, combined by one MAX and
one SUM all-reduce."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import tempo_kernels

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps


class _VocabParallelLogprob(torch.autograd.Function):
    """log p(label) and entropy over a vocabulary split across the TP group.

    Each rank holds rows [v0, v0 + Vs) of the LM head; `tempo_kernels` computes the shard's
    statistics (max, sum-exp, entropy sum, target logit) without [N, Vs] logits; one MAX and
    one SUM all-reduce combine them. Backward: the shard's dW is complete, dH is summed."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, temperature, group, backend):
        tk = tempo_kernels
        st = tk.vocab_shard_stats(hidden, weight, labels, vocab_start, temperature, with_entropy=True, backend=backend)
        gmax = st.max.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        st = tk.rescale_shard_stats(st, gmax)
        sums = torch.stack([st.sumexp, st.wsum, st.target])
        dist.all_reduce(sums, group=group)
        logp, entropy, lse = tk.shard_stats_to_logprob(tk.ShardStats(gmax, *sums.unbind(0)), labels)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.vocab_start, ctx.temperature, ctx.group, ctx.backend = vocab_start, temperature, group, backend
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        grad_h, grad_w = tempo_kernels.vocab_shard_grad(hidden, weight, labels, ctx.vocab_start, lse, entropy,
                                                        grad_logp, grad_entropy, ctx.temperature, ctx.backend)
        dist.all_reduce(grad_h, group=ctx.group)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None


def vocab_parallel_logprob(hidden, weight_shard, labels, vocab_start: int, vocab_size: int, temperature: float,
                           backend: str = "auto"):
    """(logp, entropy) [N] from hidden [N, d] and this TP rank's LM-head rows; the padding rows
    of the last shard (vocabulary padded to a multiple of TP) are left out."""
    rows = max(0, min(weight_shard.shape[0], vocab_size - vocab_start))
    weight = weight_shard[:rows]
    return _VocabParallelLogprob.apply(hidden, weight, labels, vocab_start, temperature,
                                       ps.get_tensor_model_parallel_group(), backend)
