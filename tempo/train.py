"""A whole run: base model, stage 1 (RLVR on D_L), the EM loop, evaluation, checkpoints, report."""
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

from tempo import dist
from tempo.base_model import base_model_dir, ensure_base_model, publish
from tempo.build import build_models, build_splits
from tempo.config import Config, save_config
from tempo.em import EMTrainer
from tempo.logger import RunLogger
from tempo.methods import METHODS
from tempo.report import write_report
from tempo.task import TaskSplits

log = logging.getLogger("tempo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def policy_source(cfg: Config) -> str:
    """The checkpoint the run starts from: the user's, or the embedded base model."""
    if cfg.model.policy_path:
        return cfg.model.policy_path
    if not dist.is_main():  # rank 0 builds it; the others wait for the finished directory
        path = base_model_dir(cfg.task, cfg.base_model)
        dist.wait_for(path / "config.json")
        return str(path)
    return str(ensure_base_model(cfg.task, cfg.base_model))


def stage1(cfg: Config, base_path: str, splits: TaskSplits) -> tuple[str, str | None]:
    """RL with verifiable rewards on stage 1's labeled data, cached: (policy, critic) for the EM loop.

    A critic-only warm-up (policy frozen) comes first, so the critic's values are meaningful
    before they steer the policy.
    """
    s = cfg.stage1
    if s.steps == 0 and s.critic_warmup_steps == 0:
        return base_path, cfg.model.critic_path or None
    s1 = copy.deepcopy(cfg)
    s1.algorithm.method = "rlvr"  # every method starts from the same stage-1 models
    shape = {k: asdict(getattr(s1, k)) for k in ("task", "data", "model", "rollout", "algorithm", "train", "stage1")}
    shape["base"] = base_path
    shape["model"].pop("kernels")
    for key in ("steps", "labeled_per_step"):  # stage 1's batches are all labeled
        shape["train"].pop(key)
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.base_model.cache_dir) / f"stage1-{key}"
    if (out / "critic" / "config.json").is_file():
        return str(out / "policy"), str(out / "critic")
    log.info("stage 1: %d critic warm-up + %d RLVR steps -> %s", s.critic_warmup_steps, s.steps, out)
    seed_everything(cfg.train.seed)
    models = build_models(s1, base_path, cfg.model.critic_path or None, need_critic=True)
    # Stage 1 trains on its own labeled data (the pre-test-time RL set), not on D_L.
    trainer = EMTrainer(s1, METHODS["rlvr"], models, dataclasses.replace(splits, labeled=splits.stage1))
    for i in range(s.critic_warmup_steps + s.steps):
        stats = trainer.train_step(update_policy=i >= s.critic_warmup_steps)
        log.info("stage 1 step %d: labeled_acc %.3f value_loss %.4f%s", i + 1, stats["labeled_acc"],
                 stats.get("critic/value_loss", float("nan")),
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
    """Run the configured method; returns the final summary (also written to the run dir)."""
    run_dir = Path(cfg.run.out_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    method = METHODS[cfg.algorithm.method]
    started = time.time()
    splits = build_splits(cfg)
    base_path = policy_source(cfg)
    policy_path, critic_path = stage1(cfg, base_path, splits)
    seed_everything(cfg.train.seed)
    models = build_models(cfg, policy_path, critic_path, need_critic=method.uses_critic)
    trainer = EMTrainer(cfg, method, models, splits)
    logger = RunLogger(run_dir, cfg.train.steps, cfg.run.tensorboard, cfg.run.progress, cfg.algorithm.method,
                       enabled=dist.is_main())
    try:
        logger.log(0, "eval", trainer.evaluate())
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
