"""Rollouts split over data-parallel ranks (tempo.rollout.parallel): under torchrun every rank
used to sample every prompt of a call. Two gloo processes (tests/torchrun_rollout_dp.py), each
an HF engine on a tiny Qwen3, must each sample only their half, with their own seed, and both
end up with the whole call's rollouts, identical, in prompt order, the trainer's RNG moved alike."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempo.rollout.parallel import dp_slices
from tempo.tokenizer import char_tokenizer

WORKER = Path(__file__).with_name("torchrun_rollout_dp.py")
sys.path.insert(0, str(WORKER.parent))
from torchrun_rollout_dp import N, PROMPTS, WIDE  # noqa: E402

FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rollout_dp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same(a, b) -> None:
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts and a.logprobs is None and b.logprobs is None


def test_prompts_split_into_contiguous_near_equal_slices():
    assert dp_slices(5, 2) == [slice(0, 2), slice(2, 5)]
    assert dp_slices(4, 4) == [slice(d, d + 1) for d in range(4)]
    assert dp_slices(1, 2) == [slice(0, 0), slice(0, 1)]  # a rank may get none


def test_each_rank_samples_only_its_slice(ranks):
    assert [ranks[r]["calls"][0][0] for r in range(2)] == [PROMPTS[:2], PROMPTS[2:]]
    assert [ranks[r]["calls"][1][0] for r in range(2)] == [WIDE[:1], WIDE[1:]]


def test_every_rank_gets_the_whole_call_in_prompt_order(ranks):
    wide = ranks[0]["wide"]
    assert_same(wide, ranks[1]["wide"])
    assert_same(ranks[0]["halves"], ranks[1]["halves"])
    tok = char_tokenizer()
    assert tok.batch_decode(wide.prompt_ids, skip_special_tokens=True) == [p for p in WIDE for _ in range(N)]
    parts = [ranks[r]["calls"][1][1] for r in range(2)]
    assert wide.texts == parts[0].texts + parts[1].texts
    # rank 1's narrower prompts re-padded on the left, its responses on the right
    P, R = parts[1].prompt_ids.shape[1], parts[1].response_ids.shape[1]
    assert torch.equal(wide.prompt_ids[N:, -P:], parts[1].prompt_ids)
    assert torch.equal(wide.response_ids[N:, :R], parts[1].response_ids)


def test_the_halves_sample_with_their_own_seeds(ranks):
    """Both ranks sample the same prompts: only their seeds can make the rows differ."""
    rows = ranks[0]["halves"].response_ids
    assert not torch.equal(rows[:2 * N], rows[2 * N:])


def test_the_trainer_rng_moves_by_one_draw_on_every_rank(ranks):
    """Each rank samples from a forked RNG: the trainer's own moves by the one draw that seeds the
    call, whatever the rank sampled, so the ranks' streams stay equal (and resume replays it)."""
    for r in range(2):
        assert torch.equal(ranks[r]["after"], ranks[r]["one_draw"]), r
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])


def test_a_rank_without_prompts_still_runs_its_engine(ranks):
    """One prompt, two ranks: rank 0 samples it too (the vLLM engine loads pending weights, a
    collective, when it generates) but only rank 1's rows are kept."""
    assert [ranks[r]["calls"][2][0] for r in range(2)] == [WIDE[2:], WIDE[2:]]
    single = ranks[0]["single"]
    assert_same(single, ranks[1]["single"])
    assert_same(single, ranks[1]["calls"][2][1])
