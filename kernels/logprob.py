"""Per-token log-probability (and entropy) of the labels under an LM head, without [T, V] logits.

    z      = hidden @ weight.T / temperature                       [T, V] (never materialised)
    logp_t = z[t, labels[t]] - logsumexp_j z[t, j]
    ent_t  = logsumexp_j z[t, j] - sum_j softmax(z)[t, j] * z[t, j]

Implementations (one dispatch function, `linear_logprob`, picks one; see `_common`):

- `linear_logprob_reference`: materialised logits -> log_softmax -> gather; float64-capable;
  differentiable through plain autograd. The ground truth of the tests.
- torch path (CPU): a custom autograd.Function. Forward walks the vocabulary in blocks of
  [block_t, block_v] logits held in two preallocated buffers and keeps, per token, the online
  statistics of `ShardStats`. Backward recomputes each block of logits from the saved
  log-sum-exp (one extra matmul), turns it in place into d loss / d logits, and accumulates
  dH with `addmm_` and writes dW block by block (no atomics, no [T, V] tensor).
- triton path (CUDA; CPU under TRITON_INTERPRET=1): forward is one fused Triton kernel
  (tl.dot over d, online max / sum-exp / entropy / target gather over vocabulary blocks; the
  grid is token blocks x vocabulary splits, the splits merged with `combine_shard_stats`).
  Backward is a fused Triton kernel per [T-chunk, V-chunk] block that recomputes the logits
  with tl.dot and writes d loss / d logits (already scaled by 1/temperature) in the input
  dtype; dH and dW then come from two dense matmuls (cuBLAS) per block, so dW is written
  once per vocabulary block without atomics.

Accumulation is float32 (float64 when the inputs are float64). Outputs are float32 (float64
for float64 inputs). Labels < 0 are ignored: their logp is 0 and carries no gradient (their
entropy is still computed). Labels must be < V.

Gradients: to `hidden` and `weight` for logp, and for the entropy when `with_entropy=True`
and the entropy's gradient is requested (d ent / d z_j = -p_j (log p_j + ent)).

Tensor parallelism (vocabulary-sharded LM head): `vocab_shard_stats`, `rescale_shard_stats`,
`combine_shard_stats`, `shard_stats_to_logprob` and `vocab_shard_grad`; the contract is in
`vocab_shard_stats`' docstring.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ._common import HAS_TRITON, backend_for, compute_dtype, interpreting, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

_NEG = -1.0e30  # finite "minus infinity" of the running max (keeps 0 * (m - m_new) finite)

# CPU block sizes of the torch path (tuned on 2 EPYC cores at V=151,936, d=2048, T=2048;
# see benchmarks/results/kernels_cpu.md). A block of logits is block_t x block_v floats.
TORCH_BLOCK_T = 2048
TORCH_BLOCK_V = 8192

# Triton backward: largest block of d loss / d logits materialised at once (elements).
TRITON_BWD_BLOCK_ELEMS = 1 << 26


# --------------------------------------------------------------------------------------
# Statistics of a vocabulary shard and how to merge them
# --------------------------------------------------------------------------------------
class ShardStats(NamedTuple):
    """Per-token partial statistics of the logits z over a set of vocabulary columns.

    max:    [T] m = max_j z_j over the columns
    sumexp: [T] s = sum_j exp(z_j - m)
    wsum:   [T] w = sum_j exp(z_j - m) * (z_j - m)   (entropy; zeros when not requested)
    target: [T] z_{label} when the label is one of the columns, else 0

    Over the full vocabulary: lse = m + log s, logp = target - lse, entropy = log s - w / s.
    """

    max: torch.Tensor
    sumexp: torch.Tensor
    wsum: torch.Tensor
    target: torch.Tensor


def rescale_shard_stats(stats: ShardStats, global_max: torch.Tensor) -> ShardStats:
    """Re-express `stats` relative to `global_max` (>= stats.max), so that the sumexp, wsum
    and target fields of all shards can simply be summed (e.g. by an all-reduce SUM)."""
    shift = stats.max - global_max  # <= 0
    scale = torch.exp(shift)
    sumexp = stats.sumexp * scale
    wsum = scale * (stats.wsum + shift * stats.sumexp)
    return ShardStats(global_max, sumexp, wsum, stats.target)


def combine_shard_stats(stats: Sequence[ShardStats]) -> ShardStats:
    """Merge the statistics of disjoint vocabulary shards (in-process version of the
    all-reduce MAX then all-reduce SUM described in `vocab_shard_stats`)."""
    stats = list(stats)
    if len(stats) == 1:
        return stats[0]
    gmax = stats[0].max
    for st in stats[1:]:
        gmax = torch.maximum(gmax, st.max)
    out = [rescale_shard_stats(st, gmax) for st in stats]
    return ShardStats(
        gmax,
        sum(o.sumexp for o in out),
        sum(o.wsum for o in out),
        sum(o.target for o in out),
    )


def shard_stats_to_logprob(
    stats: ShardStats, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) from the statistics of the FULL vocabulary. Labels < 0 -> logp 0."""
    log_s = torch.log(stats.sumexp)
    lse = stats.max + log_s
    logp = torch.where(labels >= 0, stats.target - lse, torch.zeros_like(lse))
    entropy = log_s - stats.wsum / stats.sumexp
    return logp, entropy, lse


