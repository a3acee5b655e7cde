"""Rollout with Hugging Face `generate` (KV cache), for CPU runs and small models."""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
from transformers import DynamicCache, GenerationConfig

from tempo.config import RolloutConfig
from tempo.models.base import left_padded_positions, with_cache
from tempo.rollout.base import RolloutEngine, Rollouts, check_prompt_lengths, pad_responses

log = logging.getLogger("tempo")


class HFRolloutEngine(RolloutEngine):
    """Generates with the policy's own module, so weight sync after an M-step is free."""

    def __init__(self, cfg: RolloutConfig, module: torch.nn.Module, tokenizer, batch_size: int = 1024,
                 share_prompts: bool = True, compute_dtype: torch.dtype = torch.float32):
        super().__init__(cfg)
        self.module, self.tokenizer, self.batch_size = module, tokenizer, batch_size
        self.share_prompts = share_prompts
        # The policy's own module keeps fp32 master weights: sample in the compute dtype, as the
        # trainer's forward does (a no-op for a sampler loaded in that dtype).
        self.compute_dtype = compute_dtype

    def _generation_config(self, temperature: float) -> GenerationConfig:
        # top_k=0 explicitly: generate's default (50) would truncate the distribution.
        return GenerationConfig(
            do_sample=True, temperature=temperature, top_p=self.cfg.top_p, top_k=0,
            max_new_tokens=self.cfg.max_new_tokens, min_new_tokens=self.cfg.min_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, *, temperature: float | None = None) -> Rollouts:
        with torch.autocast(self.module.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            return self._generate(prompts, n, temperature)

    def _generate(self, prompts: list[str], n: int, temperature: float | None) -> Rollouts:
        temperature = self.cfg.temperature if temperature is None else temperature
        self.module.eval()
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.module.device)
        check_prompt_lengths(enc.attention_mask.sum(-1).tolist(), prompts, self.cfg.max_prompt_tokens)
        prompt_ids = enc.input_ids.repeat_interleave(n, 0)
        prompt_mask = enc.attention_mask.repeat_interleave(n, 0)
        gen_cfg = self._generation_config(temperature)
        rows = []
        per_call = max(1, self.batch_size // n)  # prompts per generate call
        started = shown = time.perf_counter()
        for start in range(0, len(prompts), per_call):
            if time.perf_counter() - shown > 30:  # a long roll-out (stage 1's pool) says where it is
                shown = time.perf_counter()
                log.info("rollout: %d of %d prompts, %.0fs", start, len(prompts), shown - started)
            sl = slice(start * n, (start + per_call) * n)
            cache = self._prompt_cache(enc.input_ids[start:start + per_call],
                                       enc.attention_mask[start:start + per_call], n)
            out = self.module.generate(input_ids=prompt_ids[sl], attention_mask=prompt_mask[sl],
                                       generation_config=gen_cfg, **with_cache(self.module.forward, cache))
            rows += out[:, prompt_ids.shape[1]:].tolist()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids, mask, truncated = pad_responses(rows, eos, pad, self.cfg.max_new_tokens)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompt_ids, prompt_mask = prompt_ids.cpu(), prompt_mask.cpu()  # the loop's tensors live on the CPU
        # No sampling log-probs: asking generate for them keeps [rows, tokens, vocab] logits, the
        # tensor the fused log-prob kernel exists to avoid; the trainer recomputes them anyway.
        return Rollouts(prompt_ids, prompt_mask, ids, mask, None, texts, truncated)

    def _prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> DynamicCache | None:
        """The KV cache of each prompt but its last token, computed once and repeated for its n
        samples; generate then starts from the last prompt token (same tokens, same RNG draws)."""
        if not self.share_prompts or n == 1 or ids.shape[1] < 2:
            return None
        cache = DynamicCache(config=self.module.config)
        head, head_mask = ids[:, :-1], mask[:, :-1]
        self.module.model(input_ids=head, attention_mask=head_mask, position_ids=left_padded_positions(head_mask),
                          **with_cache(self.module.model.forward, cache), use_cache=True)
        cache.batch_repeat_interleave(n)
        return cache

    @torch.no_grad()
    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensor by tensor (memory bounded by one export bucket); a no-op when the
        engine generates with the policy's own module."""
        own = self.module.state_dict()
        for name, tensor in weights:
            if own[name].data_ptr() != tensor.data_ptr():
                own[name].copy_(tensor)
