"""Hugging Face Qwen3 / OLMo3 <-> megatron-core GPTModel weights, and their tensor-parallel shards.

Megatron names are relative to the GPTModel (plus `value_head.*`, the critic's scalar head),
with GLOBAL layer indices: `decoder.layers.{i}.self_attention.linear_qkv.weight`. Three levels:

  HF tensors  --to_mcore-->  full megatron tensor  --shard-->  this rank's TP shard
  HF tensors  <--to_hf----   full megatron tensor  <--unshard-- every rank's TP shard

Layouts that differ from Hugging Face:
  - linear_qkv fuses q, k and v per query group: rows [q_0 .. q_{h/g-1}, k, v] for each of the
    g groups, head_dim rows each; TP splits whole groups (rows, contiguous).
  - linear_fc1 fuses [gate; up]; with TP each rank holds [gate_r; up_r], not a row slice of
    the fused full tensor.
  - linear_proj / linear_fc2 are row-parallel: TP splits their input dimension (columns).
  - word embeddings / output layer are vocabulary-parallel (rows), padded with zero rows to a
    multiple of TP; the padding is dropped on the way back.
  - Qwen3's q/k norms act on one head (head_dim wide): replicated, each rank applies them to
    its own heads. OLMo3's act on the whole projection (heads × head_dim): TP splits them by
    heads, like the q/k rows they scale.
Other norm weights and the value head are replicated on every TP rank.

OLMo3 (layers.py builds its blocks): no pre-norms; the norms after attention and after the
MLP (inside the residual) sit on the output projections, `linear_proj.post_layernorm` and
`linear_fc2.post_layernorm`.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from tempo.errors import ConfigError

SUPPORTED = ("qwen3", "olmo3")


@dataclass(frozen=True)
class ModelShape:
    arch: str  # an HF model_type in SUPPORTED
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    tied: bool
    rope_theta: float
    norm_eps: float
    max_positions: int
    sliding_window: int = 0  # OLMo3: keys within this many positions, on the sliding layers
    sliding_layers: tuple[bool, ...] = ()  # OLMo3: per layer, True for sliding-window attention

    @classmethod
    def from_hf(cls, cfg) -> "ModelShape":
        arch = getattr(cfg, "model_type", None)
        if arch not in SUPPORTED:
            raise ConfigError(f"model.backend=megatron: supports {', '.join(SUPPORTED)} checkpoints, "
                              f"not model_type '{arch}'; use model.backend=hf")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        sliding: tuple[bool, ...] = ()
        if arch == "olmo3":
            # Per layer type; YaRN (or any HF rope type) on the full-attention layers only.
            sliding = tuple(t == "sliding_attention" for t in cfg.layer_types)
            if rope.get("sliding_attention", {}).get("rope_type", "default") != "default":
                raise ConfigError("model.backend=megatron: OLMo3's sliding layers must use the default rope")
            rope = rope.get("sliding_attention", {})
        elif rope.get("rope_type", "default") != "default":
            raise ConfigError(f"model.backend=megatron: rope_type '{rope['rope_type']}' is not supported for {arch}")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
        if theta is None:
            raise ConfigError("model.backend=megatron: the checkpoint's config has no rope_theta")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "use_sliding_window", False):
            raise ConfigError(f"model.backend=megatron: attention biases and sliding windows are not supported "
                              f"for {arch}")
        return cls(arch=arch, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   ffn_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                   tied=bool(cfg.tie_word_embeddings), rope_theta=float(theta), norm_eps=cfg.rms_norm_eps,
                   max_positions=cfg.max_position_embeddings,
                   sliding_window=int(getattr(cfg, "sliding_window", 0) or 0) if sliding else 0,
                   sliding_layers=sliding)

    def padded_vocab(self, tp: int) -> int:
        return math.ceil(self.vocab_size / tp) * tp


# megatron suffix within a layer -> (how it is split across TP, HF suffixes it is made of), per
# architecture. Qwen3 lists both the local spec's names and the Transformer-Engine spec's
# fused-norm names.
QKV = ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"))
LAYER_MAPS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "qwen3": {
        "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
        "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
        "self_attention.linear_qkv.weight": QKV,
        "self_attention.q_layernorm.weight": ("per_head", ("self_attn.q_norm.weight",)),
        "self_attention.k_layernorm.weight": ("per_head", ("self_attn.k_norm.weight",)),
        "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
        "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
        "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
        "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
    },
    "olmo3": {
        "self_attention.linear_qkv.weight": QKV,
        "self_attention.q_layernorm.weight": ("heads", ("self_attn.q_norm.weight",)),
        "self_attention.k_layernorm.weight": ("heads", ("self_attn.k_norm.weight",)),
        "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
        "self_attention.linear_proj.post_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
        "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
        "mlp.linear_fc2.post_layernorm.weight": ("replicated", ("post_feedforward_layernorm.weight",)),
    },
}
# The local spec's parameters of one layer, in export order.
LAYER_SUFFIXES = {
    "qwen3": ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight",
              "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
              "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"),
    "olmo3": ("self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight",
              "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight",
              "self_attention.linear_proj.post_layernorm.weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc2.weight", "mlp.linear_fc2.post_layernorm.weight"),
}
TOP_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
    "value_head.weight": ("replicated", ("score.weight",)),
    "value_head.bias": ("replicated", ("score.bias",)),
}
LAYER_PREFIX = "decoder.layers."


def split_layer_name(name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> (3, 'mlp.linear_fc2.weight'); top-level -> (None, name)."""
    if name.startswith(LAYER_PREFIX):
        index, suffix = name[len(LAYER_PREFIX):].split(".", 1)
        return int(index), suffix
    return None, name


