"""Hugging Face backend: one process, any `AutoModelForCausalLM` checkpoint (Qwen3, OLMo3, ...).

The policy never materialises [tokens, vocab] logits: it takes the trunk's hidden states
and the LM head's weight to the fused log-prob op. The critic is the same trunk with a
one-label token-classification head (`AutoModelForTokenClassification`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, DynamicCache
from transformers.modeling_layers import GenericForTokenClassification
from transformers.models.olmo3 import Olmo3Config, Olmo3PreTrainedModel
from transformers.utils import logging as hf_logging

import tempo_kernels
from tempo.config import Optim
from tempo.models.base import LossFn, TokenBatch, TrainableLM, finish_step

OPTIMIZER_FILE = "optimizer.pt"


class Olmo3ForTokenClassification(GenericForTokenClassification, Olmo3PreTrainedModel):
    """The critic's class for OLMo3 (transformers has none): its trunk and a per-token head,
    as every model's `...ForTokenClassification`."""


AutoModelForTokenClassification.register(Olmo3Config, Olmo3ForTokenClassification, exist_ok=True)


def load_policy_module(path: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_critic_module(path: str, dtype: torch.dtype, init_from_policy: bool) -> torch.nn.Module:
    """A critic checkpoint, or a new value head on the policy's trunk (`init_from_policy`)."""
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_labels = 1  # passing num_labels= to from_pretrained fails in transformers 5
    cfg.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    if init_from_policy:  # the head is missing from a policy checkpoint by design: no load report
        hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng():  # a new head's random init must not shift the sampling RNG
            module = AutoModelForTokenClassification.from_pretrained(path, config=cfg, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if init_from_policy:
        # A fresh head predicts 0 = "as likely right as wrong" until the E-step trains it.
        torch.nn.init.zeros_(module.score.weight)
        if module.score.bias is not None:
            torch.nn.init.zeros_(module.score.bias)
    return module


class HFModel(TrainableLM):
    def __init__(self, module: torch.nn.Module, kind: str, optim: Optim, temperature: float = 1.0,
                 share_prompts: bool = False, recompute: str = "none"):
        assert kind in ("policy", "critic")
        self.module, self.kind = module, kind
        if recompute == "full":  # each layer's input kept, the rest recomputed in backward
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # A recomputed layer would write the shared prompt's KV cache a second time.
        self.share_prompts = share_prompts and recompute == "none"
        self.temperature, self.grad_clip = temperature, optim.grad_clip
        # fused: one kernel for every parameter (CPU and CUDA), 5x faster than the loop on CPU
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                           betas=optim.betas, fused=True)

    def forward(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        B, R = len(batch), batch.response_len
        # Response token t is scored from the state before it (position p predicts token p+1):
        # its log-prob, and its value V(x, y_<t), the critic's estimate before t is chosen.
        h = self._scoring_states(batch)
        if self.kind == "critic":
            return {"values": self.module.score(h).squeeze(-1).float()}
        h = h.reshape(B * R, -1)
        labels = batch.input_ids[:, -R:].reshape(-1)
        logp, entropy = tempo_kernels.linear_logprob(h, self.module.lm_head.weight, labels,
                                                     self.temperature, with_entropy=True)
        return {"logp": logp.view(B, R), "entropy": entropy.view(B, R)}

    def _scoring_states(self, batch: TokenBatch) -> torch.Tensor:
        """The trunk's hidden states at the R positions that score the response, [B, R, H]."""
        trunk = self.module.model  # Qwen3Model / Olmo3Model: the shared transformer body
        R = batch.response_len
        P = batch.input_ids.shape[1] - R
        positions = batch.position_ids()
        prompts, inverse = torch.unique(torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], 1),
                                        dim=0, return_inverse=True)
        if not self.share_prompts or P == 0 or len(prompts) == len(batch):
            hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=positions).last_hidden_state
            return hidden[:, -R - 1:-1]
        # The n responses of a prompt share it: run each distinct prompt once, give every row
        # its prompt's keys and values (gradients add up through the index), then run the
        # responses on top. Same function, P·(rows − prompts) fewer token-forwards.
        cache = DynamicCache(config=trunk.config)
        prompt_mask = prompts[:, P:]
        head = trunk(input_ids=prompts[:, :P], attention_mask=prompt_mask,
                     position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                     use_cache=True).last_hidden_state
        cache.batch_select_indices(inverse)
        tail = trunk(input_ids=batch.input_ids[:, P:], attention_mask=batch.attention_mask,
                     position_ids=positions[:, P:], past_key_values=cache, use_cache=True).last_hidden_state
        return torch.cat([head[inverse, -1:], tail[:, :-1]], 1)

    def train_step(self, micro_batches: list[TokenBatch], loss_fn: LossFn) -> dict[str, float]:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        finite = True
        for mb in micro_batches:
            loss, stats = loss_fn(self.forward(mb), mb)
            finite &= bool(torch.isfinite(loss))
            loss.backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        return finish_step(self.optimizer, totals, grad_norm, finite)

    def eval(self) -> None:
        self.module.eval()

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.module.state_dict().items()

    def save(self, path: str) -> None:
        self.module.save_pretrained(path)
        torch.save(self.optimizer.state_dict(), Path(path) / OPTIMIZER_FILE)

    def load_optimizer(self, path: str) -> None:
        file = Path(path) / OPTIMIZER_FILE
        if file.is_file():
            self.optimizer.load_state_dict(torch.load(file, weights_only=True))
