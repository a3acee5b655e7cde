"""Launched by tests/test_megatron.py under torchrun: the Megatron backend on tiny Qwen3/OLMo3.

For each layout (tp,pp[,option]; data parallel is what the world size leaves; option: sp for
sequence parallelism, selective or full for activation recomputation, bf16 for bf16 weights
with fp32 masters, offload for fp32 masters and AdamW state in host memory) it builds the policy
and the critic from HF checkpoints, scores a fixed token batch, takes one optimiser step of
each with a fixed loss, gathers the HF-named weights and saves both models; rank 0 writes
every number to --out (torch.save). With --reference (one process) it also records the same
steps through the Hugging Face backend and the full logits of both backends.

    torchrun --nproc_per_node 2 tests/torchrun_megatron.py --policy P [P2 ...] --critic C [C2 ...] \
        --out F --layouts 2,1 1,2 1,1 2,1,sp
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

from tempo.config import Optim
from tempo.models.base import TokenBatch

# AdamW's first step moves a weight by lr * g / (|g| + eps): near g = 0 a gradient that differs
# by rounding (1e-9, another summation order in another layout or on another processor) moves
# it by up to lr * 1e-9 / eps. eps 1e-6 keeps that at 1e-7, well under the tests' 1e-5, while
# a wrong gradient still moves weights by about lr.
OPTIM = Optim(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, eps=1e-6)
MICRO_BATCH = 2


def token_batch(seed: int = 0, rows: int = 5, prompt: int = 7, response: int = 6, vocab: int = 97) -> TokenBatch:
    """Left-padded prompts, right-padded responses (one empty-ish), advantages and returns."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = [7, 5, 3, 7, 6][:rows]
    resp_len = [6, 4, 1, 6, 3][:rows]
    ids = torch.zeros(rows, prompt + response, dtype=torch.long)
    mask = torch.zeros(rows, prompt + response, dtype=torch.long)
    rmask = torch.zeros(rows, response)
    for i in range(rows):
        ids[i, prompt - prompt_len[i]:prompt] = torch.randint(2, vocab, (prompt_len[i],), generator=g)
        ids[i, prompt:prompt + resp_len[i]] = torch.randint(2, vocab, (resp_len[i],), generator=g)
        mask[i, prompt - prompt_len[i]:prompt + resp_len[i]] = 1
        rmask[i, :resp_len[i]] = 1
    extras = {"advantages": torch.randn(rows, generator=g), "returns": torch.randn(rows, generator=g)}
    return TokenBatch(ids, mask, rmask, extras)


def policy_loss(out, mb, rows):
    m = mb.response_mask
    pg = -(mb.extras["advantages"][:, None] * out["logp"] * m).sum(-1) / m.sum(-1)
    ent = (out["entropy"] * m).sum() / m.sum()
    loss = pg.mean() - 0.01 * ent
    return loss * len(mb) / rows, {"loss": float(loss), "entropy": float(ent)}


def value_loss(out, mb, rows):
    m = mb.response_mask
    loss = 0.5 * (((out["values"] - mb.extras["returns"][:, None]) ** 2) * m).sum() / m.sum()
    return loss * len(mb) / rows, {"loss": float(loss)}


def run_steps(policy, critic, batch: TokenBatch) -> dict:
    """Scores, one step of each model, scores again: everything the tests compare."""
    rows = len(batch)
    res = {"policy_infer": policy.infer(batch, MICRO_BATCH), "critic_infer": critic.infer(batch, MICRO_BATCH)}
    mbs = batch.split(MICRO_BATCH)
    res["policy_step"] = policy.train_step(mbs, lambda o, mb: policy_loss(o, mb, rows))
    res["critic_step"] = critic.train_step(mbs, lambda o, mb: value_loss(o, mb, rows))
    res["policy_weights"] = {k: v.clone() for k, v in policy.export_weights()}
    res["critic_weights"] = {k: v.clone() for k, v in critic.export_weights()}
    res["policy_infer_after"] = policy.infer(batch, MICRO_BATCH)
    return res


