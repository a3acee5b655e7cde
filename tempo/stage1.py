"""Stage 1, before test time, on its own labeled data (not D_L): the critic learns to value
the base policy's solutions, then optional RLVR steps. Cached under a hash of its settings."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tempo import algorithm, dist, rewards
from tempo.base_model import publish
from tempo.build import build_critic, build_models
from tempo.config import Config, Stage1Config
from tempo.grading import Grade
from tempo.em import EMTrainer, seed_everything
from tempo.metrics import auroc
from tempo.rollout.base import Rollouts
from tempo.task import TaskSplits

log = logging.getLogger("tempo")


def stage1_key(cfg: Config, base_path: str, critic_base: str | None) -> str:
    """Hash of every setting that shapes stage 1's models (not the EM loop's length, the
    method, the kernel implementation or host offload, which give equal models). The methods of one seed
    share them; each seed draws its own, so a spread over seeds includes the critic's draw."""
    shape = {k: asdict(getattr(cfg, k)) for k in ("task", "data", "model", "rollout", "algorithm", "train", "stage1")}
    shape["base"], shape["critic_base"] = base_path, critic_base
    shape["model"].pop("kernels")
    shape["model"].pop("cpu_offload")
    shape["algorithm"].pop("method")
    shape["task"].pop("labeled_is_stage1")  # stage 1 trains on its own data, whatever D_L is
    # Stage 1's batches are all labeled and its critic trains at stage1.critic_lr.
    shape["seed"] = cfg.train.seed
    for key in ("steps", "labeled_per_step", "critic_lr", "seed", "max_bad_steps"):
        shape["train"].pop(key)
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def stage1(cfg: Config, base_path: str, critic_base: str | None, splits: TaskSplits) -> tuple[str, str | None]:
    """Stage 1 on its own labeled data, cached: (policy, critic) for the EM loop.

    The critic is trained first, on one roll-out of the base policy reused for several epochs,
    so its values mean something before they steer the policy; optional RLVR steps follow.
    """
    s = cfg.stage1
    if s.steps == 0 and s.critic_epochs == 0:
        return base_path, critic_base
    out = Path(cfg.base_model.cache_dir) / f"stage1-{stage1_key(cfg, base_path, critic_base)}"
    if (out / "critic" / "config.json").is_file():
        return str(out / "policy"), str(out / "critic")
    log.info("stage 1: critic %d epochs, then %d RLVR steps -> %s", s.critic_epochs, s.steps, out)
    s1 = copy.deepcopy(cfg)
    s1.algorithm.method = "rlvr"  # every method starts from the same stage-1 models
    s1.train.labeled_per_step = s1.train.prompts_per_step
    s1.train.critic_lr = s.critic_lr
    seed_everything(s1.train.seed)
    models = build_models(s1, base_path, critic_base, need_critic=True)
    # Stage 1 trains on its own labeled data (the pre-test-time RL set), not on D_L.
    trainer = EMTrainer(s1, models, dataclasses.replace(splits, labeled=splits.stage1))
    if s.critic_epochs:
        n = s.critic_samples or cfg.rollout.n
        rollouts, grades = trainer.collector.roll(splits.stage1[: s.critic_prompts or None], n)
        fit = fit_critic(trainer, rollouts, grades, n, s)
        if s.critic_retry_lr and fit.get("validation_auroc", 1.0) < s.critic_retry_below:
            log.info("stage 1 critic: held-out pool AUROC %.3f after %d passes, under %.2f: starting over from its "
                     "trunk at learning rate %g (stage1.critic_retry_lr)", fit["validation_auroc"], fit["epochs"],
                     s.critic_retry_below, s.critic_retry_lr)
            s1.train.critic_lr = s.critic_retry_lr
            models.critic = build_critic(s1, base_path, critic_base)
            trainer = EMTrainer(s1, models, trainer.splits)
            fit = fit_critic(trainer, rollouts, grades, n, s) | {"first_fit": fit}
        log.info("stage 1 critic: %d rows (accuracy %.3f), %d passes, value loss %.4f%s", fit["rows"], fit["accuracy"],
                 fit["epochs"], fit["value_loss"], f", held-out pool AUROC {fit['validation_auroc']:.3f}"
                 if "validation_auroc" in fit else "")
    for i in range(s.steps):
        stats = trainer.train_step()
        log.info("stage 1 RLVR step %d: labeled_acc %.3f%s", i + 1, stats["labeled_acc"],
                 " (skipped: no group with both right and wrong answers)" if stats["skipped_step"] else "")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    models.policy.save(str(tmp / "policy"))  # collective under Megatron: every rank calls it
    models.critic.save(str(tmp / "critic"))
    if dist.is_main():
        models.tokenizer.save_pretrained(str(tmp / "policy"))
        (tmp / "build.json").write_text(json.dumps(fit if s.critic_epochs else {}, indent=1))
        publish(tmp, out)
    dist.barrier()
    return str(out / "policy"), str(out / "critic")