def _entry(name: str, s: ModelShape) -> tuple[str, tuple[str, ...]]:
    layer, suffix = split_layer_name(name)
    table = TOP_MAP if layer is None else LAYER_MAPS[s.arch]
    if suffix not in table:
        raise KeyError(f"no Hugging Face mapping for megatron parameter {name} ({s.arch})")
    split, hf = table[suffix]
    if layer is not None:
        hf = tuple(f"model.layers.{layer}.{x}" for x in hf)
    return split, hf


def split_kind(name: str, s: ModelShape) -> str:
    return _entry(name, s)[0]


def replicated(name: str, s: ModelShape) -> bool:
    """The same tensor on every TP rank (counted once in the gradient norm)."""
    return split_kind(name, s) in ("replicated", "per_head")


def hf_names(name: str, s: ModelShape) -> tuple[str, ...]:
    return _entry(name, s)[1]


def full_shape(name: str, s: ModelShape, tp: int = 1) -> tuple[int, ...]:
    """Shape of the full (unsharded) megatron tensor, vocabulary padded for `tp`."""
    _, suffix = split_layer_name(name)
    d, hd = s.hidden_size, s.head_dim
    shapes = {
        "embedding.word_embeddings.weight": (s.padded_vocab(tp), d),
        "output_layer.weight": (s.padded_vocab(tp), d),
        "decoder.final_layernorm.weight": (d,),
        "value_head.weight": (1, d),
        "value_head.bias": (1,),
        "input_layernorm.weight": (d,),
        "self_attention.linear_qkv.layer_norm_weight": (d,),
        "self_attention.linear_qkv.weight": ((s.num_heads + 2 * s.num_kv_heads) * hd, d),
        "self_attention.q_layernorm.weight": (hd,) if s.arch == "qwen3" else (s.num_heads * hd,),
        "self_attention.k_layernorm.weight": (hd,) if s.arch == "qwen3" else (s.num_kv_heads * hd,),
        "self_attention.linear_proj.post_layernorm.weight": (d,),
        "mlp.linear_fc2.post_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (d, s.num_heads * hd),
        "pre_mlp_layernorm.weight": (d,),
        "mlp.linear_fc1.layer_norm_weight": (d,),
        "mlp.linear_fc1.weight": (2 * s.ffn_size, d),
        "mlp.linear_fc2.weight": (d, s.ffn_size),
    }
    return shapes[suffix]


