"""The vLLM engine's own logic (tempo.rollout.vllm) against vLLM's API, with vLLM absent.

A stand-in `vllm` module offers what the engine calls — `LLM.sleep/wake_up/reset_prefix_cache/
apply_model/generate` and `SamplingParams` — and keeps weights as level-1 sleep does: backed up
at sleep, copied back when the weights wake. So a sync loaded before the weights' wake is
silently undone, as on a GPU.
"""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tempo.config import RolloutConfig
from tempo.errors import ConfigError
from tempo.rollout.vllm import VLLMRolloutEngine, buckets
from tempo.tokenizer import char_tokenizer


class StandInModel:
    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.loads: list[list[str]] = []

    def load_weights(self, items):
        self.loads.append([name for name, _ in items])
        for name, tensor in items:
            self.weights[name] = tensor.clone()


class StandInLLM:
    """Sleep/wake bookkeeping of vLLM's level-1 sleep; generate answers every prompt with
    `answer` (token ids) and log-prob -0.5·(t+1) for its t-th token."""

    def __init__(self, weights, answer):
        self.model, self.answer, self.calls, self.backup = StandInModel(weights), answer, [], None
        self.awake = {"weights": True, "kv_cache": True}
        self.generated_with: list[dict] = []
        self.params: list = []

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.backup = {k: v.clone() for k, v in self.model.weights.items()}
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))
        if "weights" in tags:
            self.model.weights = {k: v.clone() for k, v in self.backup.items()}
        for tag in tags:
            self.awake[tag] = True

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def apply_model(self, fn):
        assert self.awake["weights"], "weights loaded into a sleeping engine"
        self.calls.append(("apply_model",))
        return [fn(self.model)]

    def generate(self, prompts, params, use_tqdm=True):
        assert all(self.awake.values()), "generate on a sleeping engine"
        self.calls.append(("generate",))
        self.params.append(params)
        self.generated_with.append({k: v.clone() for k, v in self.model.weights.items()})
        sample = SimpleNamespace(token_ids=list(self.answer),
                                 logprobs=[{tok: SimpleNamespace(logprob=-0.5 * (t + 1))}
                                           for t, tok in enumerate(self.answer)])
        return [SimpleNamespace(outputs=[sample] * params.n) for _ in prompts]


@pytest.fixture
def vllm_api(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)


def engine(answer, **cfg):
    tok = char_tokenizer()
    base = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    llm = StandInLLM(base, [tok.convert_tokens_to_ids(c) for c in answer] if isinstance(answer, str) else answer)
    rollout = RolloutConfig(n=2, max_new_tokens=6, **cfg)
    return VLLMRolloutEngine(rollout, llm, tok, seed=7, bucket_bytes=40), llm, tok


def test_a_rollout_wakes_loads_resets_generates_and_sleeps_in_order(vllm_api):
    eng, llm, tok = engine("12")
    assert llm.calls == [("sleep", 1)]  # asleep from the start: training has the GPU
    new = {"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.full((4, 2), 2.0)}
    eng.sync_weights(iter(new.items()))
    assert llm.calls == [("sleep", 1)]  # a sync only records the weights
    eng.generate(["1+1="], 2)
    assert llm.calls[1:] == [("wake_up", ("weights",)), ("apply_model",), ("apply_model",), ("reset_prefix_cache",),
                             ("wake_up", ("kv_cache",)), ("generate",), ("sleep", 1)]
    # The pitfall: the weights generated with are the synced ones, not the base model's backup.
    for name, value in new.items():
        assert torch.equal(llm.generated_with[0][name], value), name
    eng.generate(["1+1="], 2)  # no new sync: nothing loaded, and the synced weights survive the sleep
    assert ("apply_model",) not in llm.calls[8:]
    assert torch.equal(llm.generated_with[1]["lm_head.weight"], new["lm_head.weight"])


def test_weights_load_in_order_in_buckets_of_bounded_size():
    weights = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([3, 4, 10, 1, 1, 2])]  # float32: 4 bytes each
    got = list(buckets(weights, max_bytes=20))
    assert [[name for name, _ in b] for b in got] == [["w0"], ["w1"], ["w2"], ["w3", "w4", "w5"]]
    assert [n for b in got for n, _ in b] == [n for n, _ in weights]
    # a tensor over the limit travels alone; every other bucket stays within it
    assert all(sum(t.numel() * 4 for _, t in b) <= 20 or len(b) == 1 for b in got)


def test_rollouts_carry_ids_masks_and_the_sampled_tokens_log_probs(vllm_api):
    tok = char_tokenizer()
    eos = tok.eos_token_id
    answer = [tok.convert_tokens_to_ids("4"), eos, tok.convert_tokens_to_ids("9")]  # a token after EOS
    eng, llm, _ = engine(answer)
    out = eng.generate(["1+1=", "12+3="], 2, temperature=0.5)
    assert out.prompt_ids.shape == (4, 5) and out.prompt_mask[0].tolist() == [0, 1, 1, 1, 1]
    assert out.response_mask.tolist() == [[1, 1, 0]] * 4  # up to and including EOS
    torch.testing.assert_close(out.logprobs, torch.tensor([[-0.5, -1.0, 0.0]] * 4))
    assert out.texts == ["4"] * 4 and not out.truncated.any()
    params = llm.params[0]
    assert (params.n, params.temperature, params.max_tokens, params.logprobs) == (2, 0.5, 6, 0)
    eng.generate(["1+1="], 2)
    assert [p.seed for p in llm.params] == [7, 8]  # one seed a call, the same on every rank


def test_a_prompt_over_max_prompt_tokens_is_named(vllm_api):
    eng, llm, _ = engine("1", max_prompt_tokens=3)
    with pytest.raises(ConfigError, match="rollout.max_prompt_tokens: a prompt has 5 tokens"):
        eng.generate(["12+3="], 2)
    assert llm.calls[-1] == ("sleep", 1)  # back asleep: training gets its memory back
