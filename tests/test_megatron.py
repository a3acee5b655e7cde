"""Megatron-core backend (tempo.models.megatron) on tiny Qwen3 and OLMo3 models, CPU and gloo.

In-process: HF <-> megatron weight mapping and TP shards, layout errors (no process is
launched). Under torchrun (tests/torchrun_megatron.py): one process at TP=1 against the HF
backend (logits, log-probs, values, one optimiser step) and with activation recomputation
(selective, full) against without; then two processes at TP=2, PP=2, DP=2 and TP=2 with
sequence parallelism against TP=1 (same outputs, loss, grad norm and HF-named weights after
one step). Models: a Qwen3 policy with tied embeddings (vocabulary 98), an untied one whose
vocabulary (97) TP=2 has to pad, and an OLMo3 (post-norms, full-width q/k norms, a sliding
window of 4 on three of four layers, YaRN on the fourth) with its own critic. The optimiser step uses lr 1e-4: Adam's first step is lr·g/(|g|+eps), so entries
whose gradient is a few eps from zero turn 1e-10 rounding differences between layouts into a
fraction of lr (measured: 2.7e-5 at lr 1e-3, 2.7e-6 at lr 1e-4).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from tempo.base_model import build_tiny_qwen3  # noqa: E402
from tempo.config import BaseModelConfig, load_config  # noqa: E402
from tempo.errors import ConfigError  # noqa: E402
from tempo.models.megatron import convert  # noqa: E402
from tempo.models.megatron.parallel import check_layout  # noqa: E402

from helpers import TOL, assert_same_run, torchrun  # noqa: E402
from torchrun_megatron import token_batch  # noqa: E402

WORKER = "torchrun_megatron.py"
POLICIES = ("tied", "untied", "olmo3")  # worker index 0, 1, 2
CRITICS = ("critic", "critic", "olmo3_critic")
LAYOUTS = ("2x1x1", "1x2x1", "1x1x2", "2x1x1,sp")  # tp x pp x dp[,option], two processes


# -- checkpoints and launches -----------------------------------------------------------------

def launch(ckpts, name: str, nproc: int, *args: str) -> dict:
    out = ckpts["root"] / f"{name}.pt"
    torchrun(nproc, "--policy", *(str(ckpts[p]) for p in POLICIES), "--critic", *(str(ckpts[c]) for c in CRITICS),
             "--out", str(out), *args, worker=WORKER)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(ckpts) -> dict:
    """TP=1 megatron (recomputing activations or not) and the HF backend, same batch, same steps."""
    return launch(ckpts, "one", 1, "--layouts", "1,1", "1,1,selective", "1,1,full", "1,1,bf16", "1,1,offload",
                  "--reference")


@pytest.fixture(scope="module")
def two_processes(ckpts) -> dict:
    """TP=2, PP=2, DP=2 and TP=2 with SP on two processes; models saved; export in many small buckets."""
    return launch(ckpts, "two", 2, "--layouts", "2,1", "1,2", "1,1", "2,1,sp", "--save", str(ckpts["root"] / "saved"),
                  "--bucket-bytes", "65536")


# -- weight mapping (in process) --------------------------------------------------------------

def hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("which,kind", [("tied", "policy"), ("untied", "policy"), ("critic", "critic"),
                                        ("olmo3", "policy"), ("olmo3_critic", "critic")])
def test_hf_megatron_hf_round_trip_is_exact(ckpts, which, kind):
    from transformers import AutoConfig

    shape = convert.ModelShape.from_hf(AutoConfig.from_pretrained(ckpts[which]))
    hf = hf_state(ckpts[which])
    mcore = convert.hf_to_mcore(hf, shape, kind)
    qkv = mcore["decoder.layers.0.self_attention.linear_qkv.weight"]
    hd = shape.head_dim
    assert qkv.shape == ((4 + 2 * 2) * hd, shape.hidden_size)
    # Query group 0 = query heads 0-1, then key head 0, then value head 0.
    assert torch.equal(qkv[:2 * hd], hf["model.layers.0.self_attn.q_proj.weight"][:2 * hd])
    assert torch.equal(qkv[2 * hd:3 * hd], hf["model.layers.0.self_attn.k_proj.weight"][:hd])
    assert torch.equal(qkv[3 * hd:4 * hd], hf["model.layers.0.self_attn.v_proj.weight"][:hd])
    back = convert.mcore_to_hf(mcore, shape, kind)
    if kind == "policy" and shape.tied:
        hf = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("which", ["untied", "olmo3"])
@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_shards_round_trip(ckpts, which, tp):
    from transformers import AutoConfig

    shape = convert.ModelShape.from_hf(AutoConfig.from_pretrained(ckpts[which]))
    mcore = convert.hf_to_mcore(hf_state(ckpts[which]), shape, "policy")
    for name, full in mcore.items():
        shards = [convert.shard(name, shape, full, r, tp) for r in range(tp)]
        padded = convert.full_shape(name, shape, tp)
        assert convert.unshard(name, shape, shards)[: full.shape[0]].equal(full), name
        assert tuple(convert.unshard(name, shape, shards).shape) == padded, name
    if tp == 2 and which == "untied":  # each rank's fc1 holds its slice of gate, then its slice of up
        fc1 = mcore["decoder.layers.0.mlp.linear_fc1.weight"]
        rank1 = convert.shard("decoder.layers.0.mlp.linear_fc1.weight", shape, fc1, 1, 2)
        assert torch.equal(rank1[:192], fc1[192:384]) and torch.equal(rank1[192:], fc1[576:])
        emb = convert.shard("embedding.word_embeddings.weight", shape, mcore["embedding.word_embeddings.weight"], 1, 2)
        assert emb.shape[0] == 49 and emb[-1].abs().sum() == 0  # 97 rows padded to 98
    if tp == 2 and which == "olmo3":  # full-width q/k norms split by heads: rank 1 holds heads 2-3 (k: head 1)
        q = mcore["decoder.layers.0.self_attention.q_layernorm.weight"]
        k = mcore["decoder.layers.0.self_attention.k_layernorm.weight"]
        assert q.shape == (4 * 16,) and k.shape == (2 * 16,)
        assert torch.equal(convert.shard("decoder.layers.0.self_attention.q_layernorm.weight", shape, q, 1, 2), q[32:])
        assert torch.equal(convert.shard("decoder.layers.0.self_attention.k_layernorm.weight", shape, k, 1, 2), k[16:])


# -- clear errors before any process-group work ------------------------------------------------

@pytest.mark.parametrize("tp,pp,world,needle", [
    (3, 1, 3, "does not divide the 4 attention heads"),
    (4, 1, 4, "does not divide the 2 key/value heads"),
    (2, 1, 3, "world size 3 does not factor"),
    (1, 3, 3, "does not divide the 4 layers"),
    (2, 2, 2, "world size 2 does not factor"),
])
def test_layout_errors(tp, pp, world, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        check_layout(tp, pp, world, num_heads=4, num_kv_heads=2, num_layers=4, ffn_size=384)
    assert "\n" not in str(err.value)
    assert check_layout(2, 2, 8, num_heads=4, num_kv_heads=2, num_layers=4, ffn_size=384).dp == 2


def test_build_models_rejects_bad_layout_before_process_group(ckpts, monkeypatch):
    import torch.distributed as dist

    from tempo.build import build_models

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["model.backend=megatron", "model.pipeline_parallel=2", "model.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="world size 2 does not factor"):
        build_models(cfg, str(ckpts["tied"]), None, need_critic=True)
    cfg = load_config(None, ["model.backend=megatron", "model.tensor_parallel=4"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="key/value heads"):
        build_models(cfg, str(ckpts["tied"]), None, need_critic=False)
    assert not dist.is_initialized()


def test_unsupported_architecture_is_a_config_error():
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match="model_type 'llama'"):
        convert.ModelShape.from_hf(LlamaConfig())


# -- one process: megatron TP=1 against the HF backend -------------------------------------------

@pytest.mark.parametrize("policy", [0, 1, 2])
def test_tp1_logits_match_hf(one_process, policy):
    run, hf = one_process[f"{policy}/1x1x1"], one_process[f"{policy}/hf"]
    real = token_batch().attention_mask.bool()  # padding positions are never read
    vocab = hf["logits"].shape[-1]
    diff = (run["logits"][..., :vocab] - hf["logits"])[real].abs().max().item()
    assert diff < TOL


@pytest.mark.parametrize("policy", [0, 1, 2])
def test_tp1_step_matches_hf(one_process, policy):
    assert_same_run(one_process[f"{policy}/1x1x1"], one_process[f"{policy}/hf"])


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("policy", [0, 2])
def test_recomputed_activations_give_the_same_step(one_process, policy, recompute):
    assert_same_run(one_process[f"{policy}/1x1x1,{recompute}"], one_process[f"{policy}/1x1x1"], tol=1e-6)


@pytest.mark.parametrize("policy", [0, 2])
def test_bf16_weights_step_fp32_masters(one_process, policy):
    """AdamW steps fp32 masters; the bf16 weights are their rounding, and the step follows fp32's."""
    bf16, fp32 = one_process[f"{policy}/1x1x1,bf16"], one_process[f"{policy}/1x1x1"]
    assert {dtype for dtype, _ in bf16["masters"]} == {torch.float32}
    assert all(rounded for _, rounded in bf16["masters"])
    assert all(dtype == torch.float32 and rounded for dtype, rounded in fp32["masters"])  # their own masters
    for name, value in fp32["policy_weights"].items():
        assert bf16["policy_weights"][name].dtype == torch.bfloat16
        diff = (bf16["policy_weights"][name].float() - value).abs().max().item()
        assert diff <= 0.01 * value.abs().max().item() + 1e-3, name
    assert bf16["policy_step"]["loss"] == pytest.approx(fp32["policy_step"]["loss"], rel=0.05, abs=0.02)


