"""Advantage estimators: group-normalised (GRPO / Dr. GRPO) and TEMPO's whitened token advantage.

group_advantage(scores [N], group_ids [N]):
    A_i = (x_i - mean_g) / (std_g + eps), std_g the unbiased (Bessel) std of the group;
    a one-sample group gets 0; norm_std=False gives x_i - mean_g (Dr. GRPO).
em_token_advantage(terminal_reward [B], values [B, R], mask [B, R]):
    A_t = R_terminal - V_t on valid tokens, whitened over ALL valid tokens of the batch:
    (A - mean) * rsqrt(var + eps), var unbiased; masked positions 0. Fewer than two valid
    tokens give all zeros.

Implementations: `*_reference` (float64-capable loops / masked ops, the tests' ground truth),
a vectorised torch path (CPU) and Triton (CUDA):
- group_advantage: one program per group reads its members (gathered through a stable sort
  of the group ids) once, computes mean and std in registers, writes the advantages.
- em_token_advantage: one pass of per-block moments (count, sum, M2) over the flattened
  batch, merged in a few [n_blocks] torch ops (Chan's parallel variance), then one pass
  that writes the whitened advantages. No [B, R] intermediate.
Outputs are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, backend_for, compute_dtype, interpreting, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

_MAX_TRITON_GROUP = 1 << 14  # larger groups run the torch path


# --------------------------------------------------------------------------------------
# group_advantage
# --------------------------------------------------------------------------------------
def group_advantage_reference(scores, group_ids, eps: float = 1e-6, norm_std: bool = True):
    """Loop over groups (float64-capable)."""
    cd = compute_dtype(scores)
    x = scores.to(cd)
    out = torch.zeros_like(x)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero().squeeze(1)
        xs = x[idx]
        if xs.numel() < 2:
            continue  # one-sample group: advantage 0
        d = xs - xs.mean()
        out[idx] = d / (xs.std(unbiased=True) + eps) if norm_std else d
    return out


def _dense_groups(group_ids):
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(inv, minlength=uniq.numel())
    return inv, counts, uniq.numel()


def _group_advantage_torch(scores, group_ids, eps, norm_std):
    cd = compute_dtype(scores)
    x = scores.to(cd)
    inv, counts, G = _dense_groups(group_ids)
    n = counts.to(cd)
    mean = torch.zeros(G, dtype=cd, device=x.device).index_add_(0, inv, x) / n
    d = x - mean[inv]
    if norm_std:
        m2 = torch.zeros(G, dtype=cd, device=x.device).index_add_(0, inv, d * d)
        std = torch.sqrt(m2 / (n - 1).clamp(min=1))
        d = d / (std[inv] + eps)
    return torch.where(counts[inv] > 1, d, torch.zeros_like(d))


if HAS_TRITON:

    @triton.jit
    def _group_adv_kernel(X, ORDER, STARTS, COUNTS, OUT, eps,
                          NORM_STD: tl.constexpr, BLOCK: tl.constexpr):
        g = tl.program_id(0)
        start = tl.load(STARTS + g)
        n = tl.load(COUNTS + g)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        idx = tl.load(ORDER + start + offs, mask=mask, other=0)
        x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
        nf = n.to(tl.float32)
        mean = tl.sum(x, axis=0) / nf
        d = tl.where(mask, x - mean, 0.0)
        if NORM_STD:
            var = tl.sum(d * d, axis=0) / tl.maximum(nf - 1.0, 1.0)
            d = d / tl.where(n > 1, tl.sqrt(var) + eps, 1.0)
        d = tl.where(n > 1, d, 0.0)
        tl.store(OUT + idx, d, mask=mask)


def _group_advantage_triton(scores, group_ids, eps, norm_std):
    inv, counts, G = _dense_groups(group_ids)
    max_n = int(counts.max().item()) if G else 0
    if max_n > _MAX_TRITON_GROUP:
        return _group_advantage_torch(scores, group_ids, eps, norm_std)
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
    if G:
        BLOCK = max(16, next_pow2(max_n))
        _group_adv_kernel[(G,)](scores.contiguous(), order, starts, counts, out, float(eps),
                                NORM_STD=bool(norm_std), BLOCK=BLOCK,
                                num_warps=1 if BLOCK <= 256 else 4)
    return out


def group_advantage(
    scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, norm_std: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) per group (unbiased std; one-sample group -> 0);
    norm_std=False: x - mean_g. scores [N] float, group_ids [N] int64 (any values)."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError("expected scores [N] and group_ids [N]")
    impl = backend_for(scores, backend)
    if impl == "reference":
        return group_advantage_reference(scores, group_ids, eps, norm_std)
    if impl == "triton" and scores.dtype != torch.float64 and scores.numel():
        return _group_advantage_triton(scores, group_ids, eps, norm_std)
    return _group_advantage_torch(scores, group_ids, eps, norm_std)


# --------------------------------------------------------------------------------------
# em_token_advantage
# --------------------------------------------------------------------------------------
def em_token_advantage_reference(terminal_reward, values, mask, eps: float = 1e-8):
    """Masked whitening in plain ops (float64-capable)."""
    cd = compute_dtype(terminal_reward, values)
    valid = mask != 0
    a = terminal_reward.to(cd).unsqueeze(1) - values.to(cd)
    av = a[valid]
    if av.numel() < 2:
        return torch.zeros_like(a)
    mean = av.mean()
    var = av.var(unbiased=True)
    return torch.where(valid, (a - mean) * torch.rsqrt(var + eps), torch.zeros_like(a))


def _em_token_advantage_torch(terminal_reward, values, mask, eps):
    cd = compute_dtype(terminal_reward, values)
    valid = mask != 0
    a = terminal_reward.to(cd).unsqueeze(1) - values.to(cd)
    zero = torch.zeros_like(a)
    n = valid.sum().to(cd)
    mean = torch.where(valid, a, zero).sum() / n.clamp(min=1)
    d = torch.where(valid, a - mean, zero)
    var = (d * d).sum() / (n - 1).clamp(min=1)
    return d * torch.rsqrt(var + eps)  # n <= 1: d == 0 -> zeros


if HAS_TRITON:

    @triton.jit
    def _em_load_block(RW, VAL, MASK, pid, N, R, BLOCK: tl.constexpr):
        """(offs, inb, valid, R_terminal - V) of block `pid` of the flattened [B, R] batch."""
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        row = offs // R
        rw = tl.load(RW + row, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(VAL + offs, mask=inb, other=0.0).to(tl.float32)
        mk = tl.load(MASK + offs, mask=inb, other=0)
        valid = inb & (mk != 0)
        return offs, inb, valid, rw - v

    @triton.jit
    def _em_moments_kernel(RW, VAL, MASK, CNT, SUM, M2, N, R, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        _, _, valid, diff = _em_load_block(RW, VAL, MASK, pid, N, R, BLOCK)
        a = tl.where(valid, diff, 0.0)
        cnt = tl.sum(valid.to(tl.float32), axis=0)
        s = tl.sum(a, axis=0)
        mean = s / tl.maximum(cnt, 1.0)
        d = tl.where(valid, a - mean, 0.0)
        tl.store(CNT + pid, cnt)
        tl.store(SUM + pid, s)
        tl.store(M2 + pid, tl.sum(d * d, axis=0))

    @triton.jit
    def _em_apply_kernel(RW, VAL, MASK, OUT, MEAN, RSTD, N, R, BLOCK: tl.constexpr):
        offs, inb, valid, diff = _em_load_block(RW, VAL, MASK, tl.program_id(0), N, R, BLOCK)
        mean = tl.load(MEAN)
        rstd = tl.load(RSTD)
        out = tl.where(valid, (diff - mean) * rstd, 0.0)
        tl.store(OUT + offs, out, mask=inb)


def _em_token_advantage_triton(terminal_reward, values, mask, eps):
    B, R = values.shape
    N = B * R
    rw = terminal_reward.contiguous()
    val = values.contiguous()
    mk = mask.contiguous()
    if mk.dtype == torch.bool:
        mk = mk.view(torch.uint8)
    out = torch.empty(B, R, dtype=torch.float32, device=values.device)
    if N == 0:
        return out
    BLOCK = min(1024, max(16, next_pow2(N))) if interpreting() else 2048
    nb = triton.cdiv(N, BLOCK)
    cnt = torch.empty(nb, dtype=torch.float32, device=values.device)
    sm = torch.empty_like(cnt)
    m2 = torch.empty_like(cnt)
    _em_moments_kernel[(nb,)](rw, val, mk, cnt, sm, m2, N, R, BLOCK=BLOCK, num_warps=4)
    # Chan et al.: merge (count, mean, M2) of the blocks (float64: a handful of numbers)
    c64, s64 = cnt.double(), sm.double()
    n = c64.sum()
    mean = s64.sum() / n.clamp(min=1)
    bmean = s64 / c64.clamp(min=1)
    var = (m2.double().sum() + (c64 * (bmean - mean) ** 2).sum()) / (n - 1).clamp(min=1)
    mean32 = mean.float().reshape(1)
    rstd32 = torch.rsqrt(var + eps).float().reshape(1)
    _em_apply_kernel[(nb,)](rw, val, mk, out, mean32, rstd32, N, R, BLOCK=BLOCK, num_warps=4)
    return out


def em_token_advantage(
    terminal_reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, backend: str = "auto"
) -> torch.Tensor:
    """A_t = R_terminal - V_t, whitened over all valid tokens of the batch (unbiased var),
    masked positions 0. terminal_reward [B], values [B, R], mask [B, R] (bool or 0/1)."""
    if values.dim() != 2 or terminal_reward.shape != values.shape[:1] or mask.shape != values.shape:
        raise ValueError("expected terminal_reward [B], values [B, R], mask [B, R]")
    impl = backend_for(values, backend)
    if impl == "reference":
        return em_token_advantage_reference(terminal_reward, values, mask, eps)
    if impl == "triton" and torch.float64 not in (terminal_reward.dtype, values.dtype):
        return _em_token_advantage_triton(terminal_reward, values, mask, eps)
    return _em_token_advantage_torch(terminal_reward, values, mask, eps)


__all__ = [
    "em_token_advantage",
    "em_token_advantage_reference",
    "group_advantage",
    "group_advantage_reference",
]
