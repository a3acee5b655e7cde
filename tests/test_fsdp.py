"""The HF backend under torchrun: FSDP2 shards policy and critic over two gloo processes and
splits the micro-batches; one optimiser step must give what one process gives, offloaded to
host memory (model.cpu_offload) too."""
from __future__ import annotations

import pytest
import torch

from helpers import TOL, assert_same_run, torchrun
from torchrun_megatron import token_batch

WORKER = "torchrun_fsdp.py"


@pytest.fixture(scope="module")
def runs(ckpts) -> dict[int, dict]:
    out = {}
    for name, nproc, extra in ((1, 1, []), (2, 2, []), ("offload", 1, ["--cpu-offload"])):
        target = ckpts["root"] / f"fsdp{name}.pt"
        torchrun(nproc, "--policy", str(ckpts["untied"]), "--critic", str(ckpts["critic"]), "--out", str(target),
                 "--save", str(ckpts["root"] / f"fsdp{name}"), *extra, worker=WORKER)
        out[name] = torch.load(target, weights_only=False)
    return out


def test_two_fsdp2_processes_match_one(runs):
    assert runs[2]["sharded"] and not runs[1]["sharded"]
    assert_same_run(runs[2], runs[1])
    # one micro-batch for two ranks: the second runs a stand-in for FSDP2's gathers, writes nothing
    valid = token_batch().response_mask.bool()
    diff = (runs[2]["one_micro_batch_infer"]["values"] - runs[1]["one_micro_batch_infer"]["values"])[valid]
    assert diff.abs().max() < TOL
    one, two = runs[1]["one_micro_batch_step"], runs[2]["one_micro_batch_step"]
    assert set(one) == set(two) and "loss" in two
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=TOL, abs=TOL), key


def test_a_sharded_checkpoint_loads_in_hf(ckpts, runs):
    from transformers import AutoModelForCausalLM

    saved = ckpts["root"] / "fsdp2" / "policy"
    weights = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    for name, value in runs[2]["policy_weights"].items():
        assert torch.equal(weights[name], value), name
    assert sorted(p.name for p in saved.glob("optimizer_rank*.pt")) == ["optimizer_rank0.pt", "optimizer_rank1.pt"]


def test_cpu_offload_shards_into_host_memory_and_steps_the_same(ckpts, runs):
    # FSDP2's CPUOffloadPolicy over one rank: weights, gradients and AdamW state stay on the
    # host between steps, and one step is the same arithmetic.
    assert runs["offload"]["sharded"]
    assert_same_run(runs["offload"], runs[1])
    saved = ckpts["root"] / "fsdpoffload" / "policy"
    assert sorted(p.name for p in saved.glob("optimizer_rank*.pt")) == ["optimizer_rank0.pt"]
