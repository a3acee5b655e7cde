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
    """Policy, critic (a checkpoint, or a value head on the policy's trunk) and rollout engine,
    on the configured backend: Hugging Face (one process, or FSDP2 under torchrun), or
    Megatron-core TP/PP/DP under torchrun."""
    select_kernels(cfg.model.kernels)
    given = {"policy_path": policy_path, "critic_path": critic_path if need_critic else None}
    for key, path in given.items():
        if path and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.{key}: no Hugging Face checkpoint at {path}")
    from tempo.models.hf import load_policy_module

    dtype, t, share = DTYPES[cfg.model.dtype], cfg.train, cfg.model.share_prompts
    fsdp = cfg.model.backend == "hf" and (launched_world_size() > 1 or cfg.model.cpu_offload)
    critic_source = critic_path or policy_path
    new_head = need_critic and not has_value_head(critic_source)
    if cfg.model.backend == "megatron":
        from tempo.models.megatron.model import init_parallel_for, load_model

        init_parallel_for([path for path in given.values() if path], cfg.model.tensor_parallel,
                          cfg.model.pipeline_parallel, t.seed)
        layout = dict(dtype=dtype, sequence_parallel=cfg.model.sequence_parallel, recompute=cfg.model.recompute,
                      cpu_offload=cfg.model.cpu_offload)
        policy = load_model(policy_path, "policy", optim=t.optim("policy"), temperature=cfg.rollout.temperature,
                            **layout)
        critic = load_model(critic_source, "critic", init_from_policy=new_head, optim=t.optim("critic"),
                            **layout) if need_critic else None
    else:
        from tempo.models.hf import HFModel, load_critic_module

        if fsdp:  # FSDP2 over every rank
            init_process_group()
        # Weights stay fp32 (the optimiser's master copy); model.dtype is the compute dtype.
        options = dict(share_prompts=share, recompute=cfg.model.recompute, data_parallel=fsdp,
                       compute_dtype=dtype, cpu_offload=cfg.model.cpu_offload)
        attn = cfg.model.attn_implementation
        policy = HFModel(load_policy_module(policy_path, torch.float32, attn), "policy", t.optim("policy"),
                         temperature=cfg.rollout.temperature, **options)
        critic = HFModel(load_critic_module(critic_source, torch.float32, init_from_policy=new_head, attn=attn),
                         "critic", t.optim("critic"), **options) if need_critic else None
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    engine: RolloutEngine
    if cfg.rollout.engine == "vllm":  # vLLM holds its own copy of the policy, refreshed every M-step
        from tempo.rollout.vllm import VLLMRolloutEngine, start_llm

        # the ranks of a tensor-parallel group share one engine (pipeline stages each run their own)
        replicas = cfg.model.tensor_parallel if cfg.model.backend == "megatron" else 1
        llm = start_llm(cfg.rollout, policy_path, tensor_parallel=replicas, dtype=cfg.model.dtype, seed=t.seed)
        engine = VLLMRolloutEngine(cfg.rollout, llm, tokenizer, seed=t.seed)
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
