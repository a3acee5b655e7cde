"""`tempo eval`: score a policy checkpoint on D_U without training it."""
from __future__ import annotations

from tempo.build import build_models, build_splits
from tempo.config import Config
from tempo.em import EMTrainer
from tempo.methods import METHODS
from tempo.report import markdown_table


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    critic = cfg.model.critic_path or None
    models = build_models(cfg, checkpoint, critic, need_critic=critic is not None)
    trainer = EMTrainer(cfg, METHODS[cfg.algorithm.method], models, build_splits(cfg))
    metrics = trainer.evaluate()
    print(markdown_table({checkpoint: {"step": "-", **metrics}}))
    return metrics
