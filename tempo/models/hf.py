"""Hugging Face backend: any `AutoModelForCausalLM` checkpoint (Qwen3, OLMo3, ...), in one
process or sharded with FSDP2 under torchrun.

The policy never materialises [tokens, vocab] logits: it takes the trunk's hidden states
and the LM head's weight to the fused log-prob op. The critic is the same trunk with a
one-label token-classification head (`AutoModelForTokenClassification`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, DynamicCache
from transformers.modeling_layers import GenericForTokenClassification
from transformers.models.olmo3 import Olmo3Config, Olmo3PreTrainedModel
from transformers.utils import logging as hf_logging

import tempo_kernels
from tempo.config import Optim
from tempo.dist import device as process_device
from tempo.models.base import (LossFn, TokenBatch, TrainableLM, enable_recompute, finish_step, left_padded_positions,
                               sum_over_processes, with_cache)

OPTIMIZER_FILE = "optimizer.pt"


class Olmo3ForTokenClassification(GenericForTokenClassification, Olmo3PreTrainedModel):
    """The critic's class for OLMo3 (transformers has none): its trunk and a per-token head,
    as every model's `...ForTokenClassification`."""


AutoModelForTokenClassification.register(Olmo3Config, Olmo3ForTokenClassification, exist_ok=True)


def load_policy_module(path: str, dtype: torch.dtype, attn: str = "sdpa") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def load_critic_module(path: str, dtype: torch.dtype, init_from_policy: bool, attn: str = "sdpa") -> torch.nn.Module:
    """A critic checkpoint, or a new value head on the policy's trunk (`init_from_policy`)."""
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_labels = 1  # passing num_labels= to from_pretrained fails in transformers 5
    cfg.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    if init_from_policy:  # the head is missing from a policy checkpoint by design: no load report
        hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng():  # a new head's random init must not shift the sampling RNG
            module = AutoModelForTokenClassification.from_pretrained(path, config=cfg, dtype=dtype,
                                                                     attn_implementation=attn)
    finally:
        hf_logging.set_verbosity(verbosity)
    if init_from_policy:
        # A fresh head predicts 0 = "as likely right as wrong" until the E-step trains it.
        torch.nn.init.zeros_(module.score.weight)
        if module.score.bias is not None:
            torch.nn.init.zeros_(module.score.bias)
    return module


class Scorer(torch.nn.Module):
    """Per-token log-probs (policy) or values (critic) of the response columns from one HF
    module. A module of its own so that FSDP2's hooks wrap the whole computation (the trunk is
    called directly and the LM head's weight read as a tensor, bypassing the HF module's forward)."""

    def __init__(self, module: torch.nn.Module, kind: str, temperature: float, share_prompts: bool, kernels: str):
        super().__init__()
        self.module, self.kind, self.temperature, self.share_prompts = module, kind, temperature, share_prompts
        self.kernels = kernels  # the tempo_kernels implementation (model.kernels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int):
        B, R = input_ids.shape[0], response_len
        # Response token t is scored from the state before it (position p predicts token p+1):
        # its log-prob, and its value V(x, y_<t), the critic's estimate before t is chosen.
        h = self._scoring_states(input_ids, attention_mask, R)
        if self.kind == "critic":
            return {"values": self.module.score(h).squeeze(-1).float()}
        h = h.reshape(B * R, -1)
        labels = input_ids[:, -R:].reshape(-1)
        logp, entropy = tempo_kernels.linear_logprob(h, self.module.lm_head.weight, labels,
                                                     self.temperature, with_entropy=True, backend=self.kernels)
        return {"logp": logp.view(B, R), "entropy": entropy.view(B, R)}

    def _scoring_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int) -> torch.Tensor:
        """The trunk's hidden states at the R positions that score the response, [B, R, H]."""
        trunk = self.module.model  # Qwen3Model / Olmo3Model: the shared transformer body
        P = input_ids.shape[1] - R
        positions = left_padded_positions(attention_mask)
        if self.share_prompts and P > 0:
            prompts, inverse = torch.unique(torch.cat([input_ids[:, :P], attention_mask[:, :P]], 1),
                                            dim=0, return_inverse=True)
        if not self.share_prompts or P == 0 or len(prompts) == len(input_ids):
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
            return hidden[:, -R - 1:-1]
        # The n responses of a prompt share it: run each distinct prompt once, give every row
        # its prompt's keys and values (gradients add up through the index), then run the
        # responses on top. Same function, P·(rows − prompts) fewer token-forwards.
        cache = DynamicCache(config=trunk.config)
        prompt_mask = prompts[:, P:]
        head = trunk(input_ids=prompts[:, :P], attention_mask=prompt_mask,
                     position_ids=left_padded_positions(prompt_mask), **with_cache(trunk.forward, cache),
                     use_cache=True).last_hidden_state
        cache.batch_select_indices(inverse)
        tail = trunk(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=positions[:, P:],
                     **with_cache(trunk.forward, cache), use_cache=True).last_hidden_state
        return torch.cat([head[inverse, -1:], tail[:, :-1]], 1)


