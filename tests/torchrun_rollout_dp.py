"""Launched by tests/test_rollout_dp.py under torchrun: a tiny Qwen3 behind the HF engine,
wrapped by DataParallelRollout, on gloo, asked for three calls (two equal halves; an uneven
split; one prompt). Each rank writes to --out/rank{r}.pt what its own engine was asked and
sampled, what the wrapper returned, and the trainer's RNG state after the first call and as
one draw would have left it.

    torchrun --nproc_per_node 2 tests/torchrun_rollout_dp.py --out DIR
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

from tempo.base_model import build_tiny_qwen3
from tempo.config import BaseModelConfig, RolloutConfig
from tempo.rollout.hf import HFRolloutEngine
from tempo.rollout.parallel import DataParallelRollout, draw_seed
from tempo.tokenizer import char_tokenizer

# Two equal halves: with one seed the two ranks would sample the same rows.
PROMPTS = ["1+1=", "7*8=", "1+1=", "7*8="]
# An uneven split (one prompt, then two), the first half wider: re-padded when gathered.
WIDE = ["12+34=", "1+1=", "5-2="]
N = 2


class Recording(HFRolloutEngine):
    """The HF engine, keeping each call's prompts and result."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[str], object]] = []

    def generate(self, prompts, n, *, temperature=None):
        out = super().generate(prompts, n, temperature=temperature)
        self.calls.append((list(prompts), out))
        return out


def main() -> None:
    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from tempo.dist import init_process_group

    init_process_group()
    tok = char_tokenizer()
    micro = BaseModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, ffn_size=32)
    model = build_tiny_qwen3(micro, len(tok), tok.pad_token_id, tok.eos_token_id)  # seeded: the same on both
    inner = Recording(RolloutConfig(n=N, max_new_tokens=8), model, tok)
    engine = DataParallelRollout(inner, tok.pad_token_id)
    torch.manual_seed(0)  # the trainer's stream, the same on every rank
    before = torch.get_rng_state()
    halves = engine.generate(PROMPTS, N)
    after = torch.get_rng_state()
    wide = engine.generate(WIDE, N)
    single = engine.generate(WIDE[2:], N)  # fewer prompts than ranks
    torch.set_rng_state(before)
    draw_seed()
    res = {"calls": inner.calls, "halves": halves, "wide": wide, "single": single, "after": after,
           "one_draw": torch.get_rng_state()}
    torch.save(res, f"{args.out}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
