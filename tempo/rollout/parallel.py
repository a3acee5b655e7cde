"""Rollouts split over data-parallel ranks under torchrun.

Without this, every rank would sample the whole call (same prompts, same seed): the EM loop needs
the call's rollouts on every rank, identical, rows in prompt order, but not that each rank
computes them all. `DataParallelRollout` gives each engine a contiguous slice of the prompts,
seeds its sampling by its DP rank, and gathers the slices back in order onto every rank.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from tempo.rollout.base import RolloutEngine, Rollouts

# A call's sampling seed on DP rank r: draw * MAX_DP_RANKS + r, with draw < SEED_DRAWS (distinct
# for every DP rank up to MAX_DP_RANKS, within torch.manual_seed's 64 bits).
SEED_DRAWS = 1 << 47
MAX_DP_RANKS = 1 << 16


def draw_seed() -> int:
    """One draw from the trainer's torch RNG. Every rank draws the same (the ranks share that
    stream, tempo.train seeds it), and a checkpoint's RNG state replays it on resume."""
    return int(torch.randint(SEED_DRAWS, ()))


def dp_slices(count: int, dp_size: int) -> list[slice]:
    """Contiguous, near-equal slices of `count` prompts, one per DP rank, in rank order."""
    bounds = [count * d // dp_size for d in range(dp_size + 1)]
    return [slice(bounds[d], bounds[d + 1]) for d in range(dp_size)]


def on_cpu(rollouts: Rollouts) -> Rollouts:
    """all_gather_object pickles a tensor with its device: what travels is on the CPU."""
    return Rollouts(*(v.cpu() if isinstance(v, torch.Tensor) else v for v in vars(rollouts).values()))


class DataParallelRollout(RolloutEngine):
    """One rank's engine, sampling its DP rank's slice of each call. `replicas` consecutive ranks
    share one engine (a vLLM tensor-parallel group: vLLM's external launcher groups ranks so) and
    sample the same slice with the same seed; the DP rank is rank // replicas."""

    def __init__(self, engine: RolloutEngine, pad_id: int, replicas: int = 1):
        super().__init__(engine.cfg)
        self.engine, self.pad_id = engine, pad_id
        rank, world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = rank // replicas, world // replicas
        self.sends = rank % replicas == 0  # one rank of a group sends its group's rollouts

    def generate(self, prompts: list[str], n: int, *, temperature: float | None = None) -> Rollouts:
        mine = prompts[dp_slices(len(prompts), self.dp_size)[self.dp_rank]]
        seed = draw_seed() * MAX_DP_RANKS + self.dp_rank
        # The engine samples from torch's global RNG (HF generate; vLLM in this process without
        # per-request seeds): seed it for this call and DP rank, then give the trainer its own back.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # A rank without prompts still runs its engine, on the first prompt, thrown away: the
            # vLLM engine loads a pending weight export, a collective under torchrun, in generate.
            out = self.engine.generate(mine or prompts[:1], n, temperature=temperature)
        parts: list[Rollouts | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, on_cpu(out) if mine and self.sends else None)
        return Rollouts.concat([p for p in parts if p is not None], self.pad_id)

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.sync_weights(weights)
