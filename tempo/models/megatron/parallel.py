"""Parallel layout of a Megatron-core run: checked from the config, then set up in one place.

World size = tensor_parallel × pipeline_parallel × data_parallel (data parallel is what is
left). Every check that can fail on the user's input runs in `check_layout`, before any
process-group work, and raises a one-line `ConfigError`. `init_parallel` then starts the
process group (NCCL on GPUs, gloo on CPU; torchrun's env://, or a one-process group when
launched without torchrun) and megatron's model-parallel state (rank order tp-dp-pp).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tempo.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def check_layout(tp: int, pp: int, world_size: int, *, num_heads: int, num_kv_heads: int,
                 num_layers: int, ffn_size: int) -> Layout:
    """The layout for this model and world size, or a ConfigError naming the first problem."""
    if tp < 1 or pp < 1:
        raise ConfigError("model.tensor_parallel / model.pipeline_parallel: must be at least 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} does not factor into model.tensor_parallel ({tp}) × "
                          f"model.pipeline_parallel ({pp}) × data parallel: launch a multiple of {tp * pp} processes")
    if num_heads % tp:
        raise ConfigError(f"model.tensor_parallel: {tp} does not divide the {num_heads} attention heads")
    if num_kv_heads % tp:
        raise ConfigError(f"model.tensor_parallel: {tp} does not divide the {num_kv_heads} key/value heads "
                          f"(query groups)")
    if ffn_size % tp:
        raise ConfigError(f"model.tensor_parallel: {tp} does not divide the MLP width {ffn_size}")
    if num_layers % pp:
        raise ConfigError(f"model.pipeline_parallel: {pp} does not divide the {num_layers} layers")
    return Layout(tp, pp, world_size // (tp * pp))


def init_parallel(layout: Layout, seed: int) -> None:
    """Process group and megatron's model-parallel state for `layout` (re-initialised when a
    previous call set up another layout in this process)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from tempo.dist import init_process_group

    on_gpu = torch.cuda.is_available()
    init_process_group()
    if dist.get_world_size() != layout.world_size:
        raise ConfigError(f"world size {dist.get_world_size()} is not tensor_parallel × pipeline_parallel × "
                          f"data parallel = {layout.world_size}")
    if not on_gpu:
        from tempo.models.megatron import cpu_compat

        cpu_compat.install()
    if ps.model_parallel_is_initialized():
        if current_layout() == layout:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                 create_gloo_process_groups=False)
    if on_gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from tempo.models.megatron import cpu_compat

        cpu_compat.seed_rng_tracker(seed, ps.get_tensor_model_parallel_rank())


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())

