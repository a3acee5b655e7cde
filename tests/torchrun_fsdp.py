"""Launched by tests/test_fsdp.py under torchrun: the HF backend's policy and critic, sharded
with FSDP2 over the launched ranks (one rank: not sharded unless --cpu-offload), on the fixed token batch of
tests/torchrun_megatron.py: scores, one optimiser step of each, scores again, the full weights,
and a saved checkpoint reloaded; rank 0 writes every number to --out.

    torchrun --nproc_per_node 2 tests/torchrun_fsdp.py --policy P --critic C --out F --save DIR [--cpu-offload]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

from torchrun_megatron import OPTIM, run_steps, token_batch, value_loss


def main() -> None:
    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--critic", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--cpu-offload", action="store_true")
    args = p.parse_args()

    from tempo.dist import init_process_group
    from tempo.models.hf import HFModel, load_critic_module, load_policy_module

    init_process_group()
    sharded = dist.get_world_size() > 1
    torch.manual_seed(0)
    sharded = sharded or args.cpu_offload  # offloading is FSDP2's, over one rank too
    options = dict(data_parallel=sharded, cpu_offload=args.cpu_offload)
    policy = HFModel(load_policy_module(args.policy, torch.float32), "policy", OPTIM, **options)
    critic = HFModel(load_critic_module(args.critic, torch.float32, init_from_policy=False), "critic", OPTIM,
                     **options)
    res = run_steps(policy, critic, token_batch())
    # (the root unit's own weights stay gathered after a forward: its layers show the sharding)
    res["sharded"] = sharded and all(hasattr(p, "full_tensor") for p in policy.module.model.layers.parameters())
    policy.save(f"{args.save}/policy")
    critic.save(f"{args.save}/critic")
    # One micro-batch for two ranks: the second runs only a stand-in, and must still reduce
    # the same list of statistics (an EM step's E-step on few labeled rows does this).
    batch = token_batch()
    res["one_micro_batch_infer"] = critic.infer(batch, len(batch))
    res["one_micro_batch_step"] = critic.train_step([batch], lambda o, mb: value_loss(o, mb, len(batch)))
    if dist.get_rank() == 0:
        torch.save(res, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
