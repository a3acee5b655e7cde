"""tempo_kernels: every Triton kernel and every torch path against the float64 references.

Run with TRITON_INTERPRET=1 on CPU (the Triton tests are skipped without it and without
CUDA). Grids are kept small: the interpreter pays per program instance.
"""
import math

import pytest
import torch

import tempo_kernels as K
from tempo_kernels import _common
from tempo_kernels.advantage import (
    em_token_advantage_reference,
    group_advantage_reference,
)
from tempo_kernels.logprob import (
    linear_logprob_reference,
    linear_logprob_torch,
    linear_logprob_triton,
)
from tempo_kernels.policy import policy_loss_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = _common.HAS_TRITON and (DEV == "cuda" or _common.interpreting())
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")

HALF = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def backend(request):
    """Parametrised by name: the `backend` argument that makes the public dispatch run that path."""
    name = request.param
    if name == "triton" and not CAN_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return name


def _close(a, b, atol, rtol=0.0, what=""):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    tol = atol + rtol * b.abs().max().item() if b.numel() else atol
    assert err <= tol, f"{what}: max err {err:.3g} > {tol:.3g}"


# ======================================================================================
# linear_logprob
# ======================================================================================
def _lp_inputs(T, V, D, dtype, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, D, generator=g) * 0.6).to(dtype).to(DEV)
    w = torch.randn(V, D, generator=g).to(dtype).to(DEV)
    lab = torch.randint(0, V, (T,), generator=g)
    for i in ignore:
        if i < T:
            lab[i] = -100
    return h, w, lab.to(DEV)


