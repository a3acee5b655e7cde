"""The TEMPO EM loop (TEMPO, arXiv 2604.19295): alternate critic recalibration and policy refinement.

One step:
  1. sample prompts: labeled ones from D_L, unlabeled ones from D_U (the method decides; a
     fixed count from each, or one flagged stream: `train.mixing`);
  2. roll out n responses each; verify the labeled ones against their answers; drop
     labeled groups whose rewards all agree, rolling out more prompts (up to a cap);
  3. score with the current models: old log-probs and the critic's values (before the
     critic is updated in this step);
  4. rewards: verified on labeled rows; on unlabeled rows the method's pseudo-reward
     (TEMPO: the critic's last-token value; TTRL: in a most-voted answer cluster; EMPO: cluster size);
  5. advantages: em_token (R_T − V_t, whitened) or group-normalised (GRPO);
  6. E-step: regress the critic on the labeled rows toward R ∈ {+1, −1} (when due);
  7. M-step: GSPO/PPO policy update over mini-batches.
TTRL, EMPO and RLVR are this loop with other parts (tempo.methods).
"""
from __future__ import annotations

import logging
import random

import torch

from tempo import algorithm, rewards
from tempo.build import Models
from tempo.collect import Batch, Collector
from tempo.config import Config
from tempo.data import Problem
from tempo.errors import ConfigError, NonFiniteError
from tempo.evaluate import evaluate
from tempo.methods import METHODS, Method
from tempo.metrics import brier
from tempo.models.base import TokenBatch, TrainableLM
from tempo.profiling import phase
from tempo.step_metrics import step_metrics
from tempo.task import TaskSplits

log = logging.getLogger("tempo")


def seed_everything(seed: int) -> None:
    """The global RNGs that sampling draws from (the trainer's own are seeded in it)."""
    random.seed(seed)
    torch.manual_seed(seed)


def check_data(method: Method, labeled: list[Problem], unlabeled: list[Problem]) -> None:
    if method.unlabeled is not None and not unlabeled:
        raise ConfigError("data: D_U is empty but the method trains on unlabeled prompts")
    if method.labeled_prompts and not labeled:
        raise ConfigError("data: D_L is empty but the method recalibrates the critic or trains on labeled prompts")
    if any(p.answer is None for p in labeled):
        raise ConfigError("data: every labeled problem needs an answer")


