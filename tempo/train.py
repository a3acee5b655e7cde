"""A whole run: base model, stage 1 (on its own labeled data, cached), the EM loop, evaluation, checkpoints, report."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from tempo import checkpoint, dist, lock
from tempo.base_model import base_model_dir, ensure_base_model, ensure_verifier_model
from tempo.build import build_models, build_splits
from tempo.config import Config, config_diff, load_config, save_config
from tempo.em import EMTrainer, seed_everything
from tempo.errors import ResumeError
from tempo.logger import RunLogger
from tempo.methods import METHODS
from tempo.profiling import ProfileWindow
from tempo.report import regime, write_report
from tempo.stage1 import stage1

log = logging.getLogger("tempo")


def model_sources(cfg: Config) -> tuple[str, str | None]:
    """The checkpoints the run starts from: the user's policy (and critic, if given), or the
    embedded base model (and its verifier, with `base_model.verifier_max_steps`); a critic of
    None starts from the policy with a new value head."""
    critic = cfg.model.critic_path or None
    if cfg.model.policy_path:
        return cfg.model.policy_path, critic
    task, base = cfg.task, cfg.base_model
    verifier = base.verifier_max_steps > 0 and critic is None
    if not dist.is_main():  # rank 0 builds them; the others wait for the finished directories
        paths = [base_model_dir(task, base)] + ([base_model_dir(task, base, "verifier")] if verifier else [])
        for path in paths:
            dist.wait_for(path / "config.json")
        return str(paths[0]), str(paths[1]) if verifier else critic
    policy = ensure_base_model(task, base)
    return str(policy), str(ensure_verifier_model(task, base)) if verifier else critic


def train(cfg: Config) -> dict:
    """Run the configured method; returns the final summary (also written to the run dir).
    Rank 0 holds the run directory for the whole run: a second run into it is refused."""
    run_dir = Path(cfg.run.out_dir)
    if not dist.is_main():
        return _run(cfg, run_dir, resume_point(cfg, run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock.hold(run_dir):
        start = resume_point(cfg, run_dir)
        if start is None:
            _fresh(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        return _run(cfg, run_dir, start)


# Keys that may change between a run and its resumption: they do not touch its trajectory
# (train.steps lets a finished run be extended).
RESUMABLE_CHANGES = {"run.resume", "run.progress", "run.tensorboard", "run.profile_steps", "train.steps"}


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to continue from under `run.resume`, or None to start afresh."""
    if cfg.run.resume == "never":
        return None
    found = checkpoint.latest(run_dir)
    if found is None:
        log.info("run.resume=%s: no whole checkpoint in %s, starting from the beginning", cfg.run.resume, run_dir)
        return None
    changed = [k for k in config_diff(load_config(found / "config.yaml"), cfg) if k not in RESUMABLE_CHANGES]
    if changed and cfg.run.resume != "force":
        raise ResumeError(f"{found}: the config differs from the checkpoint's in {', '.join(changed)}; "
                          "resume with the same config, or with --resume-force (run.resume=force)")
    if changed:
        log.warning("resuming %s with changed keys: %s", found, ", ".join(changed))
    return found


def _fresh(run_dir: Path) -> None:
    """A new run in an old directory replaces its metrics and checkpoints (said, not silent)."""
    old = checkpoint.clear(run_dir)
    for name in ("metrics.jsonl", "tensorboard"):
        path = run_dir / name
        if path.exists():
            old += 1
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if old:
        log.warning("starting afresh in %s: its earlier metrics and checkpoints are replaced "
                    "(run.resume=auto continues a run instead)", run_dir)


def _run(cfg: Config, run_dir: Path, start: Path | None) -> dict:
    method = METHODS[cfg.algorithm.method]
    started = time.time()
    splits = build_splits(cfg)
    if start is None:
        base_path, critic_base = model_sources(cfg)
        policy_path, critic_path = stage1(cfg, base_path, critic_base, splits)
    else:
        policy_path = str(start / "policy")
        critic_path = str(start / "critic") if (start / "critic").is_dir() else None
    seed_everything(cfg.train.seed)
    models = build_models(cfg, policy_path, critic_path, need_critic=method.uses_critic)
    trainer = EMTrainer(cfg, models, splits)
    if start is not None:
        load_checkpoint(trainer, start)
        log.info("resumed from %s (step %d)", start, trainer.step)
    logger = RunLogger(run_dir, cfg.train.steps, cfg.run.tensorboard, cfg.run.progress, cfg.algorithm.method,
                       enabled=dist.is_main(), resume_step=trainer.step if start is not None else None)
    try:
        if start is None:
            base = trainer.evaluate()
            logger.log(0, "eval", base)
            if dist.is_main():
                log.info(regime(base))
        window = ProfileWindow(cfg.run.profile_steps, run_dir, writer=dist.is_main())
        for step in range(trainer.step + 1, cfg.train.steps + 1):
            window.before(step)
            logger.log(step, "train", trainer.train_step())
            window.after(step)
            logger.advance()
            trainer.check_health()
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                logger.log(step, "eval", trainer.evaluate())
            every = cfg.run.checkpoint_every
            if cfg.run.save_checkpoints and (step == cfg.train.steps or (every and step % every == 0)):
                save_checkpoint(trainer, run_dir, cfg.run.keep_checkpoints)
    finally:
        logger.close()
    if not dist.is_main():
        return {}
    return write_report(run_dir, cfg.algorithm.method, time.time() - started, chance_levels(cfg))


def chance_levels(cfg: Config) -> dict[str, float]:
    """Accuracy of guessing the answer, where the task defines it: the embedded task's
    answers are uniform over the residues."""
    if cfg.data.source != "embedded":
        return {}
    p = 1.0 / cfg.task.modulus
    return {"mean@k": p, "maj@k": p, "pass@k": 1.0 - (1.0 - p) ** cfg.eval.pass_k}


def save_checkpoint(trainer: EMTrainer, run_dir: Path, keep: int) -> Path | None:
    """Write `checkpoints/step_<k>` atomically (see tempo.checkpoint); every rank writes its
    part, rank 0 seals it once all have. Non-finite weights are never written."""
    for name, model in (("policy", trainer.policy), ("critic", trainer.critic)):
        if model is not None and not all(bool(torch.isfinite(t).all()) for _, t in model.export_weights()):
            log.error("step %d: the %s has non-finite weights; no checkpoint written", trainer.step, name)
            return None
    started = time.time()
    tmp = checkpoint.temporary(run_dir, trainer.step)
    trainer.policy.save(str(tmp / "policy"))  # collective under Megatron
    if trainer.critic is not None:
        trainer.critic.save(str(tmp / "critic"))
    # Every rank's RNGs: under Megatron each rank samples and shuffles with its own.
    torch.save(trainer.state_dict(), tmp / f"trainer_state_rank{dist.rank()}.pt")
    dist.barrier()
    final = None
    if dist.is_main():
        trainer.models.tokenizer.save_pretrained(str(tmp / "policy"))
        shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
        final = checkpoint.commit(tmp, trainer.step, keep)
        log.info("checkpoint %s written in %.1f s", final, time.time() - started)
    dist.barrier()
    return final


def load_checkpoint(trainer: EMTrainer, path: Path) -> None:
    """Optimiser states and trainer state (RNGs, cycler positions, counters) of a checkpoint
    whose weights the models were built from."""
    trainer.policy.load_optimizer(str(path / "policy"))
    if trainer.critic is not None:
        trainer.critic.load_optimizer(str(path / "critic"))
    trainer.load_state_dict(torch.load(path / f"trainer_state_rank{dist.rank()}.pt", weights_only=False))
