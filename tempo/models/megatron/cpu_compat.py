"""Megatron-core on CPU: the few CUDA-only calls it makes, redirected. Used ONLY on CPU.

megatron-core assumes a GPU in a handful of places that a gloo run reaches:
  - `torch.cuda.current_device()` names the device of the buffers it allocates
    (tensor-parallel gathers, the attention score buffer, pipeline p2p shapes);
  - `torch.cuda.synchronize()` after pipeline p2p;
  - `torch.zeros(..., device="cuda")` for the token counter of the pipeline schedules;
  - `Tensor.cuda()` on the tied word embedding of a pipeline's last stage (before its
    first-to-last-stage all-reduce);
  - the CUDA RNG tracker (`megatron.core.tensor_parallel.random`), which we replace by one
    that forks the CPU generator, and the CUDA generator state that activation
    recomputation saves and restores (there is none: the CPU generator is saved already).
`install()` redirects each to the CPU. It refuses to run when CUDA is available, so a GPU run
can never be silently rerouted, and it is idempotent.
"""
from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


def _cpu_device(*_args, **_kwargs) -> torch.device:
    return torch.device("cpu")


def _no_sync(*_args, **_kwargs) -> None:
    return None


def _tensor_cuda(self: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return self


class _CpuTorch(types.ModuleType):
    """`torch` as seen by the pipeline schedules: tensor factories map device="cuda" to CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("tempo.models.megatron.cpu_compat is for CPU runs only")
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = _cpu_device
    mrandom._get_cuda_rng_state = _no_sync
    mrandom._set_cuda_rng_state = _no_sync
    torch.cuda.synchronize = _no_sync
    torch.Tensor.cuda = _tensor_cuda
    schedules.torch = _CpuTorch()
    _INSTALLED = True


class CpuRNGStatesTracker:
    """Named CPU generator states, forked around the ops that megatron runs under a tracker
    (dropout in tensor-parallel regions); same interface as megatron's CUDA tracker."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"rng state {name} / seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_rng_tracker(seed: int, tp_rank: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: the same named states and seeds."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
