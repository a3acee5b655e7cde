"""Memory plan: the per-GPU bytes a config needs, phase by phase, before anything is launched.

`tempo plan --config C --world-size N --gpu-gb G` prints, for the policy and the critic, the
bytes of weights, gradients and optimiser state on one GPU under the config's layout, the
activations of one micro-batch at the longest sequence, and the rollout engine's share, and
refuses (exit 2) a layout whose peak does not fit. The two phases never overlap (vLLM sleeps
while the trainer steps), so the peak is the larger of:

  training = model states (policy + critic) + the activations of the model being stepped
  rollout  = model states (policy + critic) + vLLM's share (its weights and KV cache)

both plus a runtime reserve of 5% of the GPU (CUDA context, NCCL buffers, allocator slack).

Estimates, not measurements: bf16/fp16 weights and gradients with fp32 AdamW moments and fp32
master weights (16 bytes per parameter; fp32 training: 16 as well, no master copy needed); a
model that never steps (a frozen critic) holds its weights only; under model.cpu_offload FSDP2
keeps every state in host memory (the GPU holds what it gathers: the root unit and two
layers), Megatron its fp32 masters and AdamW moments (the 16-bit weights and grads stay);
activations after Korthikanti et al. 2022 ("Reducing activation recomputation in large
transformer models"): 34·s·b·h bytes per layer in 16-bit (dropout-free: we count 30), divided
by TP under sequence parallelism; attention scores 5·a·s²·b/TP when the attention kernel keeps
them (Megatron's local attention, which the OLMo3 blocks use), none under flash attention or
selective recomputation, which keeps them only one layer at a time. The fused log-prob kernel
never holds [tokens, vocabulary] logits, so the head adds one hidden row per token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tempo.config import Config
from tempo.errors import ConfigError
from tempo import methods
from tempo.methods import METHODS

GIB = 1 << 30
RESERVE = 0.05  # of each GPU, never planned for


@dataclass(frozen=True)
class Arch:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "Arch":
        heads = cfg["num_attention_heads"]
        return cls(model_type=cfg["model_type"], layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, ffn=cfg["intermediate_size"],
                   vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        attention = d * hd * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        # two norms of d; q/k norms per head (Qwen3) or over all heads (OLMo3)
        qk_norms = 2 * hd if self.model_type == "qwen3" else (self.heads + self.kv_heads) * hd
        return attention + 3 * d * self.ffn + 2 * d + qk_norms

    def params(self, kind: str) -> int:
        head = self.hidden + 1 if kind == "critic" else (0 if self.tied else self.vocab * self.hidden)
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden + head


# The paper's models, for planning on a machine that has no copy of them (their config.json).
KNOWN: dict[str, dict] = {
    "allenai/Olmo-3-1025-7B": dict(model_type="olmo3", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                   num_key_value_heads=32, intermediate_size=11008, vocab_size=100278),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
    "Qwen/Qwen3-14B": dict(model_type="qwen3", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
                           head_dim=128, intermediate_size=17408, vocab_size=151936),
}


def arch_of(path: str) -> Arch:
    file = Path(path) / "config.json"
    if file.is_file():
        return Arch.from_hf(json.loads(file.read_text()))
    if path in KNOWN:
        return Arch.from_hf(KNOWN[path])
    raise ConfigError(f"model.policy_path: no config.json at {path} and not one of {', '.join(KNOWN)}")


@dataclass
class Plan:
    rows: list[tuple[str, float]]  # (what, bytes per GPU)
    training: float
    rollout: float
    gpu: float
    notes: list[str]

    @property
    def peak(self) -> float:
        return max(self.training, self.rollout)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu

    def reason(self) -> str:
        phase = "training" if self.training >= self.rollout else "rollout"
        return (f"the {phase} phase needs {self.peak / GIB:.1f} GiB per GPU, more than the GPU's "
                f"{self.gpu / GIB:.0f} GiB")

    def table(self) -> str:
        lines = ["| per GPU | GiB |", "|---|---|"]
        lines += [f"| {what} | {size / GIB:.2f} |" for what, size in self.rows]
        lines += [f"| **training peak** | **{self.training / GIB:.2f}** |",
                  f"| **rollout peak** | **{self.rollout / GIB:.2f}** |",
                  f"| GPU | {self.gpu / GIB:.0f} |"]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _states_per_gpu(a: Arch, kind: str, cfg: Config, world: int, weight_bytes: int, steps: bool,
                    offload: bool) -> float:
    """Weights + gradients + AdamW state of one model on the most loaded GPU (`steps` False: a
    model that never takes an optimiser step allocates neither gradients nor AdamW state)."""
    m = cfg.model
    if m.backend == "hf":  # FSDP2 shards fp32 weights (the masters), grads and AdamW state over all ranks
        if offload:  # all in host memory; gathered to compute: the root unit, two layers (one prefetched)
            return (a.params(kind) - (a.layers - 2) * a.layer_params) * weight_bytes
        return a.params(kind) * (16 if steps else 4) / world
    # Megatron: the weights (and grads) in model.dtype; unless offloaded, the fp32 masters of
    # 16-bit weights and AdamW's m + v too.
    per_param = weight_bytes + (weight_bytes if steps else 0)
    if not offload:
        per_param += (4 if weight_bytes < 4 else 0) + (8 if steps else 0)
    # Megatron: TP splits every matrix, PP the layers; the first stage also holds the
    # embedding (and the head when there is one stage); AdamW is per rank, not DP-sharded.
    stage = a.layers // m.pipeline_parallel * a.layer_params + a.vocab * a.hidden
    if m.pipeline_parallel == 1:
        stage += a.params(kind) - a.layers * a.layer_params - a.vocab * a.hidden
    return stage * per_param / m.tensor_parallel


def _activations(a: Arch, cfg: Config, act_bytes: int) -> tuple[float, list[str]]:
    """Activations of one micro-batch through the model on the most loaded GPU (1F1B keeps up to
    PP micro-batches in flight on the first stage: about the whole model's layers' worth)."""
    m, r, notes = cfg.model, cfg.rollout, []
    seq = r.max_prompt_tokens + r.max_new_tokens
    tokens = cfg.train.micro_batch_size * seq
    tp = m.tensor_parallel if m.backend == "megatron" else 1
    split = tp if m.sequence_parallel else 1
    per_layer = act_bytes / 2 * tokens * a.hidden * (30 / split if m.sequence_parallel else 10 + 20 / tp)
    # Megatron's local attention (our OLMo3 blocks) materialises the scores; TE and SDPA do not.
    keeps_scores = m.backend == "megatron" and a.model_type == "olmo3"
    scores = act_bytes / 2 * 5 * a.heads * seq * tokens / tp if keeps_scores else 0.0
    if m.recompute == "full":
        held = a.layers * act_bytes * tokens * a.hidden / split + per_layer + scores
    elif m.recompute == "selective":
        held = a.layers * per_layer + scores
    else:
        held = a.layers * (per_layer + scores)
        if keeps_scores:
            notes.append("Megatron's local attention keeps every layer's [heads, s, s] scores: set model.recompute")
    return held + tokens * a.hidden * 4, notes  # + the fp32 rows the fused log-prob reads


def plan(cfg: Config, world: int, gpu_gb: float) -> Plan:
    m, r = cfg.model, cfg.rollout
    if m.backend == "megatron" and world % (m.tensor_parallel * m.pipeline_parallel):
        raise ConfigError(f"world size {world} is not a multiple of model.tensor_parallel × model.pipeline_parallel "
                          f"= {m.tensor_parallel * m.pipeline_parallel}")
    policy = arch_of(m.policy_path)
    weight_bytes = 4 if m.dtype == "float32" else 2
    models = [(policy, "policy")]
    if METHODS[cfg.algorithm.method].uses_critic:  # TTRL, EMPO and GRPO build none
        models.append((arch_of(m.critic_path) if m.critic_path else policy, "critic"))
    steps = {"policy": True, "critic": METHODS[cfg.algorithm.method].recalibrate is not methods.never}
    rows = [(f"{kind} weights" + (" + grads + AdamW" if steps[kind] else " (never steps)") +
             (", offloaded: what is gathered" if m.cpu_offload else "") + f" ({a.params(kind) / 1e9:.2f}B params)",
             _states_per_gpu(a, kind, cfg, world, weight_bytes, steps[kind], m.cpu_offload)) for a, kind in models]
    states = sum(size for _, size in rows)
    if m.cpu_offload:
        host = sum(_states_per_gpu(a, kind, cfg, world, weight_bytes, steps[kind], False) for a, kind in models) - states
        notes_offload = [f"model.cpu_offload: about {max(host, 0.0) / GIB:.1f} GiB of host memory per GPU holds the rest"]
    else:
        notes_offload = []
    acts, notes = zip(*(_activations(a, cfg, weight_bytes) for a, _ in models))
    act = max(acts)
    rows.append((f"activations, one micro-batch of {cfg.train.micro_batch_size} × "
                 f"{r.max_prompt_tokens + r.max_new_tokens} tokens ({m.recompute} recompute"
                 f"{', SP' if m.sequence_parallel else ''})", act))
    gpu = gpu_gb * GIB
    vllm = r.gpu_memory_utilization * gpu if r.engine == "vllm" else 0.0
    vllm_tp = m.tensor_parallel if m.backend == "megatron" else 1
    notes = [n for part in notes for n in part] + notes_offload
    if vllm:
        weights = policy.params("policy") * weight_bytes / vllm_tp
        kv_token = 2 * policy.layers * policy.kv_heads * policy.head_dim * weight_bytes / vllm_tp
        kv = vllm - weights
        rows.append((f"vLLM share: rollout.gpu_memory_utilization {r.gpu_memory_utilization} (weights "
                     f"{weights / GIB:.1f} GiB, KV cache {kv / GIB:.1f} GiB)", vllm))
        if kv <= 0:
            notes.append("vLLM's share does not hold its own weights: raise rollout.gpu_memory_utilization")
        else:
            seqs = kv / (kv_token * (r.max_prompt_tokens + r.max_new_tokens))
            notes.append(f"the KV cache holds {seqs:.0f} sequences of {r.max_prompt_tokens + r.max_new_tokens} tokens "
                         f"at once per vLLM instance ({kv_token / 1024:.0f} KiB per token)")
    reserve = RESERVE * gpu
    rows.append(("runtime reserve (CUDA context, NCCL buffers, allocator slack)", reserve))
    return Plan(rows, states + act + reserve, states + vllm + reserve, gpu, notes)
