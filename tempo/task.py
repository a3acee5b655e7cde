"""The embedded task: chains of modular arithmetic evaluated left to right.

A question `4+9*3-2 mod 7` is solved in written steps, one operation a line, and the
final value boxed:

    4+9=6;6*3=4;4-2=2;\\boxed{2}

Grading looks at the final answer only, like every math grader. With a prime modulus and no
multiplication by 0, every step is a bijection, so one slip always changes the final answer
(only two slips can cancel): right answers come from right work, not luck.

The base model learns from an imperfect teacher, as real models learn from imperfect data:
it slips now and then (a random wrong result: majority voting over samples undoes that) and
holds misconceptions, facts `a op b` it believes wrong more often than right (voting
entrenches those; a verifier trained on labeled outcomes can learn them). Imitating such a
teacher is a loss minimum SFT reaches reliably, so the base model's accuracy does not hang
on where an SFT run stops on a grokking curve.
Deterministic from a seed; the knobs are the modulus, the chain length and the teacher's.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
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
            new = apply(op, value, v, self.modulus)
            out.append((value, op, v, new))
            value = new
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def solution(self, teacher: "Teacher | None" = None, rng: random.Random | None = None) -> str:
        """A worked solution: the right one, or the one an imperfect teacher writes (a wrong
        step carries forward to the boxed answer, as it would for a student)."""
        value, lines = self.start, ""
        for op, b in self.ops:
            new = apply(op, value, b, self.modulus)
            if teacher is not None:
                new = teacher.write(value, op, b, new, rng)
            lines += f"{value}{op}{b}={new};"
            value = new
        return f"{lines}\\boxed{{{value}}}"


def apply(op: str, a: int, b: int, modulus: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op] % modulus


class Teacher:
    """Writes each step's result: its wrong belief about the fact (with probability
    `task.belief`, for the `task.misconceptions` share of facts), else a slip (`task.slip`),
    else the right value. Which facts it misbelieves is fixed by the task's seed."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        rng, m = random.Random(f"teacher-{cfg.seed}"), cfg.modulus
        self.wrong_beliefs: dict[tuple[int, str, int], int] = {}
        for a in range(m):
            for op in OPS:
                for b in range(1 if op == "*" else 0, m):
                    if rng.random() < cfg.misconceptions:
                        right = apply(op, a, b, m)
                        self.wrong_beliefs[(a, op, b)] = rng.choice([v for v in range(m) if v != right])

    def distribution(self, a: int, op: str, b: int) -> list[float]:
        """P(the teacher writes v) for v in 0..modulus-1, the law `write` samples from."""
        m, right = self.cfg.modulus, apply(op, a, b, self.cfg.modulus)
        slip = [self.cfg.slip / (m - 1) if v != right else 1.0 - self.cfg.slip for v in range(m)]
        belief = self.wrong_beliefs.get((a, op, b))
        if belief is None:
            return slip
        held = self.cfg.belief
        return [(1.0 - held) * p + (held if v == belief else 0.0) for v, p in enumerate(slip)]

    def write(self, a: int, op: str, b: int, right: int, rng: random.Random) -> int:
        belief = self.wrong_beliefs.get((a, op, b))
        if belief is not None and rng.random() < self.cfg.belief:
            return belief
        if rng.random() < self.cfg.slip:
            return rng.choice([v for v in range(self.cfg.modulus) if v != right])
        return right


def random_chain(rng: random.Random, cfg: TaskConfig) -> Chain:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    # No "*0": it erases the chain, so a wrong chain would still land on the right answer.
    ops = tuple((op, rng.randrange(1 if op == "*" else 0, cfg.modulus))
                for op in (rng.choice(cfg.ops) for _ in range(n_ops)))
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


def stage1_task(cfg: TaskConfig) -> TaskConfig:
    """The task as stage 1 sees it: chains of at most `task.stage1_max_ops` operations, drawn
    from `task.stage1_ops`."""
    return dataclasses.replace(cfg, max_ops=cfg.stage1_max_ops or cfg.max_ops, ops=cfg.stage1_ops or cfg.ops)


def make_splits(cfg: TaskConfig) -> TaskSplits:
    """D_L, D_U, the held-out slice and stage 1's data: disjoint questions, fixed by cfg.seed.
    Stage 1's are drawn last, so its size and chain lengths leave the other three unchanged."""
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    sizes = {"labeled": cfg.num_labeled, "unlabeled": cfg.num_unlabeled, "heldout": cfg.num_heldout,
             "stage1": cfg.num_stage1}
    splits = TaskSplits(**{
        split: [_problem(c, i, split, split != "unlabeled")
                for i, c in enumerate(_unique_chains(rng, stage1_task(cfg) if split == "stage1" else cfg, size, taken))]
        for split, size in sizes.items()
    })
    # D_L's own questions are drawn even when stage 1's replace them, so that D_U stays the same.
    return dataclasses.replace(splits, labeled=splits.stage1) if cfg.labeled_is_stage1 else splits


STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+);")


def teacher_floor(cfg: TaskConfig, corpus: list[tuple[str, str]], tokens_of) -> float:
    """The lowest expected next-token loss on these teacher solutions (nats a token;
    `tokens_of(solution)` counts a solution's tokens, EOS included): a model that knew the teacher exactly pays the entropy of each step's result
    given the step, and nothing for the other tokens, which the question and the steps
    before fix. The SFT of the base policy is done when its held-out loss is near this."""
    teacher, nats, tokens = Teacher(cfg), 0.0, 0
    for _, solution in corpus:
        tokens += tokens_of(solution)
        for a, op, b, _ in STEP.findall(solution):
            nats -= sum(p * math.log(p) for p in teacher.distribution(int(a), op, int(b)) if p > 0)
    return nats / tokens


def sft_corpus(cfg: TaskConfig, count: int, seed: int, teacher: bool = True) -> list[tuple[str, str]]:
    """(question, worked solution) pairs, disjoint from D_L, D_U and the held-out slice: the
    imperfect teacher's solutions for the base policy, right ones (`teacher=False`) for the
    verifier, which is stage 1's and so sees its chains (`stage1_task`). Stage 1's pool is
    training data too and may share a few questions; leaving it out of the exclusion keeps the
    base model the same whatever the pool's size."""
    splits = make_splits(dataclasses.replace(cfg, num_stage1=0, labeled_is_stage1=False))
    taken = {p.prompt for p in splits.labeled + splits.unlabeled + splits.heldout}
    rng = random.Random(f"sft-{seed}" if teacher else f"verifier-{seed}")
    writer = Teacher(cfg) if teacher else None
    chains = _unique_chains(rng, cfg if teacher else stage1_task(cfg), count, taken)
    return [(c.question, c.solution(writer, rng)) for c in chains]
