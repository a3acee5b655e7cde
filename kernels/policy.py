"""Clipped policy-gradient loss, PPO (token ratio) or GSPO (sequence ratio), with the
forward and the gradient w.r.t. logp computed in one fused pass.

Per token t of sequence i (m = mask, A = advantage):
  PPO:  r_t = exp(logp_t - old_t)                         d r_t / d logp_t = r_t
  GSPO: s_i = exp(min(mean_{valid t}(logp - old), 10))     d r_t / d logp_t = s_i (0 if clamped)
        i.e. log r_t = logp_t - sg(logp_t) + sg(mean_t(logp - old)), clamped at 10.
  l1 = -A r,  l2 = -A clamp(r, 1 - clip_low, 1 + clip_high),  l = max(l1, l2)
  dual clip (clip_c set; both kinds): for A < 0, l = min(l, -A clip_c)
Aggregation over valid tokens:
  token-mean            sum(l m) / sum(m)
  seq-mean-token-sum    mean over rows with a valid token of sum_t l m
  seq-mean-token-mean   mean over rows with a valid token of sum_t l m / sum_t m
A batch without valid tokens gives loss 0 and a zero gradient.
Stats (0-d float32 tensors, detached): clipfrac = fraction of valid tokens with l2 > l1;
approx_kl = mean over valid tokens of (old - logp).

Gradient convention at exact ties (measure zero): the fused paths give the unclipped branch
its full gradient where l1 == l2 (identical to autograd's split whenever r is inside the clip
range, the only case where a tie has a non-zero gradient), and none at l == -A clip_c.

Implementations: `policy_loss_reference` (autograd over the formulas, float64-capable),
a closed-form torch path (CPU) and a Triton kernel (CUDA): one program per sequence, which
reads its row (twice for GSPO: the sequence mean first) and writes d l_t / d logp_t and the
row's partial sums; the batch-level normalisation is applied in backward together with the
upstream gradient (one elementwise op).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._common import HAS_TRITON, backend_for, compute_dtype, interpreting, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

KINDS = ("gspo", "ppo")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
_GSPO_LOG_RATIO_MAX = 10.0


def _check(kind, agg, logp, old_logp, advantages, mask):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r}; expected one of {AGGS}")
    if logp.dim() != 2 or not (logp.shape == old_logp.shape == advantages.shape == mask.shape):
        raise ValueError("logp, old_logp, advantages and mask must all be [B, R]")


def aggregate_loss(lm, valid, agg):
    """Reduce a per-token loss [B, R] (already zero on invalid tokens) by `agg`: token-mean,
    seq-mean-token-sum or seq-mean-token-mean. The value loss aggregates the same way."""
    cd = lm.dtype
    n_i = valid.sum(1).to(cd)
    if agg == "token-mean":
        return lm.sum() / n_i.sum().clamp(min=1)
    rows = (n_i > 0).sum().to(cd).clamp(min=1)
    row = lm.sum(1)
    if agg == "seq-mean-token-mean":
        row = row / n_i.clamp(min=1)
    return row.sum() / rows


def _masked_inputs(logp, old_logp, advantages, mask):
    """(compute dtype, valid, 0-d zero, lp, old, adv): the inputs in compute dtype, 0 where invalid."""
    cd = compute_dtype(logp, old_logp, advantages)
    valid = mask != 0
    zero = torch.zeros((), dtype=cd, device=logp.device)
    lp = torch.where(valid, logp.to(cd), zero)
    old = torch.where(valid, old_logp.to(cd), zero)
    adv = torch.where(valid, advantages.to(cd), zero)
    return cd, valid, zero, lp, old, adv


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
def policy_loss_reference(
    logp, old_logp, advantages, mask, kind="gspo", clip_low=0.2, clip_high=0.2,
    clip_c: Optional[float] = None, agg="token-mean",
):
    """Autograd over the formulas (the tests' ground truth)."""
    _check(kind, agg, logp, old_logp, advantages, mask)
    cd, valid, zero, lp, old, adv = _masked_inputs(logp, old_logp, advantages, mask)
    if kind == "ppo":
        log_r = lp - old
    else:
        n_i = valid.sum(1).to(cd).clamp(min=1)
        seq = ((lp - old).sum(1) / n_i).detach()
        log_r = torch.clamp(lp - lp.detach() + seq.unsqueeze(1), max=_GSPO_LOG_RATIO_MAX)
    r = torch.exp(log_r)
    l1 = -adv * r
    l2 = -adv * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(l1, l2)
    if clip_c is not None:
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, -adv * clip_c), loss_tok)
    loss = aggregate_loss(torch.where(valid, loss_tok, zero), valid, agg)
    n = valid.sum().clamp(min=1).to(cd)
    stats = {
        "clipfrac": ((l2 > l1) & valid).sum().to(cd).div(n).detach(),
        "approx_kl": torch.where(valid, old - lp, zero).sum().div(n).detach(),
    }
    return loss, stats


