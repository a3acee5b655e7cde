"""The vLLM engine's own logic (tempo.rollout.vllm) against vLLM's API, with vLLM absent.

A stand-in `vllm` module offers what the engine calls — `LLM.sleep/wake_up/reset_prefix_cache/
apply_model/generate` and `SamplingParams` — and keeps weights as level-1 sleep does: backed up
at sleep, copied back when the weights wake. So a sync loaded before the weights' wake is
silently undone, as on a GPU. Its `LLM` records how start_llm builds it and, unless built with
the external launcher, refuses a function in `apply_model` as vLLM's engine in another process
does.
"""
from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tempo.config import RolloutConfig
from tempo.errors import ConfigError
from tempo.rollout.vllm import VLLMRolloutEngine, buckets, start_llm, vllm_memory_fraction
from tempo.tokenizer import char_tokenizer

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def base_weights() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}


def new_weights() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.full((4, 2), 2.0)}


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

    def __init__(self, weights, answer, in_process: bool = True):
        self.model, self.answer, self.calls, self.backup = StandInModel(weights), answer, [], None
        self.in_process = in_process
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
        if not self.in_process and isinstance(fn, types.FunctionType):
            # vLLM's msgpack encoder, on the way to an engine core in another process
            raise TypeError(f"Object of type {type(fn)} is not serializable. Set "
                            "VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow fallback to pickle-based serialization.")
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


class StandInVLLM(StandInLLM):
    """`vllm.LLM` as start_llm builds it: the keyword arguments are kept. The engine runs in this
    process only under the external launcher; vLLM's default runs it in another one."""

    def __init__(self, **kwargs):
        tok = char_tokenizer()
        super().__init__(base_weights(), [tok.convert_tokens_to_ids(c) for c in "12"],
                         in_process=kwargs.get("distributed_executor_backend") == "external_launcher")
        self.kwargs = kwargs


@pytest.fixture
def vllm_api(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.LLM = StandInVLLM
    monkeypatch.setitem(sys.modules, "vllm", module)


@pytest.fixture
def no_launcher(monkeypatch):
    """A process not started by torchrun; the environment comes back whole after the test."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV})


def engine(answer, **cfg):
    tok = char_tokenizer()
    llm = StandInLLM(base_weights(),
                     [tok.convert_tokens_to_ids(c) for c in answer] if isinstance(answer, str) else answer)
    rollout = RolloutConfig(n=2, max_new_tokens=6, **cfg)
    return VLLMRolloutEngine(rollout, llm, tok, bucket_bytes=40), llm, tok


def test_a_rollout_wakes_loads_resets_generates_and_sleeps_in_order(vllm_api):
    eng, llm, tok = engine("12")
    assert llm.calls == [("sleep", 1)]  # asleep from the start: training has the GPU
    new = new_weights()
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
    # No request seed: vLLM would sample such requests one by one; its seeded generator samples.
    assert not hasattr(params, "seed")


def test_seed_requests_gives_each_call_its_own_seed_from_the_trainers_rng(vllm_api):
    """The reproducible mode: one seed a call, drawn from torch's RNG (which checkpoints keep)."""
    eng, llm, _ = engine("4", seed_requests=True)
    for _ in range(2):
        torch.manual_seed(0)
        eng.generate(["1+1="], 2)
        eng.generate(["1+1="], 2)
    seeds = [p.seed for p in llm.params]
    assert seeds[:2] == seeds[2:] and seeds[0] != seeds[1]


def test_a_prompt_over_max_prompt_tokens_is_named(vllm_api):
    eng, llm, _ = engine("1", max_prompt_tokens=3)
    with pytest.raises(ConfigError, match="rollout.max_prompt_tokens: a prompt has 5 tokens"):
        eng.generate(["12+3="], 2)
    assert llm.calls[-1] == ("sleep", 1)  # back asleep: training gets its memory back


def test_a_failed_weight_load_still_puts_the_engine_to_sleep(vllm_api):
    """A sync that fails half-way must not leave vLLM awake, holding the memory training needs."""
    eng, llm, _ = engine("1")

    def broken(items):
        raise RuntimeError("no such parameter")

    llm.model.load_weights = broken
    eng.sync_weights(iter(new_weights().items()))
    with pytest.raises(RuntimeError, match="no such parameter"):
        eng.generate(["1+1="], 2)
    assert llm.calls[-1] == ("sleep", 1) and not any(llm.awake.values())


def test_start_llm_runs_vllm_in_this_process_without_torchrun(vllm_api, no_launcher):
    """vLLM's default at world size 1 puts the engine in another process, where apply_model
    cannot send the weight-loading function: the external launcher keeps it here."""
    llm = start_llm(RolloutConfig(), "/models/policy", tensor_parallel=1, dtype="bfloat16", seed=7)
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    # log-probs after temperature, as the trainer computes them (vLLM's default: before)
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert [os.environ[k] for k in LAUNCH_ENV[:4]] == ["0", "0", "1", "127.0.0.1"]
    assert int(os.environ["MASTER_PORT"]) > 0
    # The weights reach the engine started so (the stand-in refuses a function across processes).
    eng = VLLMRolloutEngine(RolloutConfig(n=2, max_new_tokens=6), llm, char_tokenizer(), bucket_bytes=40)
    eng.sync_weights(iter(new_weights().items()))
    eng.generate(["1+1="], 2)
    assert torch.equal(llm.generated_with[0]["lm_head.weight"], new_weights()["lm_head.weight"])
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        StandInVLLM(distributed_executor_backend=None).apply_model(lambda model: None)


def test_start_llm_keeps_torchruns_variables(vllm_api, no_launcher):
    os.environ.update(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="10.0.0.2", MASTER_PORT="29501")
    start_llm(RolloutConfig(), "/models/policy", tensor_parallel=2, dtype="bfloat16", seed=7)
    assert [os.environ[k] for k in LAUNCH_ENV] == ["3", "1", "4", "10.0.0.2", "29501"]


@pytest.mark.parametrize("free_gib, share", [(100, 0.5), (40, 0.95 * 40 / 140)])
def test_start_llm_asks_for_no_more_than_is_free(vllm_api, no_launcher, monkeypatch, caplog, free_gib, share):
    """The trainer's models are on the GPU before vLLM starts: its share is lowered, and said."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_gib * 2**30, 140 * 2**30))
    with caplog.at_level("WARNING", logger="tempo"):
        llm = start_llm(RolloutConfig(gpu_memory_utilization=0.5), "/models/policy", tensor_parallel=1,
                        dtype="bfloat16", seed=7)
    assert llm.kwargs["gpu_memory_utilization"] == pytest.approx(share)
    lowered = [r.getMessage() for r in caplog.records if "rollout.gpu_memory_utilization" in r.getMessage()]
    assert len(lowered) == (share < 0.5)


def test_vllm_gets_at_most_95_percent_of_the_free_memory():
    """vLLM refuses to start unless its share of the GPU is free; the trainer's models hold the rest."""
    gib = 2**30
    assert vllm_memory_fraction(0.5, free=100 * gib, total=140 * gib) == 0.5  # room enough: as asked
    assert vllm_memory_fraction(0.5, free=40 * gib, total=140 * gib) == pytest.approx(0.95 * 40 / 140)
    assert vllm_memory_fraction(0.3, free=0, total=140 * gib) == 0.0
