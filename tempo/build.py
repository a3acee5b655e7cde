"""Everything a run is made of, built from its config: data splits, models, rollout engine.

This is the one place where implementations are chosen (HF or Megatron-core, HF generate
or vLLM), so the EM loop never branches on the device or the backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tempo.config import Config
from tempo.data import Problem, format_prompt, load_problems, mark_labeled, split_labeled
from tempo.errors import ConfigError
from tempo.models.base import TrainableLM, has_value_head
from tempo.rollout.base import RolloutEngine
from tempo.task import TaskSplits, make_splits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_splits(cfg: Config) -> TaskSplits:
    """D_L, D_U, the held-out labeled slice and stage 1's data, from the embedded task or files."""
    if cfg.data.source == "embedded":
        return make_splits(cfg.task)
    d = cfg.data

    def load(files: list[str], labeled: bool) -> list[Problem]:
        return [p for f in files for p in mark_labeled(load_problems(f), labeled)]

    labeled, unlabeled, heldout = load(d.labeled_files, True), load(d.unlabeled_files, False), load(d.heldout_files, True)
    if d.labeled_fraction > 0:
        drawn, unlabeled = split_labeled(unlabeled, d.labeled_fraction, d.seed)
        labeled += drawn
    return TaskSplits(labeled=labeled, unlabeled=unlabeled, heldout=heldout,
                      stage1=load(d.stage1_files, True) or labeled)


def select_kernels(mode: str) -> None:
    """`model.kernels` picks the kernel implementation for the whole process (tempo_kernels
    reads TEMPO_KERNELS at each call): auto = Triton on CUDA tensors, PyTorch on CPU."""
    os.environ["TEMPO_KERNELS"] = mode


@dataclass
class Models:
    policy: TrainableLM
    critic: TrainableLM | None
    engine: RolloutEngine
    tokenizer: object

    def prompt_texts(self, problems: list[Problem], template: str) -> list[str]:
        return [format_prompt(p, template, self.tokenizer) for p in problems]


def build_models(cfg: Config, policy_path: str, critic_path: str | None, need_critic: bool) -> Models:
    """Policy, critic (a checkpoint, or a value head on the policy's trunk) and rollout engine."""
    select_kernels(cfg.model.kernels)
    if cfg.model.backend == "megatron":  # TP/PP/DP: launch with torchrun (tempo.models.megatron)
        from tempo.models.megatron.model import build_megatron_models

        return build_megatron_models(cfg, policy_path, critic_path, need_critic)
    from tempo.models.hf import HFModel, load_critic_module, load_policy_module

    if not (Path(policy_path) / "config.json").is_file():
        raise ConfigError(f"model.policy_path: no Hugging Face checkpoint at {policy_path}")
    dtype = DTYPES[cfg.model.dtype]
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = HFModel(load_policy_module(policy_path, dtype), "policy", cfg.train.optim("policy"),
                     temperature=cfg.rollout.temperature)
    critic = None
    if need_critic:
        path = critic_path or policy_path
        module = load_critic_module(path, dtype, init_from_policy=not has_value_head(path))
        critic = HFModel(module, "critic", cfg.train.optim("critic"))
    return Models(policy, critic, build_engine(cfg, policy, tokenizer), tokenizer)


def build_engine(cfg: Config, policy: TrainableLM, tokenizer) -> RolloutEngine:
    if cfg.rollout.engine == "vllm":
        raise ConfigError("rollout.engine: vllm needs a GPU install (pip install .[gpu]); use hf on CPU")
    from tempo.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(cfg.rollout, policy.module, tokenizer)
