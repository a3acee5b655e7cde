"""Everything a run is made of, built from its config: data splits, models, rollout engine.

This is the one place where implementations are chosen (HF or Megatron-core, HF generate
or vLLM), so the EM loop never branches on the device or the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tempo.config import Config
from tempo.data import Problem, format_prompt, load_problems, mark_labeled, refuse_overlap, split_labeled
from tempo.dist import device, init_process_group, launched_world_size
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
    stage1 = load(d.stage1_files, True)
    refuse_overlap(unlabeled, {"D_L": labeled, "data.heldout_files": heldout, "data.stage1_files": stage1})
    return TaskSplits(labeled=labeled, unlabeled=unlabeled, heldout=heldout, stage1=stage1 or labeled)


@dataclass
class Models:
    policy: TrainableLM
    critic: TrainableLM | None
    engine: RolloutEngine
    tokenizer: object

    def prompt_texts(self, problems: list[Problem], template: str) -> list[str]:
        return [format_prompt(p, template, self.tokenizer) for p in problems]


def build_models(cfg: Config, policy_path: str, critic_path: str | None, need_critic: bool) -> Models:
    """Policy, critic (a checkpoint, or a value head on the policy's trunk) and rollout engine,
    on the configured backend: Hugging Face (one process, or FSDP2 under torchrun), or
    Megatron-core TP/PP/DP under torchrun."""
    given = {"policy_path": policy_path, "critic_path": critic_path if need_critic else None}
    for key, path in given.items():
        if path and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.{key}: no Hugging Face checkpoint at {path}")
    from tempo.models.hf import load_policy_module

    dtype, t, share, fsdp = DTYPES[cfg.model.dtype], cfg.train, cfg.model.share_prompts, _fsdp(cfg)
    if cfg.model.backend == "megatron":
        from tempo.models.megatron.model import init_parallel_for, load_model

        init_parallel_for([path for path in given.values() if path], cfg.model.tensor_parallel,
                          cfg.model.pipeline_parallel, t.seed)
        policy = load_model(policy_path, "policy", optim=t.optim("policy"), temperature=cfg.rollout.temperature,
                            **_megatron_layout(cfg))
    else:
        from tempo.models.hf import HFModel

        if fsdp:  # FSDP2 over every rank
            init_process_group()
        policy = HFModel(load_policy_module(policy_path, torch.float32, cfg.model.attn_implementation), "policy",
                         t.optim("policy"), temperature=cfg.rollout.temperature, **_hf_options(cfg))
    critic = build_critic(cfg, policy_path, critic_path) if need_critic else None
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    engine: RolloutEngine
    if cfg.rollout.engine == "vllm":  # vLLM holds its own copy of the policy, refreshed every M-step
        from tempo.rollout.vllm import VLLMRolloutEngine, start_llm

        # the ranks of a tensor-parallel group share one engine (pipeline stages each run their own)
        replicas = cfg.model.tensor_parallel if cfg.model.backend == "megatron" else 1
        llm = start_llm(cfg.rollout, policy_path, tensor_parallel=replicas, dtype=cfg.model.dtype, seed=t.seed)
        engine = VLLMRolloutEngine(cfg.rollout, llm, tokenizer)
    else:
        from tempo.rollout.hf import HFRolloutEngine

        # One HF process generates with the policy's own module (weight sync is free); Megatron's
        # and FSDP2's shards (offloaded ones too) cannot generate, so each rank samples with a full copy, refreshed from
        # export_weights(): every rank is an engine of its own.
        replicas = 1
        own = cfg.model.backend == "hf" and not fsdp
        sampler = policy.module if own else load_policy_module(policy_path, dtype).to(device())
        engine = HFRolloutEngine(cfg.rollout, sampler, tokenizer, share_prompts=share, compute_dtype=dtype)
    if cfg.rollout.split_over_ranks and launched_world_size() // replicas > 1:  # each engine samples a slice
        from tempo.rollout.parallel import DataParallelRollout

        engine = DataParallelRollout(engine, tokenizer.pad_token_id, replicas)
    return Models(policy, critic, engine, tokenizer)


def build_critic(cfg: Config, policy_path: str, critic_path: str | None) -> TrainableLM:
    """The critic (a checkpoint, or a new value head on the policy's trunk) with a fresh
    optimiser at the config's critic learning rate: build_models' own, or one to fit anew."""
    source = critic_path or policy_path
    new_head = not has_value_head(source)
    if cfg.model.backend == "megatron":
        from tempo.models.megatron.model import load_model

        return load_model(source, "critic", init_from_policy=new_head, optim=cfg.train.optim("critic"),
                          **_megatron_layout(cfg))
    from tempo.models.hf import HFModel, load_critic_module

    module = load_critic_module(source, torch.float32, init_from_policy=new_head, attn=cfg.model.attn_implementation)
    return HFModel(module, "critic", cfg.train.optim("critic"), **_hf_options(cfg))


def _fsdp(cfg: Config) -> bool:
    """The HF backend shards with FSDP2 under torchrun, and to offload to the host."""
    return cfg.model.backend == "hf" and (launched_world_size() > 1 or cfg.model.cpu_offload)


def _megatron_layout(cfg: Config) -> dict:
    return dict(dtype=DTYPES[cfg.model.dtype], sequence_parallel=cfg.model.sequence_parallel,
                recompute=cfg.model.recompute, cpu_offload=cfg.model.cpu_offload, kernels=cfg.model.kernels)


def _hf_options(cfg: Config) -> dict:
    """Weights stay fp32 (the optimiser's master copy); model.dtype is the compute dtype."""
    return dict(share_prompts=cfg.model.share_prompts, recompute=cfg.model.recompute, data_parallel=_fsdp(cfg),
                compute_dtype=DTYPES[cfg.model.dtype], cpu_offload=cfg.model.cpu_offload, kernels=cfg.model.kernels)