class HFModel(TrainableLM):
    """One HF module and its AdamW. Under torchrun (`data_parallel`) FSDP2 shards weights,
    gradients and optimiser state over every rank (each decoder layer a unit, the rest the
    root), and the ranks split each step's micro-batches; `cpu_offload` keeps the shards in
    host memory (over one rank too)."""

    def __init__(self, module: torch.nn.Module, kind: str, optim: Optim, temperature: float = 1.0,
                 share_prompts: bool = False, recompute: str = "none", data_parallel: bool = False,
                 compute_dtype: torch.dtype = torch.float32, cpu_offload: bool = False, kernels: str = "auto"):
        assert kind in ("policy", "critic")
        self.device = process_device()  # the loop's tensors stay on the CPU; each batch moves here
        # Offloaded, FSDP2 moves each unit to the GPU as it shards it, then its shard to the host:
        # the whole fp32 model never sits on the GPU at once.
        self.module, self.kind = (module if cpu_offload else module.to(self.device)), kind
        if recompute == "full":  # each layer's input kept, the rest recomputed in backward
            enable_recompute(module)
        # A recomputed layer would write the shared prompt's KV cache a second time; under FSDP2
        # every rank must run its units as often as the others, which the shared path (two
        # passes, or one when a micro-batch has no repeated prompt) does not guarantee.
        self.scorer = Scorer(module, kind, temperature, share_prompts and recompute == "none" and not data_parallel,
                             kernels)
        self.grad_clip, self.optim = optim.grad_clip, optim
        self.dp_size = dist.get_world_size() if data_parallel else 1
        self.sharded = data_parallel  # FSDP2, also over one rank (cpu_offload)
        self.dp_rank = dist.get_rank() if data_parallel else 0
        # Mixed precision: the weights (and so AdamW's update) stay in their dtype, fp32 from
        # build: the master copy that a 1e-6 learning rate needs (bf16 would round it away);
        # matmuls run in compute_dtype (FSDP2 casts its gathered shards; one process autocasts).
        self.autocast = compute_dtype != torch.float32 and not data_parallel
        self.compute_dtype = compute_dtype
        if data_parallel:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
            # offloaded: sharded weights, gradients and AdamW state in (pinned) host memory
            offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
            units = [fully_shard(layer, mp_policy=mp, offload_policy=offload) for layer in module.model.layers]
            units.append(fully_shard(self.scorer, mp_policy=mp, offload_policy=offload))
            for unit in units:
                # The loop's micro-batch losses are shares of the mini-batch loss: sum, do not
                # average (as plain SUMs: gloo has no pre-scaled sum).
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        # fused: one kernel for every parameter (CPU and CUDA), 5x faster than the loop on CPU
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                           betas=optim.betas, eps=optim.eps, fused=True)

    def forward(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
            return self.scorer(batch.input_ids, batch.attention_mask, batch.response_len)

    def _my_micro_batches(self, micro_batches: list[TokenBatch]) -> list[tuple[int, TokenBatch]]:
        """This rank's (index, micro-batch) pairs, round-robin; every rank gets as many (index -1:
        a stand-in that runs for the collectives and counts for nothing)."""
        per_rank = -(-len(micro_batches) // self.dp_size)
        out = []
        for i in range(per_rank):
            j = self.dp_rank + i * self.dp_size
            out.append((j, micro_batches[j]) if j < len(micro_batches) else (-1, micro_batches[0]))
        return out

    def forward_many(self, parts: list[TokenBatch], mine: list[int]) -> list[dict[str, torch.Tensor]]:
        """FSDP2's gathers are collectives: a rank with fewer micro-batches than another runs
        stand-ins (the first micro-batch again, its outputs dropped) until they have run as many."""
        outputs = [(j, self.forward(mb)) for j, mb in self._my_micro_batches(parts)]
        return [out for j, out in outputs if j >= 0]  # the indices of `mine`, in order

    def train_step(self, micro_batches: list[TokenBatch], loss_fn: LossFn, lr_scale: float = 1.0) -> dict[str, float]:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        mine = self._my_micro_batches(micro_batches) if self.dp_size > 1 else list(enumerate(micro_batches))
        for j, mb in mine:
            mb = mb.to(self.device)  # the loss reads the micro-batch's extras beside the outputs
            loss, stats = loss_fn(self.forward(mb), mb)
            if j < 0:  # a stand-in: it runs for FSDP2's collectives and counts for nothing
                loss = loss * 0.0
            else:
                finite &= bool(torch.isfinite(loss))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            loss.backward()
        if self.dp_size > 1:  # every rank takes the same decision on the same numbers
            sums = sum_over_processes(sums | {"nonfinite_micro_batches": float(not finite)})
            finite = sums.pop("nonfinite_micro_batches") == 0
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        totals = {k: v / len(micro_batches) for k, v in sums.items()}
        return finish_step(self.optimizer, self.optim, totals, float(grad_norm), finite, lr_scale)

    def eval(self) -> None:
        self.module.eval()

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors; under FSDP2 gathered from the shards (a collective: every rank iterates)."""
        for name, tensor in self.module.state_dict().items():
            yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def _optimizer_file(self, path: str) -> Path:
        return Path(path) / (f"optimizer_rank{self.dp_rank}.pt" if self.sharded else OPTIMIZER_FILE)

    def save(self, path: str) -> None:
        """HF layout (rank 0) and the optimiser state (each rank its shard). Under FSDP2 the full
        weights are gathered tensor by tensor into rank 0's CPU memory (the other ranks get an
        empty dict): the whole fp32 model on every rank's GPU would not fit beside training."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        else:
            weights = dict(self.export_weights())
        Path(path).mkdir(parents=True, exist_ok=True)
        if self.dp_rank == 0:
            self.module.save_pretrained(path, state_dict=weights)
        torch.save(self.optimizer.state_dict(), self._optimizer_file(path))
        if self.dp_size > 1:
            dist.barrier()

    def load_optimizer(self, path: str) -> None:
        file = self._optimizer_file(path)
        if file.is_file():
            self.optimizer.load_state_dict(torch.load(file, weights_only=not self.sharded))  # DTensor state otherwise
