"""The TEMPO EM loop (TEMPO, arXiv 2604.19295): alternate critic recalibration and policy refinement.

One step:
  1. sample prompts: labeled ones from D_L, unlabeled ones from D_U (the method decides);
  2. roll out n responses each; verify the labeled ones against their answers; drop
     labeled groups whose rewards all agree, rolling out more labeled prompts (up to a cap);
  3. score with the current models: old log-probs and the critic's values (before the
     critic is updated in this step);
  4. rewards: verified on labeled rows; on unlabeled rows the method's pseudo-reward
     (TEMPO: the critic's last-token value; TTRL: majority agreement; EMPO: cluster size);
  5. advantages: em_token (R_T − V_t, whitened) or group-normalised (GRPO);
  6. E-step: regress the critic on the labeled rows toward R ∈ {+1, −1} (when due);
  7. M-step: GSPO/PPO policy update over mini-batches.
TTRL, EMPO and RLVR are this loop with other parts (tempo.methods).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tempo import algorithm, rewards
from tempo.build import Models
from tempo.config import Config
from tempo.data import Problem
from tempo.errors import ConfigError, NonFiniteError
from tempo.grading import Grade
from tempo.methods import Method
from tempo.metrics import auroc, brier
from tempo.models.base import TokenBatch, TrainableLM
from tempo.rollout.base import Rollouts
from tempo.task import TaskSplits

@dataclass
class Batch:
    """Rolled-out groups of one step, n rows per prompt."""

    problems: list[Problem]
    rollouts: Rollouts
    grades: list[Grade]  # unlabeled rows are graded only to monitor drift, never to train
    self_reward: torch.Tensor  # [rows] TTRL/EMPO pseudo-reward of unlabeled rows, else 0
    n: int

    @property
    def correct(self) -> torch.Tensor:
        return torch.tensor([g.correct for g in self.grades])

    @property
    def labeled_rows(self) -> torch.Tensor:
        return torch.tensor([p.is_labeled for p in self.problems]).repeat_interleave(self.n)


class Cycler:
    """Draws prompts without replacement, reshuffling (seeded) at the end of each pass."""

    def __init__(self, items: list[Problem], rng: random.Random):
        self.items, self.rng, self.order = items, rng, []

    def take(self, k: int) -> list[Problem]:
        out = []
        while len(out) < k and self.items:
            if not self.order:
                self.order = self.rng.sample(range(len(self.items)), len(self.items))
            out.append(self.items[self.order.pop()])
        return out


def loss_shares(mask: torch.Tensor, token_mean: bool) -> torch.Tensor:
    """Each row's share of its mini-batch loss: its tokens' share under a token mean, 1/rows
    under a sequence mean. Micro-batch losses weighted by their rows' shares sum to the
    mini-batch loss."""
    if token_mean:
        return mask.sum(-1) / mask.sum().clamp(min=1)
    return torch.full((len(mask),), 1.0 / len(mask))


def check_data(method: Method, labeled: list[Problem], unlabeled: list[Problem]) -> None:
    if method.unlabeled_reward != "none" and not unlabeled:
        raise ConfigError("data: D_U is empty but the method trains on unlabeled prompts")
    if (method.recalibration != "never" or method.labeled_in_m_step) and not labeled:
        raise ConfigError("data: D_L is empty but the method recalibrates the critic or trains on labeled prompts")
    if any(p.answer is None for p in labeled):
        raise ConfigError("data: every labeled problem needs an answer")


class EMTrainer:
    def __init__(self, cfg: Config, method: Method, models: Models, splits: TaskSplits):
        check_data(method, splits.labeled, splits.unlabeled)
        self.cfg, self.method, self.models, self.splits = cfg, method, models, splits
        self.policy: TrainableLM = models.policy
        self.critic: TrainableLM | None = models.critic
        self.prompt_rng = random.Random(cfg.train.seed)
        self.labeled = Cycler(splits.labeled, self.prompt_rng)
        self.unlabeled = Cycler(splits.unlabeled, self.prompt_rng)
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self.recalibrations = 0
        self.brier_reference: float | None = None  # adaptive recalibration's yardstick
        self.bad_updates = {"critic": 0, "policy": 0}  # skipped for non-finite values, in a row

    def state_dict(self) -> dict:
        """Everything besides the models that the next steps depend on: an exact resume needs
        it all (sampling draws from torch's global RNG)."""
        return {"step": self.step, "recalibrations": self.recalibrations, "brier_reference": self.brier_reference,
                "bad_updates": dict(self.bad_updates), "prompt_rng": self.prompt_rng.getstate(),
                "labeled_order": list(self.labeled.order), "unlabeled_order": list(self.unlabeled.order),
                "shuffle_rng": self.shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.recalibrations = state["step"], state["recalibrations"]
        self.brier_reference, self.bad_updates = state["brier_reference"], dict(state["bad_updates"])
        self.prompt_rng.setstate(state["prompt_rng"])
        self.labeled.order, self.unlabeled.order = list(state["labeled_order"]), list(state["unlabeled_order"])
        self.shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    # -- 1, 2: rollouts ----------------------------------------------------------------

    def _roll(self, problems: list[Problem], n: int) -> tuple[Rollouts, list[Grade]]:
        texts = self.models.prompt_texts(problems, self.cfg.data.template)
        rollouts = self.models.engine.generate(texts, n)
        return rollouts, rewards.score(rollouts.texts, [p.answer for p in problems], n)

    def _labeled_groups(self, want: int, stats: dict[str, float]) -> list[Batch]:
        """Labeled groups with a signal, rolling out more prompts until `want` survive (capped)."""
        n, a = self.cfg.rollout.n, self.cfg.algorithm
        parts, kept, right, rolled = [], 0, 0, 0
        while kept < want and stats["gen_batches"] < a.max_gen_batches:
            problems = self.labeled.take(want - kept)
            rollouts, grades = self._roll(problems, n)
            stats["gen_batches"] += 1
            right += sum(g.correct for g in grades)
            rolled += len(grades)
            keep = [i for i in range(len(problems))
                    if not a.filter_groups or rewards.group_varies(grades[i * n:(i + 1) * n])]
            stats["dropped_groups"] += len(problems) - len(keep)
            rows = torch.tensor([i * n + j for i in keep for j in range(n)], dtype=torch.long)
            parts.append(Batch([problems[i] for i in keep], rollouts.select(rows),
                               [grades[r] for r in rows.tolist()], torch.zeros(len(rows)), n))
            kept += len(keep)
        if rolled:  # accuracy over every labeled rollout, before groups without signal were dropped
            stats["labeled_acc"] = right / rolled
        return parts

    def _unlabeled_groups(self, want: int) -> Batch:
        """D_U prompts; for TTRL, `vote_samples` responses vote and the first n are trained on."""
        n, kind = self.cfg.rollout.n, self.method.unlabeled_reward
        votes = max(n, self.cfg.algorithm.vote_samples) if kind == "majority" else n
        problems = self.unlabeled.take(want)
        rollouts, grades = self._roll(problems, votes)
        if kind == "majority":
            self_reward = rewards.majority_reward(grades, votes)
        elif kind == "cluster":
            self_reward = rewards.cluster_reward(grades, votes)
        else:
            self_reward = torch.zeros(len(grades))
        rows = torch.tensor([i * votes + j for i in range(len(problems)) for j in range(n)], dtype=torch.long)
        return Batch(problems, rollouts.select(rows), [grades[r] for r in rows.tolist()],
                     self_reward[rows], n)

    def collect(self) -> tuple[Batch | None, dict[str, float]]:
        cfg, m = self.cfg, self.method
        # RLVR draws the same labeled prompts a step as TEMPO and nothing else: the control for
        # "does the critic's reward on D_U help?"
        labeled_needed = m.labeled_in_m_step or m.recalibration != "never"
        want_labeled = cfg.train.labeled_per_step if labeled_needed else 0
        want_unlabeled = 0 if m.unlabeled_reward == "none" else cfg.train.prompts_per_step - want_labeled
        stats = {"gen_batches": 0.0, "dropped_groups": 0.0}
        parts = self._labeled_groups(want_labeled, stats)
        if want_unlabeled:
            parts.append(self._unlabeled_groups(want_unlabeled))
        parts = [p for p in parts if p.problems]
        if not parts:  # every group was filtered out: nothing to learn from this step
            return None, stats
        batch = Batch([q for p in parts for q in p.problems],
                      Rollouts.concat([p.rollouts for p in parts], self.models.tokenizer.pad_token_id),
                      [g for p in parts for g in p.grades], torch.cat([p.self_reward for p in parts]),
                      cfg.rollout.n)
        return batch, stats

    # -- 3-7: one EM step --------------------------------------------------------------

    def train_step(self, update_policy: bool = True) -> dict[str, float]:
        self.step += 1
        cfg, m = self.cfg, self.method
        batch, stats = self.collect()
        stats["skipped_step"] = float(batch is None)
        if batch is None:
            return stats
        tokens = batch.rollouts.token_batch()
        mask = tokens.response_mask
        labeled = batch.labeled_rows
        mb_size = cfg.train.micro_batch_size

        scored = self.policy.infer(tokens, mb_size)
        old_logp = scored["logp"]
        values = self.critic.infer(tokens, mb_size)["values"] if m.uses_critic else None
        if values is not None and not torch.isfinite(values * mask).all():
            # Rewards and advantages would be non-finite: neither model learns from this step.
            self._account("critic", True)
            stats.update({"skipped_step": 1.0, "nonfinite_values": 1.0})
            return stats

        reward, pseudo = self.rewards(batch, values)
        threshold = 0.0 if m.unlabeled_reward == "critic" else 0.5
        stats.update(rewards.drift_stats(pseudo, threshold, batch.grades, ~labeled, batch.n))
        if m.advantage == "em_token":
            advantages = algorithm.em_token_advantage(reward, values, mask)
        else:
            advantages = algorithm.grpo_advantage(reward, batch.n, mask)

        if m.uses_critic and labeled.any():
            last = rewards.last_token(values, mask)
            batch_brier = brier(last[labeled], batch.correct[labeled].float())
            stats["critic_brier_labeled_batch"] = batch_brier
            if self.e_step_due(batch_brier):
                tokens.extras = {"old_values": values, "returns": reward}
                stats.update(self.e_step(tokens.select(labeled.nonzero().squeeze(-1))))
                self._account("critic", stats["critic/nonfinite"] > 0)
                self.recalibrations += 1
        stats["recalibrations"] = float(self.recalibrations)

        if update_policy:
            tokens.extras = {"old_logp": old_logp, "advantages": advantages}
            stats.update(self.m_step(tokens))
            self._account("policy", stats["actor/nonfinite"] > 0)
            self.models.engine.sync_weights(self.policy.export_weights())

        valid = mask.sum()
        stats.update({
            "reward_mean": float(reward.mean()),
            "response_len": float(valid / len(mask)),
            "entropy": float((scored["entropy"] * mask).sum() / valid),
            "no_answer_frac": float(sum(s.extracted is None for s in batch.grades) / len(batch.grades)),
        })
        return stats

    def _account(self, model: str, skipped: bool) -> None:
        """Count updates skipped for a non-finite loss, gradient norm or critic value, in a row."""
        self.bad_updates[model] = self.bad_updates[model] + 1 if skipped else 0

    def check_health(self) -> None:
        """Stop the run once `train.max_bad_steps` steps in a row skipped a model's update."""
        limit = self.cfg.train.max_bad_steps
        for model, phase in (("critic", "E-step (critic)"), ("policy", "M-step (policy)")):
            if limit and self.bad_updates[model] >= limit:
                raise NonFiniteError(
                    f"{phase}: {self.bad_updates[model]} steps in a row up to step {self.step} had a non-finite "
                    f"loss, gradient norm or critic value and were skipped; stopping (train.max_bad_steps="
                    f"{limit}). The newest checkpoint holds the last good state.")

    def rewards(self, batch: Batch, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Terminal reward per row: verified on labeled rows, the pseudo-reward elsewhere.

        Returns (reward, pseudo); `pseudo` is the unlabeled reward source on every row.
        """
        labeled = batch.labeled_rows
        if self.method.unlabeled_reward == "critic":
            pseudo = rewards.last_token(values, batch.rollouts.response_mask)
        else:
            pseudo = batch.self_reward
        # em_token regresses toward R ∈ {+1, −1}; TTRL and EMPO define 0/1 scores.
        wrong = -1.0 if self.method.advantage == "em_token" else 0.0
        verified = torch.where(batch.correct, 1.0, wrong)
        return torch.where(labeled, verified, pseudo), pseudo

    def e_step_due(self, batch_brier: float) -> bool:
        rule = self.method.recalibration
        if rule == "never" or self.critic is None:
            return False
        if rule == "adaptive":
            if self.brier_reference is None:
                self.brier_reference = batch_brier
                return False
            return batch_brier > self.brier_reference + self.cfg.algorithm.adaptive_brier
        period = self.cfg.algorithm.recalibrate_every
        return period > 0 and self.step % period == 0

    def e_step(self, tokens: TokenBatch) -> dict[str, float]:
        """Critic recalibration: value regression on the labeled rows toward R ∈ {+1, −1}."""
        clip, agg = self.cfg.algorithm.cliprange_value, self.cfg.algorithm.loss_agg

        def loss_fn(out, mb):
            loss, stats = algorithm.value_loss(out["values"], mb.extras["old_values"], mb.extras["returns"],
                                               mb.response_mask, clip, agg)
            return loss * mb.extras["share"].sum(), {"value_loss": loss.item(), **stats}

        stats = self._optimise(self.critic, tokens, loss_fn, token_mean=agg == "token-mean")
        return {f"critic/{k}": v for k, v in stats.items()}

    def m_step(self, tokens: TokenBatch) -> dict[str, float]:
        """Policy refinement: GSPO (or PPO) over shuffled mini-batches."""
        a = self.cfg.algorithm

        def loss_fn(out, mb):
            loss, stats = algorithm.policy_loss(out["logp"], mb.extras["old_logp"], mb.extras["advantages"],
                                                mb.response_mask, kind=a.policy_loss, clip_low=a.clip_low,
                                                clip_high=a.clip_high, agg=a.loss_agg)
            return loss * mb.extras["share"].sum(), {"pg_loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

        stats = self._optimise(self.policy, tokens, loss_fn, token_mean=a.loss_agg == "token-mean")
        return {f"actor/{k}": v for k, v in stats.items()}

    def _optimise(self, model: TrainableLM, tokens: TokenBatch, loss_fn, token_mean: bool) -> dict[str, float]:
        """`train.update_epochs` passes, each one optimiser step per shuffled mini-batch. Each row
        carries its `share` of the mini-batch loss (its tokens' share for token means, 1/rows
        for sequence means), so micro-batch losses add up to the mini-batch loss."""
        t = self.cfg.train
        size = -(-len(tokens) // min(t.mini_batches, len(tokens)))  # `mini_batches` near-equal parts
        minis = list(self._mini_batches(tokens, t.update_epochs, size, token_mean))
        totals: dict[str, float] = {}
        for mini in minis:
            out = model.train_step(mini.split(t.micro_batch_size), loss_fn)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v / len(minis)
        return totals

    def _mini_batches(self, tokens: TokenBatch, epochs: int, size: int, token_mean: bool):
        """`epochs` shuffled passes over `tokens` in mini-batches of `size` rows, each row
        carrying its loss share."""
        for _ in range(epochs):
            for rows in torch.randperm(len(tokens), generator=self.shuffle).split(size):
                mini = tokens.select(rows)
                mini.extras["share"] = loss_shares(mini.response_mask, token_mean)
                yield mini

    def fit_critic(self, problems: list[Problem], epochs: int, batch_rows: int) -> dict[str, float]:
        """Stage 1's critic training: roll out `problems` once, then regress the critic's values
        toward the verified outcome R ∈ {+1, −1} for `epochs` passes (no clip: no old critic to
        stay near). Rolling out once and reusing the rows is what makes it cheap."""
        rollouts, grades = self._roll(problems, self.cfg.rollout.n)
        tokens = rollouts.token_batch()
        returns = torch.tensor([1.0 if g.correct else -1.0 for g in grades])
        tokens.extras = {"old_values": torch.zeros_like(tokens.response_mask), "returns": returns}
        agg = self.cfg.algorithm.loss_agg

        def loss_fn(out, mb):
            loss, _ = algorithm.value_loss(out["values"], mb.extras["old_values"], mb.extras["returns"],
                                           mb.response_mask, float("inf"), agg)
            return loss * mb.extras["share"].sum(), {"value_loss": loss.item()}

        losses = [self.critic.train_step(mini.split(self.cfg.train.micro_batch_size), loss_fn)["value_loss"]
                  for mini in self._mini_batches(tokens, epochs, batch_rows, agg == "token-mean")]
        return {"rows": float(len(tokens)), "accuracy": float(returns.gt(0).float().mean()),
                "value_loss_first": losses[0] if losses else float("nan"),
                "value_loss_last": losses[-1] if losses else float("nan")}

    # -- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """D_U with its hidden answers, and the critic's calibration on the held-out slice."""
        cfg = self.cfg
        k = cfg.eval.k
        problems = self.splits.unlabeled[: cfg.eval.max_prompts or None]
        rollouts, scored = self._roll(problems, k)
        out = rewards.group_metrics(scored, k, cfg.eval.pass_k)
        out["no_answer_frac"] = sum(s.extracted is None for s in scored) / len(scored)
        if self.critic is not None:
            out.update(self.calibration(rollouts, scored, "unlabeled"))
            if self.splits.heldout:
                held_rollouts, held_scored = self._roll(self.splits.heldout, k)
                out.update(self.calibration(held_rollouts, held_scored, "heldout"))
        return out

    def calibration(self, rollouts: Rollouts, scored: list[Grade], name: str) -> dict[str, float]:
        tokens = rollouts.token_batch()
        values = self.critic.infer(tokens, self.cfg.train.micro_batch_size)["values"]
        last = rewards.last_token(values, tokens.response_mask)
        truth = torch.tensor([s.correct for s in scored], dtype=torch.float)
        return {f"critic_auroc_{name}": auroc(last, truth), f"critic_brier_{name}": brier(last, truth)}