def fit_critic(trainer: EMTrainer, rollouts: Rollouts, grades: list[Grade], n: int,
               s: Stage1Config) -> dict[str, float]:
    """Stage 1's critic training on one roll-out of the pool (`n` responses a question):
    regress the critic's values toward the verified outcome R ∈ {+1, −1} (no
    clip: no old critic to stay near), pass after pass over the same rows (rolling out once
    is what makes it cheap), in mini-batches of `s.critic_batch` rows. The last
    `s.critic_validation` problems are held out of the fit: it stops after the first pass
    that brings their AUROC to `s.critic_target_auroc`, after the second pass in a row that
    does not lower their value loss by 0.5%, or after `s.critic_epochs` passes. One flat
    pass is no reason to stop: the step-by-step check the critic must learn can appear
    after a plateau. With `s.critic_decay` the learning rate falls linearly to zero over
    those passes."""
    epochs, batch_rows, validation = s.critic_epochs, s.critic_batch, s.critic_validation
    tokens = rollouts.token_batch()
    returns = torch.tensor([1.0 if g.correct else -1.0 for g in grades])
    tokens.extras = {"old_values": torch.zeros_like(tokens.response_mask), "returns": returns}
    held = min(validation, len(grades) // n - 1) * n
    fit, val = tokens.select(slice(0, len(tokens) - held)), tokens.select(slice(len(tokens) - held, len(tokens)))
    agg, micro = trainer.cfg.algorithm.loss_agg, trainer.cfg.train.micro_batch_size

    def loss_fn(out, mb):
        loss, _ = algorithm.value_loss(out["values"], mb.extras["old_values"], mb.extras["returns"],
                                       mb.response_mask, float("inf"), agg)
        return loss * mb.extras["share"].sum(), {"value_loss": loss.item()}

    def validate() -> tuple[float, float]:
        values = trainer.critic.infer(val, micro)["values"]
        loss, _ = algorithm.value_loss(values, val.extras["old_values"], val.extras["returns"],
                                       val.response_mask, float("inf"), agg)
        return loss.item(), auroc(rewards.last_token(values, val.response_mask), val.extras["returns"].gt(0).float())

    out = {"rows": float(len(fit)), "accuracy": float(returns.gt(0).float().mean()), "epochs": 0.0}
    best, flat, started = float("inf"), 0, time.perf_counter()
    shown, steps = started, -(-len(fit) // batch_rows)
    for epoch in range(1, epochs + 1):
        losses = []
        for mini in trainer.mini_batches(fit, 1, batch_rows, agg):
            scale = 1.0 - ((epoch - 1) * steps + len(losses)) / (epochs * steps) if s.critic_decay else 1.0
            losses.append(trainer.critic.train_step(mini.split(micro), loss_fn, scale)["value_loss"])
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