# --------------------------------------------------------------------------------------
# Reference (materialised)
# --------------------------------------------------------------------------------------
def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Materialised reference: logits [T, V] -> log_softmax -> gather (+ entropy)."""
    cd = compute_dtype(hidden, weight)
    logits = (hidden.to(cd) @ weight.to(cd).T) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    valid = labels >= 0
    logp = logsm.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    ent = -(logsm.exp() * logsm).sum(-1) if with_entropy else None
    return logp, ent


# --------------------------------------------------------------------------------------
# torch path: blockwise statistics and blockwise backward
# --------------------------------------------------------------------------------------
class _Buffers:
    """Two flat buffers reused by every block (fresh large allocations page-fault on CPU)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, count: int):
        self.bufs = [torch.empty(n, dtype=dtype, device=device) for _ in range(count)]

    def get(self, i: int, rows: int, cols: int) -> torch.Tensor:
        return self.bufs[i][: rows * cols].view(rows, cols)


def _torch_setup(hidden, weight, temperature, block_t, block_v):
    """(compute dtype, T, V, block_t, block_v, hidden / temperature) of the torch path."""
    cd = compute_dtype(hidden, weight)
    T, V = hidden.shape[0], weight.shape[0]
    bt = min(block_t or TORCH_BLOCK_T, max(T, 1))
    bv = min(block_v or TORCH_BLOCK_V, max(V, 1))
    hs = hidden.to(cd)
    if temperature != 1.0:
        hs = hs * (1.0 / temperature)
    return cd, T, V, bt, bv, hs