def to_mcore(name: str, hf: list[torch.Tensor], s: ModelShape) -> torch.Tensor:
    """The full megatron tensor `name` from its HF tensors (in `hf_names(name, s)` order)."""
    kind = split_kind(name, s)
    if kind == "qkv":
        q, k, v = hf
        g, per, hd = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        fused = torch.cat([q.reshape(g, per * hd, -1), k.reshape(g, hd, -1), v.reshape(g, hd, -1)], dim=1)
        return fused.reshape(-1, q.shape[-1])
    if kind == "fc1":
        return torch.cat(hf, dim=0)
    (t,) = hf
    return t


def to_hf(name: str, full: torch.Tensor, s: ModelShape) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `to_mcore`: (HF name, tensor) pairs; vocabulary padding dropped."""
    kind, names = _entry(name, s)
    if kind == "qkv":
        g, per, hd = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        grouped = full.reshape(g, (per + 2) * hd, -1)
        q, k, v = grouped.split([per * hd, hd, hd], dim=1)
        parts = [q.reshape(-1, full.shape[-1]), k.reshape(-1, full.shape[-1]), v.reshape(-1, full.shape[-1])]
    elif kind == "fc1":
        parts = list(full.chunk(2, dim=0))
    elif kind == "vocab":
        parts = [full[: s.vocab_size]]
    else:
        parts = [full]
    return list(zip(names, parts))


def shard(name: str, s: ModelShape, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """TP rank `rank`'s shard of the full megatron tensor (vocabulary rows zero-padded first)."""
    kind = split_kind(name, s)
    if replicated(name, s) or tp == 1 and kind != "vocab":
        return full
    if kind == "vocab":
        pad = math.ceil(full.shape[0] / tp) * tp - full.shape[0]
        full = torch.nn.functional.pad(full, (0, 0, 0, pad)) if pad else full
        return full.chunk(tp, dim=0)[rank]
    if kind == "row":
        return full.chunk(tp, dim=1)[rank]
    if kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=0)[rank]  # qkv: whole query groups; heads: their norm weights


def unshard(name: str, s: ModelShape, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full megatron tensor from every TP rank's shard (inverse of `shard`)."""
    kind = split_kind(name, s)
    if replicated(name, s) or len(shards) == 1:
        return shards[0]
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "fc1":
        halves = [t.chunk(2, dim=0) for t in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def mcore_names(s: ModelShape, kind: str, layer_suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Every megatron parameter of a full model (policy: LM head unless tied; critic: value head)."""
    suffixes = layer_suffixes or LAYER_SUFFIXES[s.arch]
    names = ["embedding.word_embeddings.weight"]
    names += [f"{LAYER_PREFIX}{i}.{x}" for i in range(s.num_layers) for x in suffixes]
    names.append("decoder.final_layernorm.weight")
    if kind == "policy" and not s.tied:
        names.append("output_layer.weight")
    if kind == "critic":
        names += ["value_head.weight", "value_head.bias"]
    return names


def hf_to_mcore(hf: Mapping[str, torch.Tensor], s: ModelShape, kind: str) -> dict[str, torch.Tensor]:
    return {n: to_mcore(n, [hf[h] for h in hf_names(n, s)], s) for n in mcore_names(s, kind)}


def mcore_to_hf(mcore: Mapping[str, torch.Tensor], s: ModelShape, kind: str) -> dict[str, torch.Tensor]:
    out = dict(pair for n in mcore_names(s, kind) for pair in to_hf(n, mcore[n], s))
    if kind == "policy" and s.tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


class HFCheckpoint:
    """Tensors of a Hugging Face safetensors checkpoint (one file or an index), read lazily."""

    def __init__(self, path: str):
        from safetensors import safe_open

        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", "pt") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"model.backend=megatron: no safetensors weights in {path}")
        self.root, self.files, self._open = root, files, {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.root / file, "pt")
        return self._open[file].get_tensor(name)


def hf_config_for(hf_config, kind: str):
    """The HF config a saved checkpoint of this kind carries (critic: token classification, 1 label)."""
    cfg = copy.deepcopy(hf_config)
    if kind == "critic":
        cfg.num_labels = 1
        cfg.classifier_dropout = 0.0
        arch = (cfg.architectures or ["Qwen3ForCausalLM"])[0]
        cfg.architectures = [arch.replace("ForCausalLM", "ForTokenClassification")]
    return cfg