class EMTrainer:
    """The EM loop of `cfg.algorithm.method` on built models and data splits."""

    def __init__(self, cfg: Config, models: Models, splits: TaskSplits):
        method = METHODS[cfg.algorithm.method]
        check_data(method, splits.labeled, splits.unlabeled)
        self.cfg, self.method, self.models, self.splits = cfg, method, models, splits
        self.policy: TrainableLM = models.policy
        self.critic: TrainableLM | None = models.critic
        self.prompt_rng = random.Random(cfg.train.seed)
        self.collector = Collector(cfg, method, models, splits, self.prompt_rng)
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self.recalibrations = 0
        self.schedule_state: dict = {}  # what the method's recalibration schedule remembers
        self.bad_updates = {"critic": 0, "policy": 0}  # skipped for non-finite values, in a row

    def state_dict(self) -> dict:
        """Everything besides the models that the next steps depend on: an exact resume needs
        it all (sampling draws from torch's global RNG)."""
        return {"step": self.step, "recalibrations": self.recalibrations, "schedule_state": dict(self.schedule_state),
                "bad_updates": dict(self.bad_updates), "prompt_rng": self.prompt_rng.getstate(),
                **self.collector.state_dict(), "shuffle_rng": self.shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.recalibrations = state["step"], state["recalibrations"]
        self.schedule_state, self.bad_updates = dict(state["schedule_state"]), dict(state["bad_updates"])
        self.prompt_rng.setstate(state["prompt_rng"])
        self.collector.load_state_dict(state)
        self.shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    # -- one EM step --------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One EM step, in the order of the module docstring."""
        self.step += 1
        batch, stats = self.collector.collect()  # 1, 2
        if batch is None:  # every group was filtered out: nothing to learn from this step
            return stats | {"skipped_step": 1.0}
        tokens = batch.rollouts.token_batch()
        scored, values = self.score(batch, tokens)  # 3
        if values is not None and not torch.isfinite(values * tokens.response_mask).all():
            self._account("critic", True)  # rewards would be non-finite: neither model learns
            return stats | {"skipped_step": 1.0, "nonfinite_values": 1.0}
        with phase("advantages"):
            reward, pseudo = self.rewards(batch, values)  # 4
            advantages, agreement = self.advantages(batch, tokens, reward, values, scored)  # 5
        stats |= self.recalibrate(batch, tokens, values, reward)  # 6: the E-step, when due
        tokens.extras = {"advantages": advantages} | ({} if scored is None else {"old_logp": scored["logp"]})
        stats |= self.m_step(tokens)  # 7: the M-step
        with phase("weight sync"):
            self.models.engine.sync_weights(self.policy.export_weights())
        return step_metrics(self.method, batch, tokens.response_mask, reward, pseudo, scored, stats | agreement)

    def score(self, batch: Batch, tokens: TokenBatch) -> tuple[dict | None, torch.Tensor | None]:
        """The old policy's log-probs and the critic's values, before either model moves.
        Fully on-policy (one mini-batch, one epoch) the M-step's own forward gives the old
        log-probs: no scoring pass, unless the engine's log-probs are to be checked against them."""
        t = self.cfg.train
        on_policy = t.mini_batches == 1 and t.update_epochs == 1
        with phase("old log-probs"):
            needed = not on_policy or batch.rollouts.logprobs is not None
            scored = self.policy.infer(tokens, t.micro_batch_size) if needed else None
        with phase("values"):
            values = self.critic.infer(tokens, t.micro_batch_size)["values"] if self.method.uses_critic else None
        return scored, values

    def advantages(self, batch: Batch, tokens: TokenBatch, reward: torch.Tensor, values: torch.Tensor | None,
                   scored: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's advantages; with an engine that reports its sampling log-probs, how far
        they are from the trainer's, and (`algorithm.tis_cap`) truncated importance weights."""
        advantages = self.method.advantage.compute(reward, values, tokens.response_mask, batch.n,
                                                   self.cfg.model.kernels)
        engine_logp = batch.rollouts.logprobs
        if engine_logp is None:
            return advantages, {}
        agreement = algorithm.engine_agreement(scored["logp"], engine_logp, tokens.response_mask)
        if self.cfg.algorithm.tis_cap > 0:
            advantages = advantages * algorithm.tis_weights(scored["logp"], engine_logp, self.cfg.algorithm.tis_cap)
        return advantages, agreement

    def recalibrate(self, batch: Batch, tokens: TokenBatch, values: torch.Tensor | None,
                    reward: torch.Tensor) -> dict[str, float]:
        """6: the critic's Brier score on this step's labeled rows, and the E-step on them when
        the method's schedule says it is due."""
        labeled, stats = batch.labeled_rows, {}
        if self.method.uses_critic and labeled.any():
            last = rewards.last_token(values, tokens.response_mask)
            stats["critic_brier_labeled_batch"] = brier(last[labeled], batch.correct[labeled].float())
            if self.e_step_due(stats["critic_brier_labeled_batch"]):
                tokens.extras = {"old_values": values, "returns": reward}
                stats |= self.e_step(tokens, labeled)
                self.recalibrations += 1
        return stats | {"recalibrations": float(self.recalibrations)}

    def _account(self, model: str, skipped: bool) -> None:
        """Count updates skipped for a non-finite loss, gradient norm or critic value, in a row."""
        self.bad_updates[model] = self.bad_updates[model] + 1 if skipped else 0

    def check_health(self) -> None:
        """Stop the run once `train.max_bad_steps` steps in a row skipped a model's update."""
        limit = self.cfg.train.max_bad_steps
        for model, which in (("critic", "E-step (critic)"), ("policy", "M-step (policy)")):
            if limit and self.bad_updates[model] >= limit:
                raise NonFiniteError(
                    f"{which}: {self.bad_updates[model]} steps in a row up to step {self.step} had a non-finite "
                    f"loss, gradient norm or critic value and were skipped; stopping (train.max_bad_steps="
                    f"{limit}). The newest checkpoint holds the last good state.")

    def rewards(self, batch: Batch, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Terminal reward per row: verified on labeled rows, the pseudo-reward elsewhere.

        Returns (reward, pseudo); `pseudo` is the unlabeled reward source on every row.
        """
        labeled, source = batch.labeled_rows, self.method.unlabeled
        if source is not None and source.self_score is None:
            pseudo = rewards.last_token(values, batch.rollouts.response_mask)
        else:
            pseudo = batch.self_reward
        verified = torch.where(batch.correct, 1.0, self.method.advantage.wrong)
        return torch.where(labeled, verified, pseudo), pseudo

    def e_step_due(self, batch_brier: float) -> bool:
        if self.critic is None:
            return False
        a = self.cfg.algorithm
        return self.method.recalibrate(self.step, batch_brier, self.schedule_state, a.recalibrate_every,
                                       a.adaptive_brier)

    def e_step(self, tokens: TokenBatch, labeled: torch.Tensor) -> dict[str, float]:
        """Critic recalibration: value regression on the labeled rows toward R ∈ {+1, −1}
        (`algorithm.e_step_rows` says how they are batched)."""
        clip, agg = self.cfg.algorithm.cliprange_value, self.cfg.algorithm.loss_agg
        masked = self.cfg.algorithm.e_step_rows == "masked"
        if masked:
            tokens.extras["labeled"] = labeled
        else:
            tokens = tokens.select(labeled.nonzero().squeeze(-1))

        def loss_fn(out, mb):
            keep = mb.extras["labeled"] if masked else slice(None)
            if masked and not keep.any():  # its weight is its rows' share, its loss nothing
                return out["values"].sum() * 0.0, {"value_loss": 0.0, "vf_clipfrac": 0.0}
            loss, stats = algorithm.value_loss(out["values"][keep], mb.extras["old_values"][keep],
                                               mb.extras["returns"][keep], mb.response_mask[keep], clip, agg)
            return loss * mb.extras["share"].sum(), {"value_loss": loss.item(), **stats}

        with phase("E-step"):
            stats = self._optimise(self.critic, tokens, loss_fn, None if masked else agg)
        self._account("critic", stats["nonfinite"] > 0)
        return {f"critic/{k}": v for k, v in stats.items()}

    def m_step(self, tokens: TokenBatch) -> dict[str, float]:
        """Policy refinement: GSPO (or PPO) over mini-batches."""
        a = self.cfg.algorithm

        def loss_fn(out, mb):
            old_logp = mb.extras.get("old_logp", out["logp"].detach())  # absent: on-policy
            loss, stats = algorithm.policy_loss(out["logp"], old_logp, mb.extras["advantages"],
                                                mb.response_mask, kind=a.policy_loss, clip_low=a.clip_low,
                                                clip_high=a.clip_high, agg=a.loss_agg, kernels=self.cfg.model.kernels)
            if "old_logp" not in mb.extras:  # the step's entropy, as sums (their ratio survives averaging)
                stats |= {"entropy_sum": (out["entropy"].detach() * mb.response_mask).sum(),
                          "tokens": mb.response_mask.sum()}
            return loss * mb.extras["share"].sum(), {"pg_loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

        with phase("M-step"):
            stats = self._optimise(self.policy, tokens, loss_fn, a.loss_agg)
        self._account("policy", stats["nonfinite"] > 0)
        return {f"actor/{k}": v for k, v in stats.items()}

    def _optimise(self, model: TrainableLM, tokens: TokenBatch, loss_fn, agg: str | None) -> dict[str, float]:
        """`train.update_epochs` passes, each one optimiser step per mini-batch (shuffled, or
        contiguous: `train.shuffle_minibatches`). Each row carries its `share` of the mini-batch
        loss (its tokens' share for token means, 1/rows for sequence means or an `agg` of None),
        so micro-batch losses add up to the mini-batch loss."""
        t = self.cfg.train
        size = -(-len(tokens) // min(t.mini_batches, len(tokens)))  # `mini_batches` near-equal parts
        minis = list(self.mini_batches(tokens, t.update_epochs, size, agg, t.shuffle_minibatches))
        totals: dict[str, float] = {}
        for mini in minis:
            out = model.train_step(mini.split(t.micro_batch_size), loss_fn)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v / len(minis)
        return totals

    def mini_batches(self, tokens: TokenBatch, epochs: int, size: int, agg: str | None, shuffle: bool = True):
        """`epochs` passes over `tokens` (shuffled, or in order) in mini-batches of `size` rows,
        each row carrying its loss share."""
        for _ in range(epochs):
            order = torch.randperm(len(tokens), generator=self.shuffle) if shuffle else torch.arange(len(tokens))
            for rows in order.split(size):
                # In row order, a group's samples share micro-batches (and their prompt's forward).
                mini = tokens.select(rows.sort().values)
                mini.extras["share"] = (algorithm.loss_shares(mini.response_mask, agg) if agg
                                        else torch.full((len(mini),), 1.0 / len(mini)))
                yield mini

    # -- evaluation --------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluation samples from a fork of torch's generator, reseeded with train.seed at every
        evaluation: it leaves training's draws alone (eval.every does not change the
        trajectory), and the steps and methods of a seed are scored on the same sampling noise."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.train.seed)
            return evaluate(self.models, self.splits.unlabeled, self.splits.heldout, self.cfg)
