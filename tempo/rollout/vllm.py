"""Rollout with vLLM, colocated with training (`rollout.engine=vllm`; `pip install .[gpu]`).

vLLM sleeps between rollouts (level 1: weights backed up to CPU memory, KV cache dropped), so
training has the GPU. A rollout:

  wake the weights -> load the policy's new weights, bucket by bucket, through the model's own
  `load_weights` (HF names; vLLM fuses q/k/v and gate/up itself) -> reset the prefix cache
  (its entries were computed by the old weights) -> wake the KV cache -> generate -> sleep.

`sync_weights` only records the new weights; they are loaded at the next wake, after the
weights' wake: waking copies vLLM's CPU backup back, so weights loaded before it would be
silently replaced by the base model's (the pitfall tests/test_vllm_engine.py checks).

vLLM always runs inside the training process (`distributed_executor_backend="external_launcher"`,
also without torchrun): its default runs the engine in another process, where `apply_model`
cannot send a function and every weight bucket would be pickled across. Under torchrun each
tensor-parallel group of ranks (the trainer's TP size) shares one engine, and
tempo.rollout.parallel.DataParallelRollout gives each engine its slice of a call's prompts and
seeds its sampling (vLLM's seeded generator: per-request seeds only with
`rollout.seed_requests`). The engine returns the token ids and each sampled token's log-prob.

Written against vLLM's documented `LLM` API (sleep, wake_up with tags, reset_prefix_cache,
apply_model, generate with SamplingParams); never run on a GPU here.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator

import torch

from tempo.config import RolloutConfig
from tempo.dist import _free_port
from tempo.errors import ConfigError
from tempo.rollout.base import RolloutEngine, Rollouts, check_prompt_lengths, pad_responses

log = logging.getLogger("tempo")

BUCKET_BYTES = 512 << 20


def buckets(weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) pairs in their order, grouped into lists of at most `max_bytes` (a larger
    tensor is a bucket of its own): the memory a sync holds at once is one bucket."""
    bucket, size = [], 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def vllm_memory_fraction(asked: float, free: int, total: int) -> float:
    """vLLM's share of the GPU: the one asked for, but at most 95% of what is free. vLLM refuses to
    start unless that much of the GPU is free, and the trainer's models are already on it."""
    return min(asked, 0.95 * free / total)


def start_llm(cfg: RolloutConfig, model_path: str, *, tensor_parallel: int, dtype: str, seed: int):
    try:
        from vllm import LLM
    except ImportError as err:
        raise ConfigError("rollout.engine: vllm is not installed (pip install .[gpu], on a GPU machine)") from err
    # The external launcher reads torchrun's variables; a one-process run is a world of one.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    share = cfg.gpu_memory_utilization
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        share = vllm_memory_fraction(cfg.gpu_memory_utilization, free, total)
        if share < cfg.gpu_memory_utilization:
            log.warning("rollout.gpu_memory_utilization: %.2f asked, but %.1f of %.1f GiB is free beside the "
                        "trainer's models; vLLM gets %.2f", cfg.gpu_memory_utilization, free / 2**30,
                        total / 2**30, share)
    return LLM(model=model_path, tensor_parallel_size=tensor_parallel, dtype=dtype, seed=seed,
               gpu_memory_utilization=share, enable_sleep_mode=True,
               enable_prefix_caching=True, max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
               logprobs_mode="processed_logprobs",  # after temperature, as the trainer's (default: before)
               distributed_executor_backend="external_launcher")


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, cfg: RolloutConfig, llm, tokenizer, bucket_bytes: int = BUCKET_BYTES):
        super().__init__(cfg)
        self.llm, self.tokenizer, self.bucket_bytes = llm, tokenizer, bucket_bytes
        self.pending: Iterable[tuple[str, torch.Tensor]] | None = None
        self.llm.sleep(level=1)

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Recorded, loaded at the next wake (see the module's docstring). Under Megatron the
        export is a collective generator: every rank consumes it at the same point, the next
        rollout."""
        self.pending = weights

    def _load_pending(self) -> None:
        if self.pending is None:
            return
        for bucket in buckets(self.pending, self.bucket_bytes):
            self.llm.apply_model(lambda model, b=bucket: model.load_weights(b))
        self.pending = None

    def generate(self, prompts: list[str], n: int, *, temperature: float | None = None) -> Rollouts:
        from vllm import SamplingParams

        self.llm.wake_up(tags=["weights"])
        try:  # whatever fails, the engine goes back to sleep: training needs the memory back
            self._load_pending()
            self.llm.reset_prefix_cache()
            self.llm.wake_up(tags=["kv_cache"])
            # A request's own seed sends vLLM down its slow per-request sampling path; without one
            # vLLM draws from torch's generator of the GPU (in this process: seeded with the LLM's
            # seed at start, and per call and DP rank by DataParallelRollout).
            # With seed_requests, a call's seed is a draw of the trainer's torch RNG: a checkpoint
            # replays it, and evaluation (on a forked generator) leaves training's draws alone.
            request_seed = {"seed": int(torch.randint(2**31 - 1, ()))} if self.cfg.seed_requests else {}
            params = SamplingParams(
                n=n, temperature=self.cfg.temperature if temperature is None else temperature, top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens, min_tokens=self.cfg.min_new_tokens, logprobs=0, **request_seed)
            ids = [self.tokenizer(p).input_ids for p in prompts]  # as the HF engine tokenizes
            check_prompt_lengths([len(x) for x in ids], prompts, self.cfg.max_prompt_tokens)
            outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        return self._rollouts(ids, outputs, n)

    def _rollouts(self, prompt_ids: list[list[int]], outputs, n: int) -> Rollouts:
        """vLLM's outputs as left-padded prompts, right-padded responses and their log-probs."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(map(len, prompt_ids))
        prompts = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            prompts[i, width - len(ids):], prompt_mask[i, width - len(ids):] = torch.tensor(ids), 1
        samples = [s for out in outputs for s in out.outputs]
        if len(samples) != len(prompt_ids) * n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for {len(prompt_ids)} prompts × {n}")
        rows = [list(s.token_ids) for s in samples]
        ids, mask, truncated = pad_responses(rows, eos, pad, self.cfg.max_new_tokens)
        logprobs = torch.zeros(ids.shape)
        for i, s in enumerate(samples):
            for t, (token, entry) in enumerate(zip(s.token_ids, s.logprobs or [])):
                if t < ids.shape[1] and mask[i, t]:
                    logprobs[i, t] = entry[token].logprob
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return Rollouts(prompts.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, logprobs,
                        texts, truncated)
