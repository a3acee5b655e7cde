"""What the EM loop needs from a model, whatever runs it (Hugging Face, Megatron-core TP/PP).

A `TrainableLM` is a policy (per-token log-probs of the response) or a critic (per-token
values) together with its optimiser. The loop hands it token batches and a loss function;
how the forward/backward is scheduled (micro-batches, pipeline stages, gradient
all-reduce) is the backend's business.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
import inspect
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from tempo.config import Optim
from tempo.dist import device as process_device

OUTPUTS = {"policy": ("logp", "entropy"), "critic": ("values",)}


def with_cache(forward: Callable, cache) -> dict:
    """The keyword that hands a KV cache to a transformers model (its forward, or generate,
    which passes it on): `cache` where the forward takes it (transformers 5.2x, which warns on
    the old name), `past_key_values` before (the GPU image and vLLM's pin are 5.17-5.19)."""
    return {"cache" if "cache" in inspect.signature(forward).parameters else "past_key_values": cache}


def enable_recompute(module: torch.nn.Module) -> None:
    """Activation checkpointing of every layer, under its current name where it has one."""
    enable = getattr(module, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: they count real tokens only, as during generation."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


LossFn = Callable[[dict[str, torch.Tensor], "TokenBatch"], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TokenBatch:
    """Prompts left-padded, responses right-padded: the response is the last R columns."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    response_mask: torch.Tensor  # [B, R] float, 1 for valid response tokens (EOS included)
    # Per-row training data that travels with the tokens into micro-batches (old log-probs,
    # advantages, returns, ...): the loss function reads it from the micro-batch it is given.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def position_ids(self) -> torch.Tensor:
        return left_padded_positions(self.attention_mask)

    def select(self, idx: torch.Tensor | slice) -> "TokenBatch":
        return TokenBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx],
                          {k: v[idx] for k, v in self.extras.items()})

    def split(self, size: int) -> list["TokenBatch"]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def to(self, device: torch.device) -> "TokenBatch":
        if self.input_ids.device == device:
            return self
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                          {k: v.to(device) for k, v in self.extras.items()})


class TrainableLM(ABC):
    """A policy or a critic with its optimiser; `kind` says which outputs it produces."""

    kind: str  # "policy" or "critic": its outputs are OUTPUTS[kind]
    dp_rank, dp_size = 0, 1  # this process's place among the data-parallel replicas

    @abstractmethod
    def forward(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """Outputs aligned with the response columns, [B, R]; differentiable."""

    def forward_many(self, parts: list[TokenBatch], mine: list[int]) -> list[dict[str, torch.Tensor] | None]:
        """Outputs of the micro-batches `parts[i]`, i in `mine` (this replica's), in order; None
        where this process holds none of them (a pipeline stage before the last)."""
        return [self.forward(parts[i]) for i in mine]

    @torch.no_grad()
    def infer(self, batch: TokenBatch, micro_batch_size: int) -> dict[str, torch.Tensor]:
        """Outputs of the whole batch on the CPU, where the EM loop keeps its tensors. Each
        data-parallel replica runs micro-batches round-robin and writes their rows into a zero
        buffer; a sum over every process fills in the rows of the others (one writer a row)."""
        self.eval()
        keys, parts = OUTPUTS[self.kind], batch.split(micro_batch_size)
        mine = list(range(self.dp_rank, len(parts), self.dp_size))
        got = self.forward_many(parts, mine)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return {k: torch.cat([o[k] for o in got]).float().cpu() for k in keys}
        out = torch.zeros(len(keys), len(batch), batch.response_len, device=process_device())
        for i, outputs in zip(mine, got):
            if outputs is None:
                continue
            for k, key in enumerate(keys):
                out[k, i * micro_batch_size:i * micro_batch_size + len(parts[i])] = outputs[key].float()
        dist.all_reduce(out)
        return dict(zip(keys, out.cpu().unbind(0)))

    @abstractmethod
    def train_step(self, micro_batches: list[TokenBatch], loss_fn: LossFn, lr_scale: float = 1.0) -> dict[str, float]:
        """One optimiser step: accumulate `loss_fn` gradients over the micro-batches, clip, step
        at the configured learning rate times `lr_scale` (a caller's schedule).

        `loss_fn` returns each micro-batch's share of the mini-batch loss (already weighted).
        """

    @abstractmethod
    def eval(self) -> None: ...

    @abstractmethod
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Hugging Face-named full tensors, for rollout engines that hold their own copy."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Weights (safetensors, HF layout) and optimiser state."""

    @abstractmethod
    def load_optimizer(self, path: str) -> None: ...


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums over every process, the same on each (a process may hold some keys, or none:
    a pipeline stage before the last)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    parts: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    totals: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def finish_step(optimizer: torch.optim.Optimizer, optim: Optim, totals: dict[str, float], grad_norm: float,
                finite_loss: bool, lr_scale: float = 1.0) -> dict[str, float]:
    """Step the optimiser at this step's learning rate, unless the loss or the gradient norm is
    not finite: then the gradients are dropped and the optimiser (weights, moments, step
    count) is left untouched."""
    totals["grad_norm"] = grad_norm
    totals["nonfinite"] = float(not (finite_loss and math.isfinite(grad_norm)))
    if totals["nonfinite"]:
        optimizer.zero_grad(set_to_none=True)
        return totals
    # Warm-up counts the optimiser's own steps (kept in its state: a resumed run continues it).
    taken = next((int(state["step"]) for state in optimizer.state.values() if "step" in state), 0)
    lr = lr_scale * (optim.lr * min(1.0, (taken + 1) / optim.warmup_steps) if optim.warmup_steps else optim.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    totals["lr"] = lr
    return totals


def has_value_head(path: str) -> bool:
    """True for a saved critic (a token-classification checkpoint); False for a language
    model, on whose trunk a critic gets a new value head."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForTokenClassification") for a in architectures)
