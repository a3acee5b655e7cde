"""One rank's pipeline stage of a megatron-core GPTModel made from a Hugging Face config:
the TransformerConfig and layer specs of Qwen3 / OLMo3, their rotary angles from the batch's
position ids (left-padded prompts see the positions HF gives them), and the `Stage` module
(embeddings -> layers -> final norm, the critic's value head on the last stage)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tempo.models.megatron.convert import ModelShape
from tempo.models.megatron.layers import block_spec

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.transformer import TransformerConfig


def transformer_config(s: ModelShape, tp: int, pp: int, dtype: torch.dtype, sequence_parallel: bool = False,
                       recompute: str = "none") -> TransformerConfig:
    """A Qwen3 or OLMo3 block in megatron terms: GQA, q/k RMSNorm, SwiGLU, RMSNorm, no biases;
    OLMo3's sliding window as megatron's (left, right) window and per-layer flags."""
    window = dict(window_size=(s.sliding_window - 1, 0), window_attn_skip_freq=[int(x) for x in s.sliding_layers]) \
        if any(s.sliding_layers) else {}
    recompute_args = {"selective": dict(recompute_granularity="selective"),
                      "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                      "none": {}}[recompute]
    return TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
        num_query_groups=s.num_kv_heads, kv_channels=s.head_dim, ffn_hidden_size=s.ffn_size,
        normalization="RMSNorm", layernorm_epsilon=s.norm_eps, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=False,
        variable_seq_lengths=True,  # micro-batches differ in rows and length: p2p sends shapes
        moe_token_dispatcher_type="alltoall",  # (no MoE; the default "allgather" rejects the line above)
        calculate_per_token_loss=True,  # the schedule leaves the loop's (already weighted) loss as is
        sequence_parallel=sequence_parallel and tp > 1, **window, **recompute_args,
    )


def layer_spec(s: ModelShape, layers: int, full_attention_scale: float):
    """Transformer Engine's Qwen3 spec on GPUs that have it; our blocks (layers.py) otherwise,
    and for OLMo3 always.

    The TE spec takes the same [b, 1, s, s] mask (arbitrary mask type); it is untested here
    (no GPU on the development machine)."""
    if torch.cuda.is_available() and s.arch == "qwen3":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
            from megatron.core.transformer.enums import AttnMaskType
            import transformer_engine  # noqa: F401

            spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
            spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
            return spec
        except ImportError:
            pass
    return block_spec(s.arch, layers, full_attention_scale)


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is NOT allowed: the future and padding keys."""
    s = mask.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=mask.device).triu(1)
    return future[None, None] | ~mask.bool()[:, None, None, :]


def rotary_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[s, b, 1, head_dim] rotary angles at each row's own positions (HF's cos/sin layout)."""
    freqs = position_ids.t().float()[..., None] * inv_freq.float().to(position_ids.device)
    return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]


def olmo3_rope(hf_config) -> tuple[list[torch.Tensor], float]:
    """OLMo3: inverse frequencies of the sliding and of the full layers' rotary angles, and the
    full layers' attention factor, from HF's own rope functions (YaRN included)."""
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    rope = Olmo3RotaryEmbedding(hf_config)
    kinds = [k if hasattr(rope, f"{k}_inv_freq") else rope.layer_types[0] for k in ("sliding_attention", "full_attention")]
    return [getattr(rope, f"{k}_inv_freq") for k in kinds], float(getattr(rope, f"{kinds[1]}_attention_scaling"))


class Stage(torch.nn.Module):
    """This rank's pipeline stage: a GPTModel chunk, and the critic's value head on the last."""

    def __init__(self, gpt: GPTModel, kind: str, inv_freqs: list[torch.Tensor]):
        super().__init__()
        self.gpt, self.inv_freqs = gpt, inv_freqs
        self.config, self.model_type = gpt.config, gpt.model_type  # read by the schedules
        self.value_head = None
        if kind == "critic" and gpt.post_process:
            gpt.output_layer = None  # the critic has no LM head
            self.value_head = torch.nn.Linear(gpt.config.hidden_size, 1, dtype=gpt.config.params_dtype)

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [s, b, h] (after the final norm on the last stage; under SP, this TP
        rank's tokens on the stages before)."""
        gpt = self.gpt
        x = gpt.embedding(input_ids=input_ids, position_ids=position_ids) if gpt.pre_process else None
        rope = torch.cat([rotary_angles(position_ids, f) for f in self.inv_freqs], dim=-1)
        hidden = gpt.decoder(hidden_states=x, attention_mask=attention_mask(mask), rotary_pos_emb=rope)
        if gpt.post_process and self.config.sequence_parallel:
            # Every TP rank's head runs on all tokens and gets the whole gradient: split it back.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden
