"""The transformer blocks of the Megatron backend: Qwen3 and OLMo3 on megatron-core's modules.

Both are megatron's local `TransformerLayer` (column/row-parallel linears, DotProductAttention)
with our own RMSNorm, which works under sequence parallelism (megatron's torch norm refuses
it; its fused ones need Apex or Transformer Engine). OLMo3 differs from Qwen3 in four ways,
each a small subclass of the megatron module it changes:

- post-norms: RMSNorm on the attention output and on the MLP output, inside the residual
  (x + norm(attn(x))): the output projections (`linear_proj`, `linear_fc2`) carry them, and
  no norm comes before either (`input_layernorm`/`pre_mlp_layernorm` are identities);
- q/k norms over the whole projection (all heads together): under TP each rank holds its
  heads' slice of the weight, and the RMS is summed across the TP group;
- sliding-window attention on the layers `window_attn_skip_freq` marks (three of four):
  a key more than `window_size[0]` positions back is masked, on top of the padding mask;
- rotary angles per layer type: the block gets both (sliding and full) stacked on the last
  dimension, and each layer takes its own; YaRN's attention factor on the full layers
  scales q and k alike, so it enters as a softmax scale of factor².
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.utils import is_layer_window_attention


class RMSNorm(torch.nn.Module):
    """x / rms(x) · w over the last dimension, in fp32 (as HF's Qwen3/OLMo3 norms). Under
    sequence parallelism each TP rank sees its own tokens, so the weight's gradient is a
    partial sum: marked `sequence_parallel` for the TP all-reduce."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class FullWidthQKNorm(torch.nn.Module):
    """OLMo3's q (or k) norm: one RMS over every head of the projection. Input [s, b, heads_local,
    head_dim]; the sum of squares is all-reduced over the TP group (differentiably: each rank's
    heads feed the others' RMS)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, *, which: str):
        super().__init__()
        heads = config.num_attention_heads if which == "q" else config.num_query_groups
        tp = ps.get_tensor_model_parallel_world_size()
        self.eps, self.width = eps, heads * hidden_size  # hidden_size: megatron passes head_dim
        self.weight = torch.nn.Parameter(torch.ones(heads // tp * hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        sq = h.pow(2).sum((-2, -1), keepdim=True)
        group = ps.get_tensor_model_parallel_group()
        if dist.get_world_size(group) > 1:
            sq = differentiable_all_reduce(sq, group=group)
        h = h * torch.rsqrt(sq / self.width + self.eps)
        return (self.weight.float().view(x.shape[-2], x.shape[-1]) * h).to(x.dtype)


def _sliding(config: TransformerConfig, layer_number: int) -> bool:
    return is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)


class WindowedDotProductAttention(DotProductAttention):
    """Megatron's attention with OLMo3's window added to the given (padding + causal) mask; the
    full-attention layers' scores scaled by `full_attention_scale` (YaRN's factor²)."""

    def __init__(self, config: TransformerConfig, layer_number: int, *args, full_attention_scale: float = 1.0,
                 **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.window = config.window_size[0] if _sliding(config, layer_number) else None
        self.scale_mask_softmax.window_size = None  # megatron's own window would replace our mask
        if self.window is None:
            self.softmax_scale *= full_attention_scale

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.window is not None:
            q = torch.arange(query.shape[0], device=query.device)[:, None]
            k = torch.arange(key.shape[0], device=key.device)[None, :]
            attention_mask = attention_mask | (q - k > self.window)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class PostNormRowParallelLinear(RowParallelLinear):
    """An output projection followed by OLMo3's post-norm (after attention, after the MLP)."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = RMSNorm(config, output_size, config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return self.post_layernorm(out), bias


class Olmo3SelfAttention(SelfAttention):
    """Megatron's attention on this layer type's rotary angles (sliding or full)."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.sliding = _sliding(config, layer_number)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        sliding_angles, full_angles = rotary_pos_emb.chunk(2, dim=-1)
        angles = sliding_angles if self.sliding else full_angles
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=angles.contiguous(), **kwargs)


def block_spec(arch: str, num_layers: int, full_attention_scale: float = 1.0) -> TransformerBlockSubmodules:
    """This pipeline stage's `num_layers` layers and the final norm, for `arch` (qwen3 | olmo3)."""
    layer = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    sub, attn = layer.submodules, layer.submodules.self_attention.submodules
    if arch == "qwen3":
        sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    else:
        sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
        sub.self_attention.module = Olmo3SelfAttention
        attn.q_layernorm = ModuleSpec(module=FullWidthQKNorm, params={"which": "q"})
        attn.k_layernorm = ModuleSpec(module=FullWidthQKNorm, params={"which": "k"})
        attn.core_attention = ModuleSpec(module=WindowedDotProductAttention,
                                         params={"full_attention_scale": full_attention_scale})
        attn.linear_proj = sub.mlp.submodules.linear_fc2 = PostNormRowParallelLinear
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)
