"""A whole run: base model, stage 1 (on its own labeled data, cached), the EM loop, evaluation, checkpoints, report."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tempo import dist, lock
from tempo.base_model import base_model_dir, ensure_base_model, publish
from tempo.build import build_models, build_splits
from tempo.config import Config, save_config
from tempo.em import EMTrainer
from tempo.logger import RunLogger
from tempo.methods import METHODS
from tempo.report import regime, write_report
from tempo.task import TaskSplits

log = logging.getLogger("tempo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_sources(cfg: Config) -> tuple[str, str | None]:
    """The checkpoints the run starts from: the user's policy (and critic, if given), or the
    embedded base model; a critic of None starts from the policy with a new value head."""
    critic = cfg.model.critic_path or None
    if cfg.model.policy_path:
        return cfg.model.policy_path, critic
    if not dist.is_main():  # rank 0 builds it; the others wait for the finished directory
        path = base_model_dir(cfg.task, cfg.base_model)
        dist.wait_for(path / "config.json")
        return str(path), critic
    return str(ensure_base_model(cfg.task, cfg.base_model)), critic


def stage1_key(cfg: Config, base_path: str, critic_base: str | None) -> str:
    """Hash of every setting that shapes stage 1's models (not the EM loop's length, the
    method or the kernel implementation, which give equal models)."""
    shape = {k: asdict(getattr(cfg, k)) for k in ("task", "data", "model", "rollout", "algorithm", "train", "stage1")}
    shape["base"], shape["critic_base"] = base_path, critic_base
    shape["model"].pop("kernels")
    shape["algorithm"].pop("method")
    # Stage 1's batches are all labeled, its critic trains at stage1.critic_lr, and it is
    # seeded by the base model's seed, so that runs with other EM-loop seeds share it.
    shape["seed"] = cfg.base_model.seed
    for key in ("steps", "labeled_per_step", "critic_lr", "seed"):
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
    s1.train.seed = cfg.base_model.seed
    seed_everything(s1.train.seed)
    models = build_models(s1, base_path, critic_base, need_critic=True)
    # Stage 1 trains on its own labeled data (the pre-test-time RL set), not on D_L.
    trainer = EMTrainer(s1, METHODS["rlvr"], models, dataclasses.replace(splits, labeled=splits.stage1))
    if s.critic_epochs:
        pool = splits.stage1[: s.critic_prompts or None]
        fit = trainer.fit_critic(pool, s.critic_epochs, s.critic_batch)
        log.info("stage 1 critic: %d rows (accuracy %.3f), value loss %.4f -> %.4f", fit["rows"], fit["accuracy"],
                 fit["value_loss_first"], fit["value_loss_last"])
    for i in range(s.steps):
        stats = trainer.train_step()
        log.info("stage 1 RLVR step %d: labeled_acc %.3f%s", i + 1, stats["labeled_acc"],
                 " (skipped: no group with both right and wrong answers)" if stats["skipped_step"] else "")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    models.policy.save(str(tmp / "policy"))  # collective under Megatron: every rank calls it
    models.critic.save(str(tmp / "critic"))
    if dist.is_main():
        models.tokenizer.save_pretrained(str(tmp / "policy"))
        publish(tmp, out)
    dist.barrier()
    return str(out / "policy"), str(out / "critic")


def train(cfg: Config) -> dict:
    """Run the configured method; returns the final summary (also written to the run dir).
    Rank 0 holds the run directory for the whole run: a second run into it is refused."""
    run_dir = Path(cfg.run.out_dir)
    if not dist.is_main():
        return _run(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock.hold(run_dir):
        save_config(cfg, run_dir / "config.yaml")
        return _run(cfg, run_dir)


def _run(cfg: Config, run_dir: Path) -> dict:
    method = METHODS[cfg.algorithm.method]
    started = time.time()
    splits = build_splits(cfg)
    base_path, critic_base = model_sources(cfg)
    policy_path, critic_path = stage1(cfg, base_path, critic_base, splits)
    seed_everything(cfg.train.seed)
    models = build_models(cfg, policy_path, critic_path, need_critic=method.uses_critic)
    trainer = EMTrainer(cfg, method, models, splits)
    logger = RunLogger(run_dir, cfg.train.steps, cfg.run.tensorboard, cfg.run.progress, cfg.algorithm.method,
                       enabled=dist.is_main())
    try:
        base = trainer.evaluate()
        logger.log(0, "eval", base)
        if dist.is_main():
            log.info(regime(base))
        for step in range(1, cfg.train.steps + 1):
            logger.log(step, "train", trainer.train_step())
            logger.advance()
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                logger.log(step, "eval", trainer.evaluate())
    finally:
        logger.close()
    if cfg.run.save_checkpoints:
        save_checkpoint(trainer, run_dir / "checkpoints" / f"step_{trainer.step}")
    if not dist.is_main():
        return {}
    return write_report(run_dir, cfg.algorithm.method, time.time() - started)


def save_checkpoint(trainer: EMTrainer, path: Path) -> None:
    """Policy and critic (safetensors + optimiser), RNG states and the step counter."""
    trainer.policy.save(str(path / "policy"))  # collective under Megatron
    if trainer.critic is not None:
        trainer.critic.save(str(path / "critic"))
    if not dist.is_main():
        return
    trainer.models.tokenizer.save_pretrained(str(path / "policy"))
    torch.save({"step": trainer.step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "shuffle_rng": trainer.shuffle.get_state(), "recalibrations": trainer.recalibrations},
               path / "trainer_state.pt")