@pytest.mark.parametrize("policy", [0, 2])
def test_offloaded_masters_give_the_same_step(one_process, policy):
    """model.cpu_offload: separate fp32 masters and AdamW state in host memory; the step is
    the same arithmetic on other storage."""
    offloaded, plain = one_process[f"{policy}/1x1x1,offload"], one_process[f"{policy}/1x1x1"]
    assert offloaded["masters_apart"] and not plain["masters_apart"]
    assert_same_run(offloaded, plain, tol=1e-7)


def test_critic_from_policy_starts_at_zero_and_build_keeps_rng(one_process):
    run = one_process["0/1x1x1"]
    assert run["zero_head_values"].abs().max() == 0
    assert torch.equal(run["rng_after_build"], torch.manual_seed(0).get_state())


# -- two processes: TP=2, PP=2, DP=2 against TP=1 ------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", [0, 1, 2])
def test_two_process_layouts_match_tp1(one_process, two_processes, layout, policy):
    assert_same_run(two_processes[f"{policy}/{layout}"], one_process[f"{policy}/1x1x1"])


@pytest.mark.parametrize("policy,layout", [(1, "2x1"), (1, "1x2"), (2, "2x1,sp"), (2, "1x2")])
def test_saved_checkpoints_load_in_hf(ckpts, two_processes, policy, layout):
    from transformers import AutoModelForCausalLM

    from tempo.models.hf import load_critic_module

    saved = ckpts["root"] / "saved" / str(policy) / layout
    tp, pp = map(int, layout.split(",")[0].split("x"))
    run = two_processes[f"{policy}/{tp}x{pp}x1" + layout[3:]]
    policy = AutoModelForCausalLM.from_pretrained(saved / "policy").state_dict()
    for name, value in run["policy_weights"].items():
        assert torch.equal(policy[name], value), name
    critic = load_critic_module(str(saved / "critic"), torch.float32, init_from_policy=False).state_dict()
    for name, value in run["critic_weights"].items():
        assert torch.equal(critic[name], value), name
    assert sorted(p.name for p in (saved / "policy").glob("optimizer_*.pt")) == sorted(
        f"optimizer_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp))


@pytest.mark.slow
def test_tp2_pp2_four_processes_match_tp1(ckpts, one_process):
    out = launch(ckpts, "four", 4, "--layouts", "2,2", "2,2,sp")
    for policy in range(len(POLICIES)):
        for layout in ("2x2x1", "2x2x1,sp"):
            assert_same_run(out[f"{policy}/{layout}"], one_process[f"{policy}/1x1x1"])


# -- the EM loop under torchrun against the HF backend ----------------------------------------------

def read_records(path: Path) -> dict[tuple[int, str], list[dict]]:
    """metrics.jsonl records by (step, phase)."""
    import json

    out: dict[tuple[int, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault((rec["step"], rec["phase"]), []).append(rec)
    return out


def save_policy_and_critic(tmp_path) -> None:
    """The default tiny Qwen3 as `policy/` and a critic checkpoint with its zero head as `critic/`."""
    from tempo.models.hf import load_critic_module
    from tempo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    policy = build_tiny_qwen3(BaseModelConfig(), vocab_size=len(tok), pad_id=tok.pad_token_id,
                              eos_id=tok.eos_token_id)
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    load_critic_module(str(tmp_path / "policy"), torch.float32, init_from_policy=True).save_pretrained(
        tmp_path / "critic")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["model.backend=megatron model.tensor_parallel=2",
                                    "model.backend=megatron model.pipeline_parallel=2",
                                    "model.backend=hf"])  # FSDP2 over the two ranks
def test_em_steps_under_torchrun_match_hf_backend(tmp_path, layout):
    """Two EM steps of the embedded task on two ranks: rollouts, rewards, E- and M-step metrics
    as with the HF backend in one process.

    A critic checkpoint is given so that neither backend draws from the sampling RNG while it
    builds (the HF backend's fresh value head is randomly initialised before it is zeroed), and
    both runs use one thread per process (torchrun's default), so rollouts are identical."""
    save_policy_and_critic(tmp_path)
    common = [f"model.policy_path={tmp_path / 'policy'}", f"model.critic_path={tmp_path / 'critic'}",
              "train.steps=2", "eval.every=2", "stage1.steps=0", "stage1.critic_epochs=0",
              "train.prompts_per_step=4", "train.labeled_per_step=2", "task.num_unlabeled=16",
              "eval.max_prompts=8", "rollout.max_new_tokens=24", "run.tensorboard=false", "run.progress=false",
              "run.save_checkpoints=false", "rollout.split_over_ranks=false"]  # every rank samples all, as one process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {"hf": [sys.executable, "-m", "tempo.cli", "train", *common, f"run.out_dir={tmp_path / 'hf'}"],
            "two ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tempo.cli", "train", *layout.split(), *common, f"run.out_dir={tmp_path / 'two'}"]}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-6000:]}"
    hf, mc = read_records(tmp_path / "hf" / "metrics.jsonl"), read_records(tmp_path / "two" / "metrics.jsonl")
    assert set(hf) == set(mc) and (1, "train") in hf
    for key, (ref,) in hf.items():
        assert len(mc[key]) == 1, f"only rank 0 writes metrics, got {len(mc[key])} records at {key}"
        for metric, value in ref.items():
            if isinstance(value, float):
                assert mc[key][0][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{key} {metric}"
            else:
                assert mc[key][0][metric] == value, f"{key} {metric}"


def test_megatron_checkpoint_and_resume_under_torchrun(tmp_path):
    """TP=2 under torchrun: every rank writes its optimiser shard and trainer state, rank 0 seals
    the checkpoint; a run stopped after step 2 and resumed logs what an uninterrupted one does."""
    save_policy_and_critic(tmp_path)
    common = [f"model.policy_path={tmp_path / 'policy'}", f"model.critic_path={tmp_path / 'critic'}",
              "eval.every=2", "stage1.steps=0", "stage1.critic_epochs=0", "train.prompts_per_step=4",
              "train.labeled_per_step=2", "task.num_unlabeled=16", "eval.max_prompts=8", "rollout.max_new_tokens=24",
              "run.tensorboard=false", "run.progress=false", "run.checkpoint_every=1", "model.backend=megatron",
              "model.tensor_parallel=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tempo.cli",
              "train", *common]
    for extra in (["train.steps=3", f"run.out_dir={tmp_path / 'whole'}"],
                  ["train.steps=2", f"run.out_dir={tmp_path / 'parts'}"],
                  ["train.steps=3", f"run.out_dir={tmp_path / 'parts'}", "--resume"]):
        proc = subprocess.run(launch + extra, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-6000:]
    step3 = tmp_path / "parts" / "checkpoints" / "step_3"
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt", "manifest.json"} <= {p.name for p in step3.iterdir()}
    assert {"optimizer_tp0_pp0.pt", "optimizer_tp1_pp0.pt"} <= {p.name for p in (step3 / "policy").iterdir()}
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "parts" / "metrics.jsonl").read_text() == whole