def hf_reference(policy_path: str, critic_path: str, batch: TokenBatch) -> dict:
    from tempo.models.hf import HFModel, load_critic_module, load_policy_module

    pol = HFModel(load_policy_module(policy_path, torch.float32), "policy", OPTIM)
    cri = HFModel(load_critic_module(critic_path, torch.float32, init_from_policy=False), "critic", OPTIM)
    with torch.no_grad():
        logits = pol.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids()).logits
    return {"logits": logits, **run_steps(pol, cri, batch)}


def megatron_logits(policy, batch: TokenBatch) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] of a one-stage, one-shard policy (the equivalence test)."""
    with torch.no_grad():
        hidden = policy.stage(batch.input_ids, batch.position_ids(), batch.attention_mask).transpose(0, 1)
        weight = policy.stage.gpt.shared_embedding_or_output_weight() if policy.tied else \
            policy.stage.gpt.output_layer.weight
        return hidden @ weight.T


def main() -> None:
    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--policy", nargs="+", required=True, help="one or more policy checkpoints")
    p.add_argument("--critic", nargs="+", required=True, help="one critic for all policies, or one for each")
    p.add_argument("--out", required=True)
    p.add_argument("--save", default="", help="save the models of each layout under this folder")
    p.add_argument("--layouts", nargs="+", default=["1,1"])
    p.add_argument("--bucket-bytes", type=int, default=0, help="small export buckets to test bucketing")
    p.add_argument("--reference", action="store_true")
    args = p.parse_args()

    from transformers import AutoConfig

    from tempo.models.megatron.convert import ModelShape
    from tempo.models.megatron.model import load_model
    from tempo.dist import launched_world_size
    from tempo.models.megatron.parallel import check_layout, init_parallel

    batch = token_batch()
    results = {}
    for i, policy_path in enumerate(args.policy):
        critic_path = args.critic[i if len(args.critic) > 1 else 0]
        s = ModelShape.from_hf(AutoConfig.from_pretrained(policy_path))
        for text in args.layouts:
            tp, pp, *option = text.split(",")
            tp, pp, option = int(tp), int(pp), option[0] if option else ""
            layout = check_layout(tp, pp, launched_world_size(), num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                  num_layers=s.num_layers, ffn_size=s.ffn_size)
            init_parallel(layout, seed=0)
            torch.manual_seed(0)
            parts = dict(sequence_parallel=option == "sp", recompute=option if option in ("selective", "full") else "none",
                         dtype=torch.bfloat16 if option == "bf16" else torch.float32, cpu_offload=option == "offload")
            policy = load_model(policy_path, "policy", optim=OPTIM, **parts)
            critic = load_model(critic_path, "critic", optim=OPTIM, **parts)
            if args.bucket_bytes:
                policy.export_bucket_bytes = critic.export_bucket_bytes = args.bucket_bytes
            res = {"rng_after_build": torch.get_rng_state()}
            if args.reference and tp == pp == 1:
                res["logits"] = megatron_logits(policy, batch)
                zero = load_model(policy_path, "critic", init_from_policy=True, dtype=torch.float32, optim=OPTIM)
                res["zero_head_values"] = zero.infer(batch, MICRO_BATCH)["values"]
            res.update(run_steps(policy, critic, batch))
            res["masters"] = [(m.dtype, torch.equal(m.to(p.dtype), p)) for m, p in zip(policy.masters, policy.params)]
            res["masters_apart"] = all(m is not p and m.device.type == "cpu" for m, p in zip(policy.masters, policy.params))
            name = f"{tp}x{pp}" + (f",{option}" if option else "")
            if args.save:
                policy.save(f"{args.save}/{i}/{name}/policy")
                critic.save(f"{args.save}/{i}/{name}/critic")
            results[f"{i}/{tp}x{pp}x{layout.dp}" + (f",{option}" if option else "")] = res
        if args.reference:
            results[f"{i}/hf"] = hf_reference(policy_path, critic_path, batch)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
