"""The embedded task: chains of modular arithmetic evaluated left to right.

A question `4+9*3-2 mod 7` is solved in written steps, one operation a line, and the
final value boxed:

    4+9=6;6*3=4;4-2=2;\\boxed{2}

Grading looks at the final answer only, like every math grader. With a prime modulus and no
multiplication by 0, every step is a bijection, so one slip always changes the final answer
(only two slips can cancel): right answers come from right work, not luck. (Modulus 10 with
"*0", "*2", "*5" lets a wrong chain land on the right digit: three quarters of the right
answers of a weak model were such lucky landings.)
Deterministic from a seed; the difficulty knobs are the modulus and the chain length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tempo.config import TaskConfig
from tempo.data import Problem

OPS = "+-*"


@dataclass(frozen=True)
class Chain:
    start: int
    ops: tuple[tuple[str, int], ...]
    modulus: int

    @property
    def question(self) -> str:
        return f"{self.start}" + "".join(f"{op}{v}" for op, v in self.ops) + f" mod {self.modulus}\n"

    def steps(self) -> list[tuple[int, str, int, int]]:
        value, out = self.start, []
        for op, v in self.ops:
            new = {"+": value + v, "-": value - v, "*": value * v}[op] % self.modulus
            out.append((value, op, v, new))
            value = new
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def solution(self) -> str:
        """The worked solution the base model is warm-started on."""
        lines = "".join(f"{a}{op}{b}={c};" for a, op, b, c in self.steps())
        return f"{lines}\\boxed{{{self.answer}}}"


def random_chain(rng: random.Random, cfg: TaskConfig) -> Chain:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    # No "*0": it erases the chain, so a wrong chain would still land on the right answer.
    ops = tuple((op, rng.randrange(1 if op == "*" else 0, cfg.modulus))
                for op in (rng.choice(OPS) for _ in range(n_ops)))
    return Chain(rng.randrange(cfg.modulus), ops, cfg.modulus)


def _unique_chains(rng: random.Random, cfg: TaskConfig, count: int, taken: set[str]) -> list[Chain]:
    chains: list[Chain] = []
    attempts = 0
    while len(chains) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"task: cannot draw {count} distinct questions; raise task.max_ops or task.modulus")
        chain = random_chain(rng, cfg)
        if chain.question not in taken:
            taken.add(chain.question)
            chains.append(chain)
    return chains


def _problem(chain: Chain, idx: int, split: str, labeled: bool) -> Problem:
    return Problem(id=f"chain-{split}-{idx}", prompt=chain.question, answer=str(chain.answer),
                   is_labeled=labeled, source=f"embedded-{split}")


@dataclass(frozen=True)
class TaskSplits:
    labeled: list[Problem]  # D_L
    unlabeled: list[Problem]  # D_U (answers only for scoring)
    heldout: list[Problem]  # labeled, never trained on: critic calibration
    stage1: list[Problem]  # labeled training data of stage 1 (RLVR before test time)


def make_splits(cfg: TaskConfig) -> TaskSplits:
    """D_L, D_U, the held-out slice and stage 1's data: disjoint questions, fixed by cfg.seed."""
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    sizes = {"labeled": cfg.num_labeled, "unlabeled": cfg.num_unlabeled, "heldout": cfg.num_heldout,
             "stage1": cfg.num_stage1}
    return TaskSplits(**{
        split: [_problem(c, i, split, split != "unlabeled") for i, c in enumerate(_unique_chains(rng, cfg, size, taken))]
        for split, size in sizes.items()
    })


def sft_corpus(cfg: TaskConfig, count: int, seed: int) -> list[tuple[str, str]]:
    """(question, worked solution) pairs for the base model, disjoint from every split."""
    splits = make_splits(cfg)
    taken = {p.prompt for p in splits.labeled + splits.unlabeled + splits.heldout + splits.stage1}
    rng = random.Random(f"sft-{seed}")
    return [(c.question, c.solution()) for c in _unique_chains(rng, cfg, count, taken)]
