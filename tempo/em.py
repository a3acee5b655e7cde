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
import time
from dataclasses import dataclass

import torch

from tempo import algorithm, rewards
from tempo.build import Models
from tempo.config import Config, Stage1Config
from tempo.data import Problem
from tempo.errors import ConfigError, NonFiniteError, RefillError
from tempo.evaluate import evaluate, roll
from tempo.grading import Grade
from tempo.methods import METHODS, Method
from tempo.metrics import auroc, brier
from tempo.models.base import TokenBatch, TrainableLM
from tempo.profiling import phase
from tempo.rollout.base import Rollouts
from tempo.task import TaskSplits

log = logging.getLogger("tempo")


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
        self.labeled = Cycler(splits.labeled, self.prompt_rng)
        self.unlabeled = Cycler(splits.unlabeled, self.prompt_rng)
        # train.mixing=flagged: one stream of the prompts the method trains on, each flagged
        self.stream = Cycler((splits.labeled if method.labeled_prompts else []) +
                             (splits.unlabeled if method.unlabeled is not None else []), self.prompt_rng)
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
                "labeled_order": list(self.labeled.order), "unlabeled_order": list(self.unlabeled.order),
                "stream_order": list(self.stream.order),
                "shuffle_rng": self.shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.recalibrations = state["step"], state["recalibrations"]
        self.schedule_state, self.bad_updates = dict(state["schedule_state"]), dict(state["bad_updates"])
        self.prompt_rng.setstate(state["prompt_rng"])
        self.labeled.order, self.unlabeled.order = list(state["labeled_order"]), list(state["unlabeled_order"])
        self.stream.order = list(state.get("stream_order", []))
        self.shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    # -- 1, 2: rollouts ----------------------------------------------------------------

    def _roll(self, problems: list[Problem], n: int) -> tuple[Rollouts, list[Grade]]:
        with phase("rollout"):
            return roll(self.models, problems, n, self.cfg.data.template)

    def _kept_groups(self, problems: list[Problem], rollouts: Rollouts, grades: list[Grade],
                     self_reward: torch.Tensor, stats: dict[str, float]) -> Batch:
        """The groups of one generate call that train: every unlabeled group, and the labeled
        groups with a signal (rewards that differ; all of them when `algorithm.filter_groups`
        is off). Counts the labeled rollouts' accuracy and the dropped groups in `stats`."""
        n = self.cfg.rollout.n
        keep = []
        for i, p in enumerate(problems):
            group = grades[i * n:(i + 1) * n]
            if p.is_labeled:
                stats["labeled_right"] += sum(g.correct for g in group)
                stats["labeled_rolled"] += n
                if self.cfg.algorithm.filter_groups and not rewards.group_varies(group):
                    stats["dropped_groups"] += 1
                    continue
            keep.append(i)
        rows = torch.tensor([i * n + j for i in keep for j in range(n)], dtype=torch.long)
        return Batch([problems[i] for i in keep], rollouts.select(rows), [grades[r] for r in rows.tolist()],
                     self_reward[rows], n)

    def _unlabeled_groups(self, problems: list[Problem], rollouts: Rollouts, grades: list[Grade],
                          votes: int) -> Batch:
        """D_U groups: all `votes` responses score (TTRL votes), the first n are trained on."""
        n, source = self.cfg.rollout.n, self.method.unlabeled
        self_reward = source.self_score(grades, votes) if source.self_score else torch.zeros(len(grades))
        rows = torch.tensor([i * votes + j for i in range(len(problems)) for j in range(n)], dtype=torch.long)
        return Batch(problems, rollouts.select(rows), [grades[r] for r in rows.tolist()], self_reward[rows], n)

    def collect(self) -> tuple[Batch | None, dict[str, float]]:
        if self.cfg.train.mixing == "flagged":
            return self._collect_flagged()
        cfg, m, n = self.cfg, self.method, self.cfg.rollout.n
        # RLVR draws the same labeled prompts a step as TEMPO and nothing else: the control for
        # "does the critic's reward on D_U help?"
        want_labeled = cfg.train.labeled_per_step if m.labeled_prompts else 0
        want_unlabeled = 0 if m.unlabeled is None else cfg.train.prompts_per_step - want_labeled
        votes = max(n, cfg.algorithm.vote_samples) if m.unlabeled is not None and m.unlabeled.extra_votes else n
        stats = {"gen_batches": 0.0, "dropped_groups": 0.0, "labeled_right": 0.0, "labeled_rolled": 0.0}
        parts, kept = [], 0
        labeled, unlabeled = self.labeled.take(want_labeled), self.unlabeled.take(want_unlabeled)
        if unlabeled:
            # The first labeled prompts ride in the unlabeled prompts' generate call when they
            # want as many samples: the engine runs one large batch faster than two small ones.
            ride, labeled = (labeled, []) if votes == n else ([], labeled)
            rollouts, grades = self._roll(ride + unlabeled, votes)
            cut = len(ride) * n
            if ride:
                stats["gen_batches"] += 1
                parts.append(self._kept_groups(ride, rollouts.select(torch.arange(cut)), grades[:cut],
                                               torch.zeros(cut), stats))
                kept = len(parts[-1].problems)
            parts.append(self._unlabeled_groups(unlabeled, rollouts.select(torch.arange(cut, len(grades))),
                                                grades[cut:], votes))
        # Labeled groups dropped for lack of signal are replaced by new prompts, up to a cap.
        while (labeled or kept < want_labeled) and stats["gen_batches"] < cfg.algorithm.max_gen_batches:
            labeled = labeled or self.labeled.take(want_labeled - kept)
            rollouts, grades = self._roll(labeled, n)
            stats["gen_batches"] += 1
            parts.append(self._kept_groups(labeled, rollouts, grades, torch.zeros(len(grades)), stats))
            kept += len(parts[-1].problems)
            labeled = []
        stats = self._accuracy(stats)
        if not any(p.problems for p in parts):  # every group was filtered out: nothing to learn from this step
            return None, stats
        return self._joined(parts), stats

    def _joined(self, parts: list[Batch], cut: int | None = None) -> Batch:
        """One batch of the parts' groups in order; with `cut`, of the first `cut` groups."""
        n, taken, left = self.cfg.rollout.n, [], cut
        for p in parts:
            k = len(p.problems) if left is None else min(len(p.problems), left)
            if k:
                taken.append(p if k == len(p.problems) else Batch(
                    p.problems[:k], p.rollouts.select(torch.arange(k * n)), p.grades[:k * n], p.self_reward[:k * n], n))
            left = None if left is None else left - k
        return Batch([q for p in taken for q in p.problems],
                     Rollouts.concat([p.rollouts for p in taken], self.models.tokenizer.pad_token_id),
                     [g for p in taken for g in p.grades], torch.cat([p.self_reward for p in taken]), n)

    @staticmethod
    def _accuracy(stats: dict[str, float]) -> dict[str, float]:
        """Accuracy over every labeled rollout, before groups without signal were dropped."""
        right, rolled = stats.pop("labeled_right"), stats.pop("labeled_rolled")
        if rolled:
            stats["labeled_acc"] = right / rolled
        return stats

    def _collect_flagged(self) -> tuple[Batch, dict[str, float]]:
        """The authors' batches: prompts_per_step prompts a generation batch from one shuffled
        stream, labeled groups without signal dropped, whole batches drawn again until
        prompts_per_step groups are kept, then cut to that many, in stream order."""
        cfg, n, want = self.cfg, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        source = self.method.unlabeled
        stats = {"gen_batches": 0.0, "dropped_groups": 0.0, "labeled_right": 0.0, "labeled_rolled": 0.0}
        parts, kept = [], 0
        while kept < want:
            if stats["gen_batches"] == cfg.algorithm.max_gen_batches:
                raise RefillError(f"algorithm.max_gen_batches: {cfg.algorithm.max_gen_batches} generation batches kept "
                                  f"{kept} of train.prompts_per_step={want} prompts (labeled groups whose "
                                  f"rollouts all agree are dropped); raise it, or use train.mixing=fixed")
            drawn = self.stream.take(want)
            rollouts, grades = self._roll(drawn, n)
            stats["gen_batches"] += 1
            scores = source.self_score(grades, n) if source and source.self_score else torch.zeros(len(grades))
            parts.append(self._kept_groups(drawn, rollouts, grades, scores, stats))
            kept += len(parts[-1].problems)
        return self._joined(parts, cut=want), self._accuracy(stats)

    # -- 3-7: one EM step --------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
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

        # Fully on-policy (one mini-batch, one epoch), the log-probs before the update are those
        # the M-step's own forward computes: no separate scoring pass, unless the engine's own
        # log-probs are to be compared with them.
        engine_logp = batch.rollouts.logprobs
        on_policy = cfg.train.mini_batches == 1 and cfg.train.update_epochs == 1
        with phase("old log-probs"):
            scored = None if on_policy and engine_logp is None else self.policy.infer(tokens, mb_size)
        with phase("values"):
            values = self.critic.infer(tokens, mb_size)["values"] if m.uses_critic else None
        if values is not None and not torch.isfinite(values * mask).all():
            # Rewards and advantages would be non-finite: neither model learns from this step.
            self._account("critic", True)
            stats.update({"skipped_step": 1.0, "nonfinite_values": 1.0})
            return stats

        with phase("advantages"):
            reward, pseudo = self.rewards(batch, values)
            if m.unlabeled is not None:
                stats.update(rewards.drift_stats(pseudo, m.unlabeled.threshold, batch.grades, ~labeled, batch.n))
            advantages = m.advantage.compute(reward, values, mask, batch.n)
            if engine_logp is not None:
                stats.update(algorithm.engine_agreement(scored["logp"], engine_logp, mask))
                if cfg.algorithm.tis_cap > 0:
                    advantages = advantages * algorithm.tis_weights(scored["logp"], engine_logp, cfg.algorithm.tis_cap)

        if m.uses_critic and labeled.any():
            last = rewards.last_token(values, mask)
            batch_brier = brier(last[labeled], batch.correct[labeled].float())
            stats["critic_brier_labeled_batch"] = batch_brier
            if self.e_step_due(batch_brier):
                tokens.extras = {"old_values": values, "returns": reward}
                stats.update(self.e_step(tokens, labeled))
                self._account("critic", stats["critic/nonfinite"] > 0)
                self.recalibrations += 1
        stats["recalibrations"] = float(self.recalibrations)

        tokens.extras = {"advantages": advantages} | ({} if scored is None else {"old_logp": scored["logp"]})
        stats.update(self.m_step(tokens))
        self._account("policy", stats["actor/nonfinite"] > 0)
        with phase("weight sync"):
            self.models.engine.sync_weights(self.policy.export_weights())

        valid = mask.sum()
        entropy = (stats.pop("actor/entropy_sum") / stats.pop("actor/tokens") if scored is None
                   else float((scored["entropy"] * mask).sum() / valid))
        stats.update({
            "reward_mean": float(reward.mean()),
            "response_len": float(valid / len(mask)),
            "entropy": entropy,
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
        return {f"critic/{k}": v for k, v in stats.items()}

    def m_step(self, tokens: TokenBatch) -> dict[str, float]:
        """Policy refinement: GSPO (or PPO) over mini-batches."""
        a = self.cfg.algorithm

        def loss_fn(out, mb):
            old_logp = mb.extras.get("old_logp", out["logp"].detach())  # absent: on-policy
            loss, stats = algorithm.policy_loss(out["logp"], old_logp, mb.extras["advantages"],
                                                mb.response_mask, kind=a.policy_loss, clip_low=a.clip_low,
                                                clip_high=a.clip_high, agg=a.loss_agg)
            if "old_logp" not in mb.extras:  # the step's entropy, as sums (their ratio survives averaging)
                stats |= {"entropy_sum": (out["entropy"].detach() * mb.response_mask).sum(),
                          "tokens": mb.response_mask.sum()}
            return loss * mb.extras["share"].sum(), {"pg_loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

        with phase("M-step"):
            stats = self._optimise(self.policy, tokens, loss_fn, a.loss_agg)
        return {f"actor/{k}": v for k, v in stats.items()}

    def _optimise(self, model: TrainableLM, tokens: TokenBatch, loss_fn, agg: str | None) -> dict[str, float]:
        """`train.update_epochs` passes, each one optimiser step per mini-batch (shuffled, or
        contiguous: `train.shuffle_minibatches`). Each row carries its `share` of the mini-batch
        loss (its tokens' share for token means, 1/rows for sequence means or an `agg` of None),
        so micro-batch losses add up to the mini-batch loss."""
        t = self.cfg.train
        size = -(-len(tokens) // min(t.mini_batches, len(tokens)))  # `mini_batches` near-equal parts
        minis = list(self._mini_batches(tokens, t.update_epochs, size, agg, t.shuffle_minibatches))
        totals: dict[str, float] = {}
        for mini in minis:
            out = model.train_step(mini.split(t.micro_batch_size), loss_fn)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v / len(minis)
        return totals

    def _mini_batches(self, tokens: TokenBatch, epochs: int, size: int, agg: str | None, shuffle: bool = True):
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

    def fit_critic(self, problems: list[Problem], s: Stage1Config) -> dict[str, float]:
        """Stage 1's critic training: roll out `problems` once (`s.critic_samples` responses
        each), then regress the critic's values toward the verified outcome R ∈ {+1, −1} (no
        clip: no old critic to stay near), pass after pass over the same rows (rolling out once
        is what makes it cheap), in mini-batches of `s.critic_batch` rows. The last
        `s.critic_validation` problems are held out of the fit: it stops after the first pass
        that brings their AUROC to `s.critic_target_auroc`, after the second pass in a row that
        does not lower their value loss by 0.5%, or after `s.critic_epochs` passes. One flat
        pass is no reason to stop: the step-by-step check the critic must learn can appear
        after a plateau. With `s.critic_decay` the learning rate falls linearly to zero over
        those passes."""
        epochs, batch_rows, validation = s.critic_epochs, s.critic_batch, s.critic_validation
        n = s.critic_samples or self.cfg.rollout.n
        rollouts, grades = self._roll(problems, n)
        tokens = rollouts.token_batch()
        returns = torch.tensor([1.0 if g.correct else -1.0 for g in grades])
        tokens.extras = {"old_values": torch.zeros_like(tokens.response_mask), "returns": returns}
        held = min(validation, len(problems) - 1) * n
        fit, val = tokens.select(slice(0, len(tokens) - held)), tokens.select(slice(len(tokens) - held, len(tokens)))
        agg, micro = self.cfg.algorithm.loss_agg, self.cfg.train.micro_batch_size

        def loss_fn(out, mb):
            loss, _ = algorithm.value_loss(out["values"], mb.extras["old_values"], mb.extras["returns"],
                                           mb.response_mask, float("inf"), agg)
            return loss * mb.extras["share"].sum(), {"value_loss": loss.item()}

        def validate() -> tuple[float, float]:
            values = self.critic.infer(val, micro)["values"]
            loss, _ = algorithm.value_loss(values, val.extras["old_values"], val.extras["returns"],
                                           val.response_mask, float("inf"), agg)
            return loss.item(), auroc(rewards.last_token(values, val.response_mask), val.extras["returns"].gt(0).float())

        out = {"rows": float(len(fit)), "accuracy": float(returns.gt(0).float().mean()), "epochs": 0.0}
        best, flat, started = float("inf"), 0, time.perf_counter()
        shown, steps = started, -(-len(fit) // batch_rows)
        for epoch in range(1, epochs + 1):
            losses = []
            for mini in self._mini_batches(fit, 1, batch_rows, agg):
                scale = 1.0 - ((epoch - 1) * steps + len(losses)) / (epochs * steps) if s.critic_decay else 1.0
                losses.append(self.critic.train_step(mini.split(micro), loss_fn, scale)["value_loss"])
                if time.perf_counter() - shown > 30:  # a pass takes minutes on a CPU
                    shown = time.perf_counter()
                    log.info("stage 1 critic pass %d: %d of %d updates, value loss %.4f, %.0fs", epoch, len(losses),
                             steps, sum(losses[-50:]) / len(losses[-50:]), shown - started)
            out |= {"epochs": float(epoch), "value_loss": sum(losses) / len(losses)}
            line = f"stage 1 critic pass {epoch} (at most {epochs}): value loss {out['value_loss']:.4f}"
            if held:
                out["validation_loss"], out["validation_auroc"] = validate()
                line += f", held-out pool questions: value loss {out['validation_loss']:.4f}, AUROC {out['validation_auroc']:.3f}"
            log.info("%s, %.0fs", line, time.perf_counter() - started)
            if held:
                flat = flat + 1 if out["validation_loss"] > best * 0.995 else 0
                best = min(best, out["validation_loss"])
                if out["validation_auroc"] >= s.critic_target_auroc or flat == 2:
                    break
        return out

    # -- evaluation --------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.models, self.splits.unlabeled, self.splits.heldout, self.cfg)