def _torch_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    temperature: float,
    with_entropy: bool,
    block_t: Optional[int] = None,
    block_v: Optional[int] = None,
) -> ShardStats:
    """ShardStats of the columns `weight` (global ids vocab_start + j), blockwise."""
    cd, T, V, bt, bv, hs = _torch_setup(hidden, weight, temperature, block_t, block_v)
    dev = hidden.device
    m = torch.full((T,), _NEG, dtype=cd, device=dev)
    s = torch.zeros(T, dtype=cd, device=dev)
    w = torch.zeros(T, dtype=cd, device=dev)
    tgt = torch.zeros(T, dtype=cd, device=dev)
    lab = labels - vocab_start
    bufs = _Buffers(bt * bv, cd, dev, 2 if with_entropy else 1)
    for v0 in range(0, V, bv):
        v1 = min(v0 + bv, V)
        wb = weight[v0:v1].to(cd)
        for t0 in range(0, T, bt):
            t1 = min(t0 + bt, T)
            z = bufs.get(0, t1 - t0, v1 - v0)
            torch.mm(hs[t0:t1], wb.T, out=z)
            lb = lab[t0:t1]
            inb = (lb >= v0) & (lb < v1)
            zt = z.gather(1, (lb - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            tgt[t0:t1] += torch.where(inb, zt, torch.zeros_like(zt))
            mo = m[t0:t1]
            mn = torch.maximum(mo, z.amax(1))
            z.sub_(mn.unsqueeze(1))  # z - m_new
            alpha = torch.exp(mo - mn)
            so = s[t0:t1]
            if with_entropy:
                e = torch.exp(z, out=bufs.get(1, t1 - t0, v1 - v0))
                bw = torch.linalg.vecdot(e, z)
                w[t0:t1] = alpha * (w[t0:t1] + (mo - mn) * so) + bw
                bs = e.sum(1)
            else:
                bs = z.exp_().sum(1)
            s[t0:t1] = so * alpha + bs
            m[t0:t1] = mn
    return ShardStats(m, s, w, tgt)


def _grad_block_torch(z, lb, lse, ent, gl, ge, pbuf=None):
    """In place: z (logits block, scaled) -> d loss / d z for the block.

    lb: labels relative to the block's first column; gl/ge: upstream grads of logp/entropy;
    pbuf: optional preallocated buffer of z's shape (entropy case).
    """
    z.sub_(lse.unsqueeze(1))  # log p
    if ge is not None:
        p = torch.exp(z, out=pbuf) if pbuf is not None else torch.exp(z)
        # d/dz = -p * (gl + ge * (log p + ent)) = p * (-ge * log p - (gl + ge * ent))
        torch.addcmul((-(gl + ge * ent)).unsqueeze(1), z, (-ge).unsqueeze(1), out=z)
        z.mul_(p)
    else:
        z.exp_().mul_(-gl.unsqueeze(1))
    inb = (lb >= 0) & (lb < z.shape[1])
    rows = inb.nonzero().squeeze(1)
    if rows.numel():
        z[rows, lb[rows]] += gl[rows]
    return z


def _torch_backward(
    hidden, weight, labels, vocab_start, lse, ent, gl, ge, temperature,
    need_dh=True, need_dw=True, block_t=None, block_v=None,
):
    """(dH [T, d] in compute dtype or None, dW [V, d] in weight.dtype or None)."""
    cd, T, V, bt, bv, hs = _torch_setup(hidden, weight, temperature, block_t, block_v)
    dev = hidden.device
    lab = labels - vocab_start
    dh = torch.zeros(T, hidden.shape[1], dtype=cd, device=dev) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    bufs = _Buffers(bt * bv, cd, dev, 2 if ge is not None else 1)
    single_t = bt >= T
    for v0 in range(0, V, bv):
        v1 = min(v0 + bv, V)
        wb = weight[v0:v1].to(cd)
        direct = need_dw and single_t and dw.dtype == cd
        acc = None
        for t0 in range(0, T, bt):
            t1 = min(t0 + bt, T)
            z = bufs.get(0, t1 - t0, v1 - v0)
            torch.mm(hs[t0:t1], wb.T, out=z)
            g = _grad_block_torch(
                z, lab[t0:t1] - v0, lse[t0:t1],
                None if ge is None else ent[t0:t1], gl[t0:t1], None if ge is None else ge[t0:t1],
                pbuf=None if ge is None else bufs.get(1, t1 - t0, v1 - v0),
            )
            if need_dh:
                dh[t0:t1].addmm_(g, wb)
            if need_dw:
                if direct:
                    torch.mm(g.T, hs[t0:t1], out=dw[v0:v1])
                elif acc is None:
                    acc = g.T @ hs[t0:t1]
                else:
                    acc.addmm_(g.T, hs[t0:t1])
        if need_dw and not direct:
            dw[v0:v1].copy_(acc)
    if need_dh and temperature != 1.0:
        dh.mul_(1.0 / temperature)
    return dh, dw


# --------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _lp_logits_tile(
        H, W, offs_t, offs_v, tmask, vmask, D, stride_ht, stride_wv,
        DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
        BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    ):
        """[BT, BV] float32 tile of H[offs_t] @ W[offs_v].T (masked rows / columns give 0)."""
        acc = tl.zeros([BT, BV], tl.float32)
        for k in range(0, D, BD):
            offs_d = k + tl.arange(0, BD)
            dmask = offs_d < D
            h = tl.load(H + offs_t[:, None] * stride_ht + offs_d[None, :],
                        mask=tmask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_d[None, :],
                        mask=vmask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        return acc

    @triton.jit
    def _lp_stats_kernel(
        H, W, LAB, M_OUT, S_OUT, WS_OUT, TG_OUT,
        T, V, D, stride_ht, stride_wv,
        inv_temp, label_shift, v_per_split,
        WITH_ENT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
        BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_t = pid_t * BT + tl.arange(0, BT)
        tmask = offs_t < T
        lab = tl.load(LAB + offs_t, mask=tmask, other=-1) - label_shift
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        m = tl.full([BT], -1.0e30, tl.float32)
        s = tl.zeros([BT], tl.float32)
        ws = tl.zeros([BT], tl.float32)
        tg = tl.zeros([BT], tl.float32)
        for v0 in range(v_lo, v_hi, BV):
            offs_v = v0 + tl.arange(0, BV)
            vmask = offs_v < v_hi
            acc = _lp_logits_tile(H, W, offs_t, offs_v, tmask, vmask, D, stride_ht, stride_wv,
                                  DOT_FP32, IEEE, BT, BV, BD)
            z = tl.where(vmask[None, :], acc * inv_temp, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            zs = z - m_new[:, None]
            e = tl.exp(zs)
            if WITH_ENT:
                ez = e * tl.where(vmask[None, :], zs, 0.0)  # no 0 * -inf
                ws = alpha * (ws + (m - m_new) * s) + tl.sum(ez, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            hit = (offs_v[None, :] == lab[:, None]) & vmask[None, :]
            tg += tl.sum(tl.where(hit, z, 0.0), axis=1)
            m = m_new
        out = pid_s * T + offs_t
        tl.store(M_OUT + out, m, mask=tmask)
        tl.store(S_OUT + out, s, mask=tmask)
        tl.store(TG_OUT + out, tg, mask=tmask)
        if WITH_ENT:
            tl.store(WS_OUT + out, ws, mask=tmask)

    @triton.jit
    def _lp_dlogits_kernel(
        H, W, LAB, LSE, ENT, GL, GE, G,
        T, V, D, stride_ht, stride_wv, stride_gt,
        inv_temp, label_shift,
        WITH_ENT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
        BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    ):
        """G[t, j] = d loss / d (h_t . w_j) for one [T, V] block (1/temperature folded in)."""
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_v = pid_v * BV + tl.arange(0, BV)
        tmask = offs_t < T
        vmask = offs_v < V
        acc = _lp_logits_tile(H, W, offs_t, offs_v, tmask, vmask, D, stride_ht, stride_wv,
                              DOT_FP32, IEEE, BT, BV, BD)
        lse = tl.load(LSE + offs_t, mask=tmask, other=0.0)
        gl = tl.load(GL + offs_t, mask=tmask, other=0.0)
        logp = acc * inv_temp - lse[:, None]
        p = tl.exp(logp)
        if WITH_ENT:
            ent = tl.load(ENT + offs_t, mask=tmask, other=0.0)
            ge = tl.load(GE + offs_t, mask=tmask, other=0.0)
            g = -p * (gl[:, None] + ge[:, None] * (logp + ent[:, None]))
        else:
            g = -p * gl[:, None]
        lab = tl.load(LAB + offs_t, mask=tmask, other=-1) - label_shift
        g += tl.where(offs_v[None, :] == lab[:, None], gl[:, None], 0.0)
        g = g * inv_temp
        tl.store(G + offs_t[:, None] * stride_gt + offs_v[None, :], g.to(G.dtype.element_ty),
                 mask=tmask[:, None] & vmask[None, :])


def _triton_blocks(T: int, D: int):
    if interpreting():  # big blocks: the interpreter pays per program and per op, not per element
        return min(64, max(16, next_pow2(T))), 64, min(64, max(16, next_pow2(D))), 4, 1
    return 64, 128, 64, 8, 3  # BT, BV, BD, num_warps, num_stages (untuned; no GPU here)


def _dot_flags(a: torch.Tensor, b: torch.Tensor):
    """(DOT_FP32, IEEE) for a tl.dot of a and b: IEEE fp32 only when both are fp32."""
    fp32 = a.dtype == torch.float32 and b.dtype == torch.float32
    dot_fp32 = interpreting() or fp32  # interpreter: bf16 tl.dot is broken
    return dot_fp32, fp32 and not interpreting()


def _triton_inputs(hidden, weight):
    """(hidden, weight) checked for a tl.dot dtype and made contiguous. tl.dot needs both
    operands in one dtype; the interpreter would accept a mix that fails to compile on a GPU."""
    for t in (hidden, weight):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"triton linear_logprob: unsupported dtype {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"triton linear_logprob: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                        "cast both to one dtype (linear_logprob does under autocast)")
    return hidden.contiguous(), weight.contiguous()


def _triton_stats(
    hidden, weight, labels, vocab_start, temperature, with_entropy, num_splits: Optional[int] = None
) -> ShardStats:
    hidden, weight = _triton_inputs(hidden, weight)
    labels = labels.contiguous()
    T, D = hidden.shape
    V = weight.shape[0]
    BT, BV, BD, warps, stages = _triton_blocks(T, D)
    n_t = triton.cdiv(T, BT)
    if num_splits is None:
        if interpreting():
            num_splits = 1
        else:  # enough programs to fill the GPU (~2 waves of 132 SMs)
            num_splits = max(1, min(triton.cdiv(264, n_t), triton.cdiv(V, 8 * BV)))
    v_per_split = triton.cdiv(triton.cdiv(V, num_splits), BV) * BV
    num_splits = triton.cdiv(V, v_per_split)
    dev = hidden.device
    m = torch.empty(num_splits, T, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    tg = torch.empty_like(m)
    ws = torch.empty_like(m) if with_entropy else torch.zeros_like(m)
    dot_fp32, ieee = _dot_flags(hidden, weight)
    _lp_stats_kernel[(n_t, num_splits)](
        hidden, weight, labels, m, s, ws, tg,
        T, V, D, hidden.stride(0), weight.stride(0),
        1.0 / temperature, vocab_start, v_per_split,
        WITH_ENT=with_entropy, DOT_FP32=dot_fp32, IEEE=ieee,
        BT=BT, BV=BV, BD=BD, num_warps=warps, num_stages=stages,
    )
    return combine_shard_stats([ShardStats(m[i], s[i], ws[i], tg[i]) for i in range(num_splits)])


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (fp32 accumulation) for half inputs."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _triton_backward(
    hidden, weight, labels, vocab_start, lse, ent, gl, ge, temperature,
    need_dh=True, need_dw=True, block_t: Optional[int] = None, block_v: Optional[int] = None,
):
    """(dH float32 or None, dW weight.dtype or None): fused dlogits kernel + two matmuls per block.

    Blocks of d loss / d logits hold at most TRITON_BWD_BLOCK_ELEMS elements: all T tokens
    and as many vocabulary columns as fit (>= 4096), unless block_t / block_v say otherwise.
    """
    hidden, weight = _triton_inputs(hidden, weight)
    T, D = hidden.shape
    V = weight.shape[0]
    BT, BV, BD, warps, stages = _triton_blocks(T, D)
    budget = TRITON_BWD_BLOCK_ELEMS
    min_v = min(V, 4096)
    bt = block_t or (T if T * min_v <= budget else max(BT, budget // min_v // BT * BT))
    bt = max(1, min(bt, T))
    bv = block_v or max(BV, budget // bt // BV * BV)
    bv = max(1, min(bv, V))
    gdtype = hidden.dtype  # d loss / d logits stored in the input dtype (fp32 for fp32)
    G = torch.empty(bt * bv, dtype=gdtype, device=hidden.device)
    dh = torch.zeros(T, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    with_ent = ge is not None
    dot_fp32, ieee = _dot_flags(hidden, weight)
    entc = ent.contiguous() if with_ent else lse
    gec = ge.contiguous() if with_ent else gl
    for v0 in range(0, V, bv):
        v1 = min(v0 + bv, V)
        wb = weight[v0:v1]
        acc = None
        for t0 in range(0, T, bt):
            t1 = min(t0 + bt, T)
            g = G[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0)
            grid = (triton.cdiv(t1 - t0, BT), triton.cdiv(v1 - v0, BV))
            _lp_dlogits_kernel[grid](
                hidden[t0:t1], wb, labels[t0:t1], lse[t0:t1], entc[t0:t1], gl[t0:t1], gec[t0:t1], g,
                t1 - t0, v1 - v0, D, hidden.stride(0), weight.stride(0), g.stride(0),
                1.0 / temperature, vocab_start + v0,
                WITH_ENT=with_ent, DOT_FP32=dot_fp32, IEEE=ieee,
                BT=BT, BV=BV, BD=BD, num_warps=warps, num_stages=stages,
            )
            if need_dh:
                if g.dtype == torch.float32:
                    dh[t0:t1].addmm_(g, wb)
                else:
                    dh[t0:t1] += _mm_f32(g, wb)
            if need_dw:
                if bt >= T:
                    torch.mm(g.T, hidden[t0:t1], out=dw[v0:v1])
                elif acc is None:
                    acc = _mm_f32(g.T, hidden[t0:t1])
                else:
                    acc += _mm_f32(g.T, hidden[t0:t1])
        if need_dw and acc is not None:
            dw[v0:v1].copy_(acc)
    return dh, dw


# --------------------------------------------------------------------------------------
# autograd Function (torch and triton paths)
# --------------------------------------------------------------------------------------
def _stats(impl, hidden, weight, labels, vocab_start, temperature, with_entropy, **kw):
    if impl == "triton":
        return _triton_stats(hidden, weight, labels, vocab_start, temperature, with_entropy, **kw)
    return _torch_stats(hidden, weight, labels, vocab_start, temperature, with_entropy, **kw)


def _backward(impl, *args, **kw):
    if impl == "triton":
        return _triton_backward(*args, **kw)
    return _torch_backward(*args, **kw)


def _impl_for(hidden, weight, backend: str) -> str:
    """backend_for(hidden), with "triton" falling back to "torch" for float64 (no float64 tl.dot)."""
    impl = backend_for(hidden, backend)
    if impl == "triton" and torch.float64 in (hidden.dtype, weight.dtype):
        return "torch"
    return impl


def _upstream_grads(labels, lse, grad_logp, grad_entropy):
    """(gl, ge) in lse's dtype, contiguous: gl is 0 at ignored labels; ge None without entropy grad."""
    gl = torch.where(labels >= 0, grad_logp.to(lse.dtype), torch.zeros_like(lse)).contiguous()
    ge = None if grad_entropy is None else grad_entropy.to(lse.dtype).contiguous()
    return gl, ge


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, with_entropy, impl, opts):
        ctx.set_materialize_grads(False)  # an unused entropy output gets None, not zeros
        with torch.no_grad():
            st = _stats(impl, hidden, weight, labels, 0, temperature, with_entropy, **opts.get("fwd", {}))
            logp, ent, lse = shard_stats_to_logprob(st, labels)
        ctx.save_for_backward(hidden, weight, labels, lse, ent if with_entropy else lse.new_empty(0))
        ctx.temperature, ctx.with_entropy, ctx.impl, ctx.opts = temperature, with_entropy, impl, opts
        if not with_entropy:
            ent = lse.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return (None,) * 7
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        gl, ge = _upstream_grads(labels, lse, g_logp, g_ent if ctx.with_entropy else None)
        with torch.no_grad():
            dh, dw = _backward(
                ctx.impl, hidden, weight, labels, 0, lse, ent, gl, ge, ctx.temperature,
                need_dh=need_dh, need_dw=need_dw, **ctx.opts.get("bwd", {}),
            )
        if dh is not None:
            dh = dh.to(hidden.dtype)
        return dh, dw, None, None, None, None, None


def _linear_logprob_impl(hidden, weight, labels, temperature, with_entropy, impl, **opts):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError("expected hidden [T, d], weight [V, d], labels [T]")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    logp, ent = _LinearLogprob.apply(hidden, weight, labels, float(temperature), bool(with_entropy), impl, opts)
    return logp, (ent if with_entropy else None)


def linear_logprob_torch(hidden, weight, labels, temperature=1.0, with_entropy=False,
                         block_t: Optional[int] = None, block_v: Optional[int] = None):
    """The blockwise PyTorch path (what runs on CPU), with explicit block sizes."""
    kw = {"block_t": block_t, "block_v": block_v}
    return _linear_logprob_impl(hidden, weight, labels, temperature, with_entropy, "torch",
                                fwd=kw, bwd=kw)


def linear_logprob_triton(hidden, weight, labels, temperature=1.0, with_entropy=False,
                          num_splits: Optional[int] = None, bwd_block_t: Optional[int] = None,
                          bwd_block_v: Optional[int] = None):
    """The Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1); the optional
    arguments override the vocabulary splits of the forward and the backward's block sizes."""
    return _linear_logprob_impl(hidden, weight, labels, temperature, with_entropy, "triton",
                                fwd={"num_splits": num_splits},
                                bwd={"block_t": bwd_block_t, "block_v": bwd_block_v})


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log pi(labels[t]) under softmax(hidden @ weight.T / temperature), and its entropy.

    hidden [T, d], weight [V, d] (bf16 / fp16 / fp32; fp64 runs the torch path), labels [T]
    int64 (< 0: ignored, logp 0). Returns (logp [T] float32, entropy [T] float32 or None);
    float64 for float64 inputs. Never materialises [T, V] logits. Differentiable w.r.t.
    hidden and weight, through logp and (when with_entropy) the entropy.

    Under autocast both operands are cast to the autocast dtype first, as autocast does for a
    matmul (a custom autograd Function is not cast by it): bf16 runs keep fp32 master weights
    and fp32 norm outputs, which would otherwise put the LM head on fp32 dots.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
    # the ops inside accumulate in fp32 on purpose: autocast must not recast them
    with torch.autocast(device_type, enabled=False):
        impl = _impl_for(hidden, weight, backend)
        if impl == "reference":
            logp, ent = linear_logprob_reference(hidden, weight, labels, temperature, with_entropy)
            out = compute_dtype(hidden, weight)
            return logp.to(out), (None if ent is None else ent.to(out))
        if impl == "triton":
            return linear_logprob_triton(hidden, weight, labels, temperature, with_entropy)
        return linear_logprob_torch(hidden, weight, labels, temperature, with_entropy)


# --------------------------------------------------------------------------------------
# Tensor-parallel building blocks
# --------------------------------------------------------------------------------------
def vocab_shard_stats(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    backend: str = "auto",
) -> ShardStats:
    """Partial statistics of the logits over one vocabulary shard W[vocab_start : vocab_start+Vs].

    hidden [T, d] (the same on every rank), weight_shard [Vs, d], labels [T] GLOBAL token ids.
    Returns `ShardStats` (float32; float64 for float64 inputs), computed without [T, Vs]
    logits and without autograd (use `vocab_shard_grad` in the backward).

    Contract, for shards that partition the vocabulary (one per TP rank):

        st = vocab_shard_stats(h, W_r, labels, v0_r, temperature)
        M = st.max.clone();  all_reduce(M, op=MAX)                 # global running max
        st = rescale_shard_stats(st, M)                              # relative to M
        buf = torch.stack([st.sumexp, st.wsum, st.target]);  all_reduce(buf, op=SUM)
        logp, entropy, lse = shard_stats_to_logprob(ShardStats(M, *buf.unbind(0)), labels)

    `combine_shard_stats([st_0, st_1, ...])` does the same in one process. The target field
    is 0 on every shard that does not own the label, so the SUM yields the label's logit.
    Backward: each rank calls `vocab_shard_grad(..., lse, entropy, grad_logp, grad_entropy)`
    and all-reduces (SUM) the returned grad_hidden; its grad_weight_shard is already complete.
    """
    labels = labels.to(torch.int64)
    impl = _impl_for(hidden, weight_shard, backend)  # "reference" runs the torch path here
    with torch.no_grad():
        return _stats(impl, hidden, weight_shard, labels, vocab_start, temperature, with_entropy)


def vocab_shard_grad(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of one vocabulary shard, given the GLOBAL lse and entropy (from the combined
    stats) and the upstream grads of logp / entropy. Returns (grad_hidden partial [T, d]
    float32 — sum it over shards —, grad_weight_shard [Vs, d] in weight_shard.dtype)."""
    labels = labels.to(torch.int64)
    gl, ge = _upstream_grads(labels, lse, grad_logp, grad_entropy)
    impl = _impl_for(hidden, weight_shard, backend)  # "reference" runs the torch path here
    with torch.no_grad():
        return _backward(impl, hidden, weight_shard, labels, vocab_start, lse, entropy, gl, ge, temperature)


__all__ = [
    "ShardStats",
    "combine_shard_stats",
    "linear_logprob",
    "linear_logprob_reference",
    "linear_logprob_torch",
    "linear_logprob_triton",
    "rescale_shard_stats",
    "shard_stats_to_logprob",
    "vocab_shard_grad",
    "vocab_shard_stats",
]

