"""The HF backend's ways of running the same function: rows that share a prompt run it once
(`model.share_prompts`, in the forward and backward and in the rollout's prefill), and
gradient checkpointing (`model.recompute=full`). Each checked against the plain path on
outputs, gradients and sampled tokens."""
import pytest
import torch

from tempo.base_model import build_tiny_qwen3
from tempo.config import BaseModelConfig, Optim, RolloutConfig
from tempo.errors import ConfigError
from tempo.models.base import TokenBatch
from tempo.models.hf import HFModel
from tempo.rollout.hf import HFRolloutEngine
from tempo.tokenizer import char_tokenizer

SHAPE = BaseModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_size=64)
OPTIM = Optim(1e-3, 0.0, (0.9, 0.999), 1.0)
VOCAB = 40


def grouped_batch(seed: int = 0) -> TokenBatch:
    """Three prompts of lengths 5, 3 and 4 (left-padded), with 3, 2 and 2 samples in shuffled
    row order, responses of 1-6 tokens (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    P, R = 5, 6
    prompts = [torch.randint(2, VOCAB, (length,), generator=g) for length in (5, 3, 4)]
    rows = [0, 1, 0, 2, 1, 2, 0]
    ids = torch.zeros(len(rows), P + R, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros(len(rows), R)
    for i, k in enumerate(rows):
        p = prompts[k]
        ids[i, P - len(p):P], attn[i, P - len(p):P] = p, 1
        length = int(torch.randint(1, R + 1, (), generator=g))
        ids[i, P:P + length] = torch.randint(2, VOCAB, (length,), generator=g)
        attn[i, P:P + length], resp[i, :length] = 1, 1.0
    return TokenBatch(ids, attn, resp)


def module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    policy = build_tiny_qwen3(SHAPE, VOCAB, 0, 1)
    if kind == "policy":
        return policy
    from transformers import Qwen3Config, Qwen3ForTokenClassification
    cfg = Qwen3Config(**policy.config.to_dict())
    cfg.num_labels = 1
    critic = Qwen3ForTokenClassification(cfg)
    critic.model.load_state_dict(policy.model.state_dict())
    return critic


def outputs_and_grads(kind: str, share: bool, batch: TokenBatch, recompute: str = "none"):
    model = HFModel(module(kind), kind, OPTIM, share_prompts=share, recompute=recompute)
    model.module.train()
    calls, saved = [], []
    model.module.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model.forward(batch)
    loss = sum((v * batch.response_mask * (i + 1)).sum() for i, v in enumerate(out.values()))
    loss.backward()
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
    grads["(first layer's MLP runs)"] = torch.tensor(float(len(calls)))
    grads["(elements saved for backward)"] = torch.tensor(float(sum(saved)))
    return {k: v.detach() * batch.response_mask for k, v in out.items()}, grads


@pytest.mark.parametrize("kind", ["policy", "critic"])
def test_shared_prompt_forward_and_backward_match_every_row_run_alone(kind):
    batch = grouped_batch()
    plain_out, plain_grads = outputs_and_grads(kind, False, batch)
    shared_out, shared_grads = outputs_and_grads(kind, True, batch)
    assert shared_grads.pop("(first layer's MLP runs)") == 2  # the prompts, then the responses
    plain_grads.pop("(first layer's MLP runs)")
    assert shared_grads.pop("(elements saved for backward)") < plain_grads.pop("(elements saved for backward)")
    for k in plain_out:
        torch.testing.assert_close(shared_out[k], plain_out[k], atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompts_run_fewer_token_forwards():
    batch = grouped_batch()
    counts = {}
    for share in (False, True):
        model = HFModel(module("policy"), "policy", OPTIM, share_prompts=share)
        seen = []
        model.module.model.embed_tokens.register_forward_hook(lambda m, inp, out: seen.append(inp[0].numel()))
        model.forward(batch)
        counts[share] = sum(seen)
    # 7 rows × (5 + 6) columns against 3 distinct prompts × 5 + 7 × 6.
    assert counts == {False: 7 * 11, True: 3 * 5 + 7 * 6}


def test_rollout_with_a_shared_prompt_cache_samples_the_same_tokens():
    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = build_tiny_qwen3(SHAPE, len(tok), tok.pad_token_id, tok.eos_token_id)
    cfg = RolloutConfig(n=3, max_new_tokens=7)
    prompts = ["1+2=", "12*3-4=", "5="]
    out = {}
    for share in (False, True):
        torch.manual_seed(1)
        r = HFRolloutEngine(cfg, policy, tok, share_prompts=share).generate(prompts, 3)
        out[share] = (r.prompt_ids, r.response_ids, r.response_mask)
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["policy", "critic"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    batch = grouped_batch()
    plain_out, plain_grads = outputs_and_grads(kind, False, batch)
    # share_prompts is turned off under checkpointing (a recomputed layer would append to the cache twice)
    ckpt_out, ckpt_grads = outputs_and_grads(kind, True, batch, recompute="full")
    for k in plain_out:
        torch.testing.assert_close(ckpt_out[k], plain_out[k], atol=1e-6, rtol=1e-6)
    saved = "(elements saved for backward)"
    assert ckpt_grads.pop(saved) < plain_grads.pop(saved) / 4  # each layer keeps its input only
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=1e-6, rtol=1e-6, msg=name)


def test_a_prompt_longer_than_max_prompt_tokens_is_named():
    tok = char_tokenizer()
    policy = build_tiny_qwen3(SHAPE, len(tok), tok.pad_token_id, tok.eos_token_id)
    engine = HFRolloutEngine(RolloutConfig(n=2, max_new_tokens=4, max_prompt_tokens=6), policy, tok)
    with pytest.raises(ConfigError, match=r"rollout.max_prompt_tokens: a prompt has 9 tokens, more than 6: '12\+34\+56='"):
        engine.generate(["1+2=", "12+34+56="], 2)


def test_learning_rate_warms_up_over_optimiser_steps_then_stays():
    model = HFModel(module("critic"), "critic", Optim(1e-3, 0.0, (0.9, 0.999), 1.0, warmup_steps=4))
    batch = grouped_batch()

    def loss_fn(scale):
        return lambda out, mb: ((out["values"] * mb.response_mask).sum() * scale, {})

    lrs = [model.train_step([batch], loss_fn(1.0))["lr"] for _ in range(3)]
    skipped = model.train_step([batch], loss_fn(float("nan")))  # a skipped step does not count
    lrs += [model.train_step([batch], loss_fn(1.0))["lr"] for _ in range(2)]
    assert skipped["nonfinite"] == 1 and "lr" not in skipped
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_a_callers_schedule_scales_the_step_and_zero_leaves_the_weights():
    model = HFModel(module("critic"), "critic", Optim(1e-3, 0.0, (0.9, 0.999), 1.0))
    batch = grouped_batch()

    def loss_fn(out, mb):
        return (out["values"] * mb.response_mask).sum(), {}

    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    assert model.train_step([batch], loss_fn, lr_scale=0.0)["lr"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
    assert model.train_step([batch], loss_fn, lr_scale=0.25)["lr"] == pytest.approx(2.5e-4)
    assert any(not torch.equal(v, before[k]) for k, v in model.module.state_dict().items())


@pytest.mark.parametrize("kind", ["policy", "critic"])
def test_bf16_compute_keeps_fp32_master_weights(kind):
    """model.dtype=bfloat16: matmuls in bf16 (outputs within bf16 rounding of fp32), weights and
    AdamW state in fp32, so an update far below bf16's resolution near 1.0 (2^-8) still lands."""
    batch = grouped_batch()
    fp32 = HFModel(module(kind), kind, OPTIM)
    bf16 = HFModel(module(kind), kind, Optim(1e-5, 0.0, (0.9, 0.999), 1.0), compute_dtype=torch.bfloat16)
    ref, got = fp32.infer(batch, 8), bf16.infer(batch, 8)
    for k in ref:
        assert got[k].dtype == torch.float32
        diff = ((got[k] - ref[k]) * batch.response_mask).abs().max().item()
        assert 0 < diff < 0.1, k  # computed in bf16: not bit-equal, but close
    norm = dict(bf16.module.named_parameters())["model.norm.weight"]
    before = norm.detach().clone()

    def loss_fn(out, mb):
        return (next(iter(out.values())) * mb.response_mask).sum(), {}

    bf16.train_step([batch], loss_fn)
    assert norm.dtype == torch.float32
    step = (norm.detach() - before).abs()
    assert 0 < step.max() < 2 ** -8  # lr 1e-5: an update bf16 weights would have rounded away