def _lp_ref_and_grads(h, w, lab, temp, with_entropy, gl, ge):
    """float64 reference on the (possibly half-rounded) inputs, and its grads."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    lp, ent = linear_logprob_reference(h64, w64, lab, temp, with_entropy)
    obj = (lp * gl).sum() + ((ent * ge).sum() if with_entropy else 0.0)
    dh, dw = torch.autograd.grad(obj, [h64, w64])
    return lp, ent, dh, dw


def _check_lp(fn, T, V, D, dtype, temp, with_entropy, ignore=(3,), **kw):
    h, w, lab = _lp_inputs(T, V, D, dtype, ignore=ignore)
    g = torch.Generator().manual_seed(1)
    gl = torch.randn(T, generator=g, dtype=torch.float64).to(DEV)
    ge = torch.randn(T, generator=g, dtype=torch.float64).to(DEV)
    rlp, rent, rdh, rdw = _lp_ref_and_grads(h, w, lab, temp, with_entropy, gl, ge)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(hh, ww, lab, temp, with_entropy, **kw)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lp.shape == (T,) and (ent is None) == (not with_entropy)
    fa = 1e-9 if dtype == torch.float64 else 2e-4
    _close(lp, rlp, fa, 1e-5, "logp")
    if with_entropy:
        _close(ent, rent, fa, 1e-5, "entropy")
    obj = (lp * gl.to(lp.dtype)).sum() + ((ent * ge.to(ent.dtype)).sum() if with_entropy else 0.0)
    dh, dw = torch.autograd.grad(obj, [hh, ww])
    assert dh.dtype == dtype and dw.dtype == dtype
    ga = 1e-9 if dtype == torch.float64 else 2e-4
    gr = HALF.get(dtype, 1e-4)
    _close(dh, rdh, ga, gr, "grad hidden")
    _close(dw, rdw, ga, gr, "grad weight")
    assert lp[3].item() == 0.0 if 3 in ignore and T > 3 else True


LP_CASES = [
    # T, V, D, dtype, temperature, with_entropy
    (1, 203, 40, torch.float32, 1.0, True),
    (37, 203, 40, torch.float32, 0.7, True),
    (37, 130, 17, torch.float32, 1.3, False),
    (37, 203, 40, torch.bfloat16, 1.0, True),
    (20, 203, 40, torch.float16, 0.7, True),
]


@pytest.mark.parametrize("T,V,D,dtype,temp,ent", LP_CASES + [(37, 203, 40, torch.float64, 0.7, True)])
def test_logprob_torch_path_matches_reference(T, V, D, dtype, temp, ent):
    # small blocks: several vocab blocks (the last one partial) and several token chunks
    _check_lp(linear_logprob_torch, T, V, D, dtype, temp, ent, block_t=16, block_v=64)


def test_logprob_torch_path_gradcheck_float64():
    h, w, lab = _lp_inputs(5, 11, 6, torch.float64, seed=3)
    lab[2] = -1
    h.requires_grad_()
    w.requires_grad_()

    def fn(h, w):
        lp, ent = linear_logprob_torch(h, w, lab, 0.8, True, block_t=2, block_v=4)
        return lp, ent

    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("T,V,D,dtype,temp,ent", LP_CASES)
def test_logprob_triton_matches_reference(T, V, D, dtype, temp, ent):
    # two vocab splits in the forward; [16 x 96] blocks in the backward (several token chunks
    # and vocabulary blocks, the last ones partial)
    _check_lp(linear_logprob_triton, T, V, D, dtype, temp, ent, num_splits=2, bwd_block_t=16, bwd_block_v=96)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"], indirect=True)
def test_logprob_dispatch(backend):
    h, w, lab = _lp_inputs(9, 70, 24, torch.float32)
    lp, ent = K.linear_logprob(h, w, lab, temperature=0.9, with_entropy=True, backend=backend)
    rlp, rent = linear_logprob_reference(h.double(), w.double(), lab, 0.9, True)
    _close(lp, rlp, 1e-4, 1e-5, "logp")
    _close(ent, rent, 1e-4, 1e-5, "entropy")
    lp2, none = K.linear_logprob(h, w, lab, backend=backend)
    assert none is None and lp2.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_logprob_grad_through_one_output(backend, use):
    # with_entropy=True but only one output used: the other must not leak into the grads
    h, w, lab = _lp_inputs(7, 50, 16, torch.float32)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = K.linear_logprob(hh, ww, lab, with_entropy=True, backend=backend)[0 if use == "logp" else 1]
    dh, dw = torch.autograd.grad(out.sum(), [hh, ww])
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_logprob_reference(h64, w64, lab, 1.0, True)[0 if use == "logp" else 1]
    rdh, rdw = torch.autograd.grad(ref.sum(), [h64, w64])
    _close(dh, rdh, 1e-4, 1e-4, "grad hidden")
    _close(dw, rdw, 1e-4, 1e-4, "grad weight")


@needs_triton
def test_logprob_triton_refuses_mixed_dtypes():
    # tl.dot needs one dtype for both operands; the interpreter would run a mix a GPU cannot compile
    h, w, lab = _lp_inputs(8, 40, 16, torch.float32)
    with pytest.raises(TypeError, match="hidden is torch.float32 but weight is torch.bfloat16"):
        linear_logprob_triton(h, w.bfloat16(), lab)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_logprob_under_autocast_runs_in_the_autocast_dtype(backend):
    # bf16 training: fp32 norm output and fp32 master weight, autocast on. The head must run on
    # bf16 operands (what autocast does to a matmul), with gradients back in fp32 for both.
    h, w, lab = _lp_inputs(10, 60, 16, torch.float32)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        lp, ent = K.linear_logprob(hh, ww, lab, 0.9, with_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    want_lp, want_ent = K.linear_logprob(h.bfloat16(), w.bfloat16(), lab, 0.9, with_entropy=True, backend=backend)
    _close(lp, want_lp, 0.0, what="logp")  # the same computation as explicit bf16 inputs
    _close(ent, want_ent, 0.0, what="entropy")
    assert hh.grad.dtype == ww.grad.dtype == torch.float32
    rlp, _ = linear_logprob_reference(h.double(), w.double(), lab, 0.9)
    _close(lp, rlp, 0.1, what="logp vs fp64")  # bf16 rounding of the operands, not a wrong result


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_logprob_frozen_weight_and_no_grad(backend):
    h, w, lab = _lp_inputs(6, 40, 16, torch.float32)
    hh = h.clone().requires_grad_()
    lp, _ = K.linear_logprob(hh, w, lab, backend=backend)  # weight frozen: only dH
    (dh,) = torch.autograd.grad(lp.sum(), [hh])
    h64 = h.double().requires_grad_()
    (rdh,) = torch.autograd.grad(linear_logprob_reference(h64, w.double(), lab)[0].sum(), [h64])
    _close(dh, rdh, 1e-4, 1e-4, "grad hidden")
    with torch.no_grad():  # e.g. old log-probs
        lp2, _ = K.linear_logprob(h, w, lab, backend=backend)
    assert not lp2.requires_grad
    _close(lp2, lp, 0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_logprob_vocab_shards_combine_to_full(backend):
    T, V, D, temp = 13, 150, 24, 0.8
    h, w, lab = _lp_inputs(T, V, D, torch.float32, seed=5, ignore=(4,))
    bounds = [0, 37, 101, V]  # uneven shards; some labels in each
    shards = [K.vocab_shard_stats(h, w[a:b], lab, a, temp, backend=backend) for a, b in zip(bounds, bounds[1:])]
    rlp, rent = linear_logprob_reference(h.double(), w.double(), lab, temp, True)

    lp, ent, lse = K.shard_stats_to_logprob(K.combine_shard_stats(shards), lab)
    _close(lp, rlp, 1e-4, 1e-5, "logp (combine)")
    _close(ent, rent, 1e-4, 1e-5, "entropy (combine)")

    # the all-reduce recipe of the docstring, emulated: MAX of the maxima, then SUM
    gmax = torch.stack([s.max for s in shards]).amax(0)
    resc = [K.rescale_shard_stats(s, gmax) for s in shards]
    summed = torch.stack([torch.stack([r.sumexp, r.wsum, r.target]) for r in resc]).sum(0)
    lp2, ent2, lse2 = K.shard_stats_to_logprob(K.ShardStats(gmax, *summed.unbind(0)), lab)
    _close(lp2, rlp, 1e-4, 1e-5, "logp (all-reduce)")
    _close(ent2, rent, 1e-4, 1e-5, "entropy (all-reduce)")

    # backward: per-shard grads sum (hidden) / concatenate (weight) to the full grads
    g = torch.Generator().manual_seed(2)
    gl = torch.randn(T, generator=g, dtype=torch.float64).to(DEV)
    ge = torch.randn(T, generator=g, dtype=torch.float64).to(DEV)
    _, _, rdh, rdw = _lp_ref_and_grads(h, w, lab, temp, True, gl, ge)
    parts = [K.vocab_shard_grad(h, w[a:b], lab, a, lse, ent, gl.float(), ge.float(), temp, backend=backend)
             for a, b in zip(bounds, bounds[1:])]
    _close(sum(p[0] for p in parts), rdh, 2e-4, 1e-4, "grad hidden (shards)")
    _close(torch.cat([p[1] for p in parts]), rdw, 2e-4, 1e-4, "grad weight (shards)")


def test_logprob_torch_path_holds_no_full_logits(monkeypatch):
    """The torch path never asks for a [T, V] buffer: record every torch.mm output shape."""
    T, V, D = 32, 300, 16
    h, w, lab = _lp_inputs(T, V, D, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    seen = []
    real_mm = torch.mm

    def spy(a, b, *args, **kw):
        out = real_mm(a, b, *args, **kw)
        seen.append(tuple(out.shape))
        return out

    import tempo_kernels.logprob as lpmod

    monkeypatch.setattr(lpmod.torch, "mm", spy)
    lp, ent = linear_logprob_torch(h, w, lab, 1.0, True, block_t=16, block_v=64)
    (lp.sum() + ent.sum()).backward()
    monkeypatch.setattr(lpmod.torch, "mm", real_mm)
    assert seen and all(r * c <= 16 * 64 or c == D for r, c in seen), seen


# ======================================================================================
# group_advantage / em_token_advantage
# ======================================================================================
ADV_BACKENDS = ["torch", "triton", "reference"]


@pytest.mark.parametrize("backend", ADV_BACKENDS, indirect=True)
def test_group_advantage_hand_example(backend):
    # group 0 = {1, 2, 3}: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1
    # group 7 = {4, 6}:    mean 5, unbiased std sqrt((1 + 1) / 1) = sqrt(2) -> -/+ 1/sqrt(2)
    # group 1 = {5}:       one sample -> 0
    # norm_std=False (Dr. GRPO): x - mean -> -1, -1, 0, 0, 1, 1
    scores = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 6.0], device=DEV)
    ids = torch.tensor([0, 7, 0, 1, 0, 7], device=DEV)
    s = 1 / math.sqrt(2)
    _close(K.group_advantage(scores, ids, eps=0.0, backend=backend), torch.tensor([-1, -s, 0, 0, 1, s]), 1e-6)
    _close(K.group_advantage(scores, ids, norm_std=False, backend=backend), torch.tensor([-1.0, -1, 0, 0, 1, 1]), 1e-6)
    out = K.group_advantage(scores, ids, backend=backend)  # eps = 1e-6 shrinks by a factor 1 / (1 + 1e-6 / std)
    _close(out, torch.tensor([-1, -s, 0, 0, 1, s]), 2e-6)


@pytest.mark.parametrize("backend", ADV_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm_std", [True, False])
def test_group_advantage_matches_reference(backend, dtype, norm_std):
    if backend == "triton" and dtype == torch.float64:
        pass  # dispatch falls back to the torch path: still checked
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([9, 2, 9, 2, 5, 9, 2, 40, 9, 2, 2, 2, 11, 11, 9, 9, 9, 2, 3, 3], dtype=torch.int64)
    scores = torch.randn(ids.numel(), generator=g).to(dtype)
    scores[ids == 3] = 0.25  # a zero-variance group
    out = K.group_advantage(scores.to(DEV), ids.to(DEV), norm_std=norm_std, backend=backend)
    ref = group_advantage_reference(scores.double(), ids, norm_std=norm_std)
    assert out.shape == ids.shape
    _close(out, ref, 1e-9 if dtype == torch.float64 else 2e-5, 1e-5)
    assert (out[(ids == 40) | (ids == 3)] == 0).all()


@pytest.mark.parametrize("backend", ADV_BACKENDS, indirect=True)
def test_em_token_advantage_hand_example(backend):
    # A = R - V on valid tokens: row 0: 1 - [0.5, 0.0] = [0.5, 1.0]; row 1: -1 - [0, -0.5] = [-1, -0.5]
    # mean 0; unbiased var (0.25 + 1 + 1 + 0.25) / 3 = 0.8333..; rsqrt = 1.0954451
    # -> [[0.5477226, 1.0954451, 0], [-1.0954451, -0.5477226, 0]]; the masked column -> 0
    R = torch.tensor([1.0, -1.0], device=DEV)
    V = torch.tensor([[0.5, 0.0, 9.0], [0.0, -0.5, -9.0]], device=DEV)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], device=DEV)
    want = torch.tensor([[0.5477226, 1.0954451, 0.0], [-1.0954451, -0.5477226, 0.0]])
    _close(K.em_token_advantage(R, V, m, backend=backend), want, 1e-6)
    _close(K.em_token_advantage(R, V, m.bool(), backend=backend), want, 1e-6)


@pytest.mark.parametrize("backend", ADV_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("B,R", [(5, 37), (61, 47)])
def test_em_token_advantage_matches_reference(backend, dtype, mask_kind, B, R):
    # 61 × 47: 2,867 slots, more than one block of the Triton kernel (1,024 in the interpreter,
    # 2,048 on GPUs), with valid tokens in every block: the blocks' moments are merged (Chan et al.).
    g = torch.Generator().manual_seed(11)
    rew = torch.randn(B, generator=g).to(dtype)
    val = torch.randn(B, R, generator=g).to(dtype) + 0.5  # a mean away from 0: a wrong merge shows
    lens = torch.randint(R // 2, R + 1, (B,), generator=g)
    lens[:4] = torch.tensor([R, 0, 5, 1])  # a full row, an empty row, a 1-token row
    m = torch.arange(R)[None, :] < lens[:, None]
    if B > 5:
        assert B * R > 2048 and all(m.flatten()[i:i + 1024].any() for i in range(0, B * R, 1024))
    mk = m if mask_kind == "bool" else m.float()
    out = K.em_token_advantage(rew.to(DEV), val.to(DEV), mk.to(DEV), backend=backend)
    ref = em_token_advantage_reference(rew.double(), val.double(), m)
    _close(out, ref, 2e-5, 1e-5)
    assert (out.cpu()[~m] == 0).all()


@pytest.mark.parametrize("backend", ADV_BACKENDS, indirect=True)
def test_em_token_advantage_degenerate_masks(backend):
    R = torch.tensor([1.0, 2.0], device=DEV)
    V = torch.randn(2, 4).to(DEV)
    none = torch.zeros(2, 4, dtype=torch.bool, device=DEV)
    one = none.clone()
    one[1, 2] = True
    for m in (none, one):
        out = K.em_token_advantage(R, V, m, backend=backend)
        assert torch.isfinite(out).all() and (out == 0).all()


# ======================================================================================
# policy_loss
# ======================================================================================
LOSS_BACKENDS = ["torch", "triton", "reference"]
L15, L05, L4, L2 = math.log(1.5), math.log(0.5), math.log(4.0), math.log(2.0)


def _loss_and_grad(logp, old, adv, mask, **kw):
    lp = logp.clone().requires_grad_()
    loss, stats = K.policy_loss(lp, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, [lp])
    return loss, g, stats


@pytest.mark.parametrize("backend", LOSS_BACKENDS, indirect=True)
def test_ppo_hand_example(backend):
    # old = 0, so r = exp(logp); clip 0.2 -> [0.8, 1.2]
    # row 0: t0 r=1.5 A=+1: l1=-1.5, l2=-1.2 -> -1.2 (clipped branch, grad 0)
    #        t1 r=0.5 A=+2: l1=-1.0, l2=-1.6 -> -1.0 (d l / d logp = -A r = -1)
    #        t2 r=1   A=-1: l1=l2=1          ->  1   (d l / d logp = -A r = +1)
    #        t3 masked (logp=50 would overflow exp if it leaked)
    # row 1: t0 r=4 A=-1: l1=4, l2=1.2 -> 4 (grad -A r = 4); dual clip c=3: min(4, 3)=3, grad 0
    #        t1..t3 masked
    # token-mean, no dual clip: (-1.2 - 1 + 1 + 4) / 4 = 0.7;  grads /4: [0, -.25, .25, 0 | 1, 0...]
    # token-mean, clip_c=3:     (-1.2 - 1 + 1 + 3) / 4 = 0.45; grads [0, -.25, .25, 0 | 0 ...]
    # seq-mean-token-mean, c=3: row sums -1.2 and 3 -> ((-1.2 / 3) + 3 / 1) / 2 = 1.3
    #                           grads row 0: -A r / (3 tokens * 2 rows): [0, -1/6, 1/6, 0]
    # seq-mean-token-sum, c=3:  (-1.2 + 3) / 2 = 0.9; grads row 0 / 2 rows: [0, -.5, .5, 0]
    # clipfrac: only row0/t0 has l2 > l1 -> 1/4; approx_kl = -(ln1.5 + ln0.5 + 0 + ln4)/4 = -0.2746531
    logp = torch.tensor([[L15, L05, 0.0, 50.0], [L4, 50.0, 50.0, 50.0]], device=DEV)
    old = torch.zeros(2, 4, device=DEV)
    adv = torch.tensor([[1.0, 2.0, -1.0, 7.0], [-1.0, 7.0, 7.0, 7.0]], device=DEV)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], device=DEV, dtype=torch.bool)
    cases = [
        (dict(clip_c=None, agg="token-mean"), 0.7, [[0, -0.25, 0.25, 0], [1, 0, 0, 0]]),
        (dict(clip_c=3.0, agg="token-mean"), 0.45, [[0, -0.25, 0.25, 0], [0, 0, 0, 0]]),
        (dict(clip_c=3.0, agg="seq-mean-token-mean"), 1.3, [[0, -1 / 6, 1 / 6, 0], [0, 0, 0, 0]]),
        (dict(clip_c=3.0, agg="seq-mean-token-sum"), 0.9, [[0, -0.5, 0.5, 0], [0, 0, 0, 0]]),
    ]
    for kw, want_loss, want_grad in cases:
        loss, g, st = _loss_and_grad(logp, old, adv, mask, kind="ppo", **kw, backend=backend)
        _close(loss, torch.tensor(want_loss), 1e-6, what=str(kw))
        _close(g, torch.tensor(want_grad), 1e-6, what=str(kw))
        _close(st["clipfrac"], torch.tensor(0.25), 1e-7)
        _close(st["approx_kl"], torch.tensor(-0.2746531), 1e-6)


@pytest.mark.parametrize("backend", LOSS_BACKENDS, indirect=True)
def test_gspo_hand_example(backend):
    # row 0: valid logp - old = [ln 2, 0] -> mean ln(sqrt 2) -> s = 1.4142136; A = [+1, -1]
    #        t0: l1 = -1.4142, l2 = -1.2 -> -1.2 (clipped, grad 0)
    #        t1: l1 = +1.4142, l2 = +1.2 -> 1.4142 (grad -A s = 1.4142)
    # row 1: valid logp - old = [ln 0.81, 0] -> s = 0.9 (inside [0.8, 1.2]); A = [2, 2]
    #        l = -1.8 each, grad -A s = -1.8 each
    # seq-mean-token-mean: ((-1.2 + 1.4142136) / 2 + (-1.8 - 1.8) / 2) / 2 = -0.8464466
    #   grads: row 0 [0, 1.4142136 / 4, 0], row 1 [-1.8 / 4, -1.8 / 4, 0]
    # clipfrac 1/4; approx_kl = -(ln 2 + ln 0.81) / 4 = -0.1206061
    logp = torch.tensor([[L2 - 1.0, -1.0, 3.0], [math.log(0.81) - 2.0, -2.0, 9.0]], device=DEV)
    old = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -2.0, 0.0]], device=DEV)
    adv = torch.tensor([[1.0, -1.0, 5.0], [2.0, 2.0, 5.0]], device=DEV)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], device=DEV)
    loss, g, st = _loss_and_grad(logp, old, adv, mask, kind="gspo", agg="seq-mean-token-mean", backend=backend)
    _close(loss, torch.tensor(-0.8464466), 1e-6)
    _close(g, torch.tensor([[0, 0.35355339, 0], [-0.45, -0.45, 0]]), 1e-6)
    _close(st["clipfrac"], torch.tensor(0.25), 1e-7)
    _close(st["approx_kl"], torch.tensor(-0.1206061), 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("kind", ["gspo", "ppo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip_c", [None, 3.0])
@pytest.mark.parametrize("R", [37, 1100])
def test_policy_loss_matches_reference(backend, kind, agg, clip_c, R):
    # R = 1100: longer than one column block of the Triton kernel (64 in the interpreter, 1,024 on
    # GPUs), so GSPO's sequence ratio and the row sums run through the column loop.
    g = torch.Generator().manual_seed(13)
    B = 5
    old = -torch.rand(B, R, generator=g) * 3
    logp = old + torch.randn(B, R, generator=g) * 0.3
    adv = torch.randn(B, R, generator=g)
    lens = torch.tensor([R, 0, 1, R * 20 // 37, R - 4])  # includes a fully masked row and a 1-token row
    mask = torch.arange(R)[None, :] < lens[:, None]
    kw = dict(kind=kind, clip_low=0.2, clip_high=0.28, clip_c=clip_c, agg=agg)
    loss, grad, st = _loss_and_grad(logp.to(DEV), old.to(DEV), adv.to(DEV), mask.to(DEV), **kw, backend=backend)
    lp64 = logp.double().requires_grad_()
    rloss, rst = policy_loss_reference(lp64, old.double(), adv.double(), mask, **kw)
    (rgrad,) = torch.autograd.grad(rloss, [lp64])
    _close(loss, rloss, 1e-6, 1e-5, "loss")
    _close(grad, rgrad, 1e-7, 1e-5, "grad")
    for k in ("clipfrac", "approx_kl"):
        _close(st[k], rst[k], 1e-6, 1e-5, k)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_half_inputs(backend, dtype):
    g = torch.Generator().manual_seed(17)
    B, R = 3, 21
    old = (-torch.rand(B, R, generator=g) * 2).to(dtype)
    logp = (old.float() + torch.randn(B, R, generator=g) * 0.2).to(dtype)
    adv = torch.randn(B, R, generator=g).to(dtype)
    mask = torch.rand(B, R, generator=g) > 0.3
    for kind in ("gspo", "ppo"):
        loss, grad, _ = _loss_and_grad(logp.to(DEV), old.to(DEV), adv.to(DEV), mask.float().to(DEV), kind=kind,
                                       backend=backend)
        assert grad.dtype == dtype
        lp64 = logp.double().requires_grad_()
        rloss, _ = policy_loss_reference(lp64, old.double(), adv.double(), mask, kind=kind)
        (rgrad,) = torch.autograd.grad(rloss, [lp64])
        _close(loss, rloss, 1e-5, 1e-5, "loss")
        _close(grad, rgrad, 1e-6, HALF[dtype], "grad")


@pytest.mark.parametrize("backend", LOSS_BACKENDS, indirect=True)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_policy_loss_empty_batch_is_zero_not_nan(backend, agg):
    logp = torch.randn(2, 5, device=DEV)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=DEV)
    for kind in ("gspo", "ppo"):
        loss, g, st = _loss_and_grad(logp, logp + 1, torch.randn(2, 5, device=DEV), mask, kind=kind, agg=agg,
                                     backend=backend)
        assert loss.item() == 0.0 and (g == 0).all()
        assert st["clipfrac"].item() == 0.0 and st["approx_kl"].item() == 0.0


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="cuda-please"):
        K.group_advantage(torch.zeros(2), torch.zeros(2, dtype=torch.int64), backend="cuda-please")


def test_no_tempo_import():
    import pathlib

    src = pathlib.Path(K.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import tempo\n" not in text and "from tempo" not in text.replace("from tempo_kernels", ""), f