# --------------------------------------------------------------------------------------
# closed-form torch path
# --------------------------------------------------------------------------------------
def _torch_fused(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg):
    """-> (row_loss [B], row_n [B], row_clip [B], row_kl [B], coef [B, R]) in compute dtype.
    coef = d(row-normalised loss)/d logp before the batch-level normaliser."""
    cd, valid, zero, lp, old, adv = _masked_inputs(logp, old_logp, advantages, mask)
    n_i = valid.sum(1).to(cd)
    d = lp - old
    if kind == "ppo":
        r = torch.exp(d)
        dr = r
    else:
        seq = d.sum(1) / n_i.clamp(min=1)
        s = torch.exp(seq.clamp(max=_GSPO_LOG_RATIO_MAX))
        r = s.unsqueeze(1).expand_as(d)
        dr = torch.where(seq <= _GSPO_LOG_RATIO_MAX, s, torch.zeros_like(s)).unsqueeze(1)
    l1 = -adv * r
    l2 = -adv * r.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(l1, l2)
    coef = torch.where(l1 >= l2, -adv * dr, zero)
    if clip_c is not None:
        dual = (adv < 0) & (loss_tok > -adv * clip_c)
        loss_tok = torch.where(dual, -adv * clip_c, loss_tok)
        coef = torch.where(dual, zero, coef)
    loss_tok = torch.where(valid, loss_tok, zero)
    coef = torch.where(valid, coef, zero)
    if agg == "seq-mean-token-mean":
        coef = coef / n_i.clamp(min=1).unsqueeze(1)
    row_clip = ((l2 > l1) & valid).sum(1).to(cd)
    row_kl = (old - lp).sum(1)
    return loss_tok.sum(1), n_i, row_clip, row_kl, coef


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _policy_loss_kernel(
        LP, OLD, ADV, MASK, COEF, ROW_LOSS, ROW_N, ROW_CLIP, ROW_KL,
        R, lo, hi, clip_c,
        GSPO: tl.constexpr, DUAL: tl.constexpr, ROW_MEAN: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        row = tl.program_id(0)
        base = row.to(tl.int64) * R
        # pass 1: the row's valid count (and, for GSPO, the sum of logp - old)
        n_vec = tl.zeros([BLOCK_R], tl.float32)
        d_vec = tl.zeros([BLOCK_R], tl.float32)
        if GSPO or ROW_MEAN:
            for r0 in range(0, R, BLOCK_R):
                offs = r0 + tl.arange(0, BLOCK_R)
                inb = offs < R
                valid = inb & (tl.load(MASK + base + offs, mask=inb, other=0) != 0)
                n_vec += valid.to(tl.float32)
                if GSPO:
                    lp = tl.load(LP + base + offs, mask=valid, other=0.0).to(tl.float32)
                    old = tl.load(OLD + base + offs, mask=valid, other=0.0).to(tl.float32)
                    d_vec += lp - old
        n = tl.sum(n_vec, axis=0)
        seq = tl.sum(d_vec, axis=0) / tl.maximum(n, 1.0)
        s = tl.exp(tl.minimum(seq, 10.0))
        ds = tl.where(seq <= 10.0, s, 0.0)
        inv_n = 1.0 / tl.maximum(n, 1.0)
        # pass 2: per-token loss, gradient coefficient, row sums
        loss_vec = tl.zeros([BLOCK_R], tl.float32)
        clip_vec = tl.zeros([BLOCK_R], tl.float32)
        kl_vec = tl.zeros([BLOCK_R], tl.float32)
        cnt_vec = tl.zeros([BLOCK_R], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs = r0 + tl.arange(0, BLOCK_R)
            inb = offs < R
            valid = inb & (tl.load(MASK + base + offs, mask=inb, other=0) != 0)
            lp = tl.load(LP + base + offs, mask=valid, other=0.0).to(tl.float32)
            old = tl.load(OLD + base + offs, mask=valid, other=0.0).to(tl.float32)
            a = tl.load(ADV + base + offs, mask=valid, other=0.0).to(tl.float32)
            if GSPO:
                r = tl.zeros([BLOCK_R], tl.float32) + s
                dr = tl.zeros([BLOCK_R], tl.float32) + ds
            else:
                r = tl.exp(lp - old)
                dr = r
            l1 = -a * r
            l2 = -a * tl.minimum(tl.maximum(r, lo), hi)
            loss = tl.maximum(l1, l2)
            coef = tl.where(l1 >= l2, -a * dr, 0.0)
            if DUAL:
                l3 = -a * clip_c
                dual = (a < 0) & (loss > l3)
                loss = tl.where(dual, l3, loss)
                coef = tl.where(dual, 0.0, coef)
            if ROW_MEAN:
                coef = coef * inv_n
            loss_vec += tl.where(valid, loss, 0.0)
            clip_vec += tl.where(valid & (l2 > l1), 1.0, 0.0)
            kl_vec += tl.where(valid, old - lp, 0.0)
            cnt_vec += valid.to(tl.float32)
            tl.store(COEF + base + offs, tl.where(valid, coef, 0.0), mask=inb)
        tl.store(ROW_LOSS + row, tl.sum(loss_vec, axis=0))
        tl.store(ROW_N + row, tl.sum(cnt_vec, axis=0))
        tl.store(ROW_CLIP + row, tl.sum(clip_vec, axis=0))
        tl.store(ROW_KL + row, tl.sum(kl_vec, axis=0))


def _triton_fused(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg):
    B, R = logp.shape
    dev = logp.device
    lp, old, adv = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
    mk = mask.contiguous()
    if mk.dtype == torch.bool:
        mk = mk.view(torch.uint8)
    coef = torch.empty(B, R, dtype=torch.float32, device=dev)
    row = torch.empty(4, B, dtype=torch.float32, device=dev)
    if B:
        if interpreting():
            BLOCK_R = min(64, max(16, next_pow2(R)))
        else:
            BLOCK_R = min(1024, max(128, next_pow2(R)))
        _policy_loss_kernel[(B,)](
            lp, old, adv, mk, coef, row[0], row[1], row[2], row[3],
            R, 1.0 - clip_low, 1.0 + clip_high, 0.0 if clip_c is None else float(clip_c),
            GSPO=kind == "gspo", DUAL=clip_c is not None, ROW_MEAN=agg == "seq-mean-token-mean",
            BLOCK_R=BLOCK_R, num_warps=4,
        )
    return row[0], row[1], row[2], row[3], coef


# --------------------------------------------------------------------------------------
# autograd Function shared by the torch and Triton paths
# --------------------------------------------------------------------------------------
class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg, impl):
        fused = _triton_fused if impl == "triton" else _torch_fused
        with torch.no_grad():
            row_loss, row_n, row_clip, row_kl, coef = fused(
                logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg
            )
            n_tok = row_n.sum()
            n_tok1 = n_tok.clamp(min=1)
            if agg == "token-mean":
                denom = n_tok1
                loss = row_loss.sum() / denom
            else:
                denom = (row_n > 0).sum().to(row_n.dtype).clamp(min=1)
                rl = row_loss / row_n.clamp(min=1) if agg == "seq-mean-token-mean" else row_loss
                loss = rl.sum() / denom
            clipfrac = row_clip.sum() / n_tok1
            approx_kl = row_kl.sum() / n_tok1
        ctx.save_for_backward(coef, denom)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(clipfrac, approx_kl)
        return loss, clipfrac, approx_kl

    @staticmethod
    def backward(ctx, g, _g_clip, _g_kl):
        coef, denom = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and g is not None:
            grad = (coef * (g / denom)).to(ctx.logp_dtype)
        return grad, None, None, None, None, None, None, None, None, None


def _policy_loss_impl(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg, impl):
    _check(kind, agg, logp, old_logp, advantages, mask)
    loss, clipfrac, approx_kl = _PolicyLoss.apply(
        logp, old_logp.detach(), advantages.detach(), mask, kind, float(clip_low), float(clip_high),
        None if clip_c is None else float(clip_c), agg, impl,
    )
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def policy_loss_torch(logp, old_logp, advantages, mask, kind="gspo", clip_low=0.2, clip_high=0.2,
                      clip_c=None, agg="token-mean"):
    """Closed-form PyTorch path (CPU)."""
    return _policy_loss_impl(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg, "torch")


def policy_loss_triton(logp, old_logp, advantages, mask, kind="gspo", clip_low=0.2, clip_high=0.2,
                       clip_c=None, agg="token-mean"):
    """Fused Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    return _policy_loss_impl(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg, "triton")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "gspo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: Optional[float] = None,
    agg: str = "token-mean",
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped PPO / GSPO policy loss over [B, R] tokens (see the module docstring).

    Returns (loss: 0-d tensor, differentiable w.r.t. logp only; stats: {"clipfrac",
    "approx_kl"} as detached 0-d tensors). float32 (float64 for float64 inputs).
    """
    impl = backend_for(logp, backend)
    if impl == "reference":
        return policy_loss_reference(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg)
    if impl == "triton" and torch.float64 not in (logp.dtype, old_logp.dtype, advantages.dtype):
        return policy_loss_triton(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg)
    return policy_loss_torch(logp, old_logp, advantages, mask, kind, clip_low, clip_high, clip_c, agg)


__all__ = [
    "AGGS",
    "KINDS",
    "policy_loss",
    "policy_loss_reference",
    "policy_loss_torch",
    "policy_loss_triton",
]
