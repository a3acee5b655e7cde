"""Megatron-core backend: the policy and the critic on a GPTModel, with TP, PP, DP and SP.

Every rank runs the same EM loop on the same token batches. A `MegatronModel` holds this
rank's pipeline stage (a `GPTModel` chunk; on the last stage also the head) and its optimiser:

- forward: embeddings -> transformer layers -> final norm (megatron's modules, Qwen3 or OLMo3
  blocks from layers.py; rotary angles from the batch's position ids, so left-padded prompts
  see the positions HF gives them) -> head on the last stage. Sequence parallelism
  (`model.sequence_parallel`) splits the tokens outside attention across the TP group; the
  last stage gathers them back before the head. Activation recomputation
  (`model.recompute`): megatron's selective (core attention) or full (every layer). Policy: per-token log-prob and entropy of the response from the
  hidden states and the (vocabulary-sharded) LM head weight; with TP each rank reduces
  statistics of its vocabulary shard (max, sum-exp, target logit) across the TP group.
  Critic: a scalar `value_head`, replicated on the TP ranks, on every response token.
- micro-batches run through `get_forward_backward_func()` (1F1B across pipeline stages);
  the loop's loss function runs on the last stage. Data parallelism: DP replicas take
  micro-batches round-robin and their gradients are summed (the loop's losses are already
  weighted shares of the mini-batch).
- gradients: DP all-reduce; TP all-reduce of the weights whose gradient each TP rank only
  sees part of (Qwen3's per-head q/k norms; under SP every norm); first/last-stage all-reduce
  of a tied embedding; clipped by the global norm; AdamW.
- outputs (`infer`) and stats are all-reduced so that every rank gets the same numbers.
- `export_weights` gathers TP shards and PP stages into HF-named full tensors on every rank,
  in buckets of bounded size: the HF rollout engine keeps its own copy.
"""
from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tempo_kernels
from tempo.config import Optim
from tempo.models.base import LossFn, TokenBatch, TrainableLM, finish_step
from tempo.models.megatron import convert
from tempo.models.megatron.convert import ModelShape
from tempo.models.megatron.layers import block_spec

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.transformer import TransformerConfig

EXPORT_BUCKET_BYTES = 256 << 20
OUTPUTS = {"policy": ("logp", "entropy"), "critic": ("values",)}


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


class _VocabParallelLogprob(torch.autograd.Function):
    """log p(label) and entropy over a vocabulary split across the TP group.

    Each rank holds rows [v0, v0 + Vs) of the LM head; `tempo_kernels` computes the shard's
    statistics (max, sum-exp, entropy sum, target logit) without [N, Vs] logits; one MAX and
    one SUM all-reduce combine them. Backward: the shard's dW is complete, dH is summed."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, temperature, group):
        tk = tempo_kernels
        st = tk.vocab_shard_stats(hidden, weight, labels, vocab_start, temperature, with_entropy=True)
        gmax = st.max.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        st = tk.rescale_shard_stats(st, gmax)
        sums = torch.stack([st.sumexp, st.wsum, st.target])
        dist.all_reduce(sums, group=group)
        logp, entropy, lse = tk.shard_stats_to_logprob(tk.ShardStats(gmax, *sums.unbind(0)), labels)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.vocab_start, ctx.temperature, ctx.group = vocab_start, temperature, group
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        grad_h, grad_w = tempo_kernels.vocab_shard_grad(hidden, weight, labels, ctx.vocab_start, lse, entropy,
                                                        grad_logp, grad_entropy, ctx.temperature)
        dist.all_reduce(grad_h, group=ctx.group)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None


def vocab_parallel_logprob(hidden, weight_shard, labels, vocab_start: int, vocab_size: int, temperature: float):
    """(logp, entropy) [N] from hidden [N, d] and this TP rank's LM-head rows; the padding rows
    of the last shard (vocabulary padded to a multiple of TP) are left out."""
    rows = max(0, min(weight_shard.shape[0], vocab_size - vocab_start))
    weight = weight_shard[:rows]
    return _VocabParallelLogprob.apply(hidden, weight, labels, vocab_start, temperature,
                                       ps.get_tensor_model_parallel_group())


def _all_reduce_coalesced(tensors: list[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


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
            from tempo.errors import ConfigError

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


class MegatronModel(TrainableLM):
    def __init__(self, hf_config, kind: str, *, dtype: torch.dtype, optim: Optim, temperature: float = 1.0,
                 sequence_parallel: bool = False, recompute: str = "none", cpu_offload: bool = False):
        assert kind in ("policy", "critic")
        self.hf_config, self.kind = hf_config, kind
        self.shape = s = ModelShape.from_hf(hf_config)
        self.temperature, self.grad_clip, self.optim = temperature, optim.grad_clip, optim
        self.tp, self.pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.dp = ps.get_data_parallel_world_size()
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.tied = kind == "policy" and s.tied
        self.layers_per_stage = s.num_layers // self.pp
        self.export_bucket_bytes = EXPORT_BUCKET_BYTES
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        config = transformer_config(s, self.tp, self.pp, dtype, sequence_parallel, recompute)
        self.sequence_parallel = config.sequence_parallel
        with torch.random.fork_rng(devices=devices):  # building must not move the (shared) sampling RNG
            inv_freqs, factor = olmo3_rope(hf_config) if s.arch == "olmo3" else (None, 1.0)
            gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(s, self.layers_per_stage, factor ** 2),
                           vocab_size=s.padded_vocab(self.tp), max_sequence_length=s.max_positions,
                           pre_process=self.first, post_process=self.last, parallel_output=True,
                           share_embeddings_and_output_weights=self.tied, position_embedding_type="rope",
                           rotary_base=s.rope_theta)
            self.stage = Stage(gpt, kind, inv_freqs or [gpt.rotary_pos_emb.inv_freq])
        if torch.cuda.is_available():
            self.stage.cuda()
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        # Mixed precision as megatron's optimiser does it: bf16 weights compute, AdamW steps fp32
        # master copies (a 1e-6 learning rate is below bf16's resolution of most weights) and
        # copies them back; fp32 weights are their own masters. cpu_offload: the masters, and so
        # AdamW's moments and step, live in host memory (12 of the 16 bytes a parameter costs).
        pin = cpu_offload and torch.cuda.is_available()  # pinned: the copies run at full PCIe speed
        self.masters = self.params if dtype == torch.float32 and not cpu_offload else [
            torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32, pin_memory=pin,
                                           device="cpu" if cpu_offload else p.device)) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=optim.lr, weight_decay=optim.weight_decay,
                                           betas=optim.betas, eps=optim.eps)

    # -- names and weights ---------------------------------------------------------------

    def local_params(self) -> dict[str, torch.nn.Parameter]:
        """This stage's parameters under their global megatron names (see convert.py)."""
        out = {}
        for name, p in self.stage.named_parameters():
            name = name.removeprefix("gpt.")
            layer, suffix = convert.split_layer_name(name)
            if layer is not None:
                name = f"{convert.LAYER_PREFIX}{layer + self.pp_rank * self.layers_per_stage}.{suffix}"
            out[name] = p
        return out

    @torch.no_grad()
    def load_hf(self, ckpt: HFCheckpoint, zero_head: bool) -> None:
        """Fill this rank's shards from an HF checkpoint; a missing (or `zero_head`) value head is zero."""
        for name, p in self.local_params().items():
            if name.startswith("value_head.") and (zero_head or convert.hf_names(name, self.shape)[0] not in ckpt):
                p.zero_()
                continue
            # A tied LM head's copy on the last pipeline stage is the word embedding.
            source = "embedding.word_embeddings.weight" if name == "output_layer.weight" and self.tied else name
            full = convert.to_mcore(source, [ckpt[h] for h in convert.hf_names(source, self.shape)], self.shape)
            p.copy_(convert.shard(name, self.shape, full, self.tp_rank, self.tp))
        self._copy(self.params, self.masters)

    @staticmethod
    @torch.no_grad()
    def _copy(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """Weights between the model and its fp32 masters (nothing to do when they are the same)."""
        for src, dst in zip(sources, targets):
            if dst is not src:
                dst.copy_(src)

    def _owner(self, name: str) -> int:
        layer, _ = convert.split_layer_name(name)
        if layer is not None:
            return layer // self.layers_per_stage
        return 0 if name.startswith("embedding.") else self.pp - 1

    def _export_plan(self) -> list[str]:
        layer0 = [n.split(".", 3)[3] for n in self.local_params() if n.startswith(convert.LAYER_PREFIX)
                  and convert.split_layer_name(n)[0] == self.pp_rank * self.layers_per_stage]
        return convert.mcore_names(self.shape, self.kind, tuple(layer0))

    def _gather_bucket(self, names: list[str], owner: int) -> dict[str, torch.Tensor]:
        """Full megatron tensors of `names` (all on stage `owner`) on every rank."""
        s, tp = self.shape, self.tp
        shapes = [convert.full_shape(n, s, tp) for n in names]
        numels = [int(torch.Size(x).numel()) for x in shapes]
        dtype = self.params[0].dtype
        device = self.params[0].device
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        if self.pp_rank == owner:
            local = self.local_params()
            full = {n: local[n].detach() for n in names}
            sharded = [n for n in names if not convert.replicated(n, s)]
            if tp > 1 and sharded:
                send = torch.cat([local[n].detach().reshape(-1) for n in sharded])
                recv = [torch.empty_like(send) for _ in range(tp)]
                dist.all_gather(recv, send, group=ps.get_tensor_model_parallel_group())
                sizes = [local[n].numel() for n in sharded]
                per_rank = [dict(zip(sharded, r.split(sizes))) for r in recv]
                for n in sharded:
                    full[n] = convert.unshard(n, s, [pr[n].view_as(local[n]) for pr in per_rank])
            torch.cat([full[n].reshape(-1) for n in names], out=flat)
        if self.pp > 1:
            group = ps.get_pipeline_model_parallel_group()
            dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
        return {n: t.view(x) for n, t, x in zip(names, flat.split(numels), shapes)}

    @torch.no_grad()
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors on every rank (a collective: every rank must consume it)."""
        plan, s = self._export_plan(), self.shape
        elem = self.params[0].element_size()
        buckets: list[tuple[int, list[str]]] = []
        size = 0
        for name in plan:
            owner, nbytes = self._owner(name), elem * int(torch.Size(convert.full_shape(name, s, self.tp)).numel())
            if not buckets or buckets[-1][0] != owner or size + nbytes > self.export_bucket_bytes:
                buckets.append((owner, []))
                size = 0
            buckets[-1][1].append(name)
            size += nbytes
        for owner, names in buckets:
            full = self._gather_bucket(names, owner)
            for name in names:
                for hf_name, tensor in convert.to_hf(name, full[name], s):
                    yield hf_name, tensor
                    if self.tied and hf_name == "model.embed_tokens.weight":
                        yield "lm_head.weight", tensor

    # -- forward ---------------------------------------------------------------------------

    def _head(self, hidden: torch.Tensor, mb: TokenBatch) -> dict[str, torch.Tensor]:
        hidden = hidden.transpose(0, 1)  # [b, s, h]
        B, R = len(mb), mb.response_len
        h = hidden[:, -R - 1:-1]  # the state before each response token: its log-prob and V(x, y_<t)
        if self.kind == "critic":
            return {"values": self.stage.value_head(h).squeeze(-1).float()}
        h = h.reshape(B * R, -1)
        labels = mb.input_ids[:, -R:].reshape(-1)
        gpt = self.stage.gpt
        weight = gpt.shared_embedding_or_output_weight() if self.tied else gpt.output_layer.weight
        if self.tp == 1:
            logp, entropy = tempo_kernels.linear_logprob(h, weight[: self.shape.vocab_size], labels,
                                                         self.temperature, with_entropy=True)
        else:
            logp, entropy = vocab_parallel_logprob(h, weight, labels, self.tp_rank * weight.shape[0],
                                                   self.shape.vocab_size, self.temperature)
        return {"logp": logp.view(B, R), "entropy": entropy.view(B, R)}

    def _schedule(self, micro_batches: list[TokenBatch], on_output: Callable, forward_only: bool) -> None:
        """Run `micro_batches` through the pipeline; `on_output(outputs, mb)` -> loss on the last stage."""
        if not micro_batches:
            return
        one = torch.ones((), dtype=torch.int)

        def loss_func(mb, outputs):
            return on_output(outputs, mb), one, {}

        def step(data_iterator, model):
            mb = self._on_device(next(data_iterator))
            hidden = model(mb.input_ids, mb.position_ids(), mb.attention_mask)
            if not self.last:
                return hidden, None
            return self._head(hidden, mb), partial(loss_func, mb)

        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches), model=[self.stage],
            num_microbatches=len(micro_batches), seq_length=micro_batches[0].input_ids.shape[1],
            micro_batch_size=max(len(mb) for mb in micro_batches), forward_only=forward_only)

    def _on_device(self, mb: TokenBatch) -> TokenBatch:
        """`mb` on this rank's device; under SP left-padded to a multiple of TP columns, so that
        the tokens split evenly (masked columns before the prompt change no output)."""
        pad = -mb.input_ids.shape[1] % self.tp if self.sequence_parallel else 0
        if pad:
            mb = TokenBatch(F.pad(mb.input_ids, (pad, 0)), F.pad(mb.attention_mask, (pad, 0)), mb.response_mask,
                            mb.extras)
        return mb.to(self.params[0].device)

    def forward(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """Outputs on every rank; differentiable when there is one pipeline stage."""
        if self.pp > 1:
            return self.infer(batch, len(batch))
        batch = self._on_device(batch)
        hidden = self.stage(batch.input_ids, batch.position_ids(), batch.attention_mask)
        return self._head(hidden, batch)

    @torch.no_grad()
    def infer(self, batch: TokenBatch, micro_batch_size: int) -> dict[str, torch.Tensor]:
        self.eval()
        mbs = batch.split(micro_batch_size)
        starts = [i * micro_batch_size for i in range(len(mbs))]
        mine = list(range(self.dp_rank, len(mbs), self.dp))
        got: list[dict[str, torch.Tensor]] = []

        def keep(outputs, mb):
            got.append(outputs)
            return torch.zeros(())

        self._schedule([mbs[i] for i in mine], keep, forward_only=True)
        keys = OUTPUTS[self.kind]
        out = torch.zeros(len(keys), len(batch), batch.response_len, device=self.params[0].device)
        if self.last and self.tp_rank == 0:  # one writer per micro-batch; the SUM fills the rest in
            for i, o in zip(mine, got):
                for k, key in enumerate(keys):
                    out[k, starts[i]:starts[i] + len(mbs[i])] = o[key].float()
        if dist.get_world_size() > 1:
            dist.all_reduce(out)
        return dict(zip(keys, out.cpu().unbind(0)))

    # -- training ------------------------------------------------------------------------

    def train_step(self, micro_batches: list[TokenBatch], loss_fn: LossFn, lr_scale: float = 1.0) -> dict[str, float]:
        self.stage.train()
        self.stage.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        stats: list[dict[str, float]] = []

        def loss(outputs, mb):
            value, mb_stats = loss_fn(outputs, mb)
            stats.append({k: float(v) for k, v in mb_stats.items()})
            return value

        self._schedule(micro_batches[self.dp_rank::self.dp], loss, forward_only=False)
        self._finish_grads()
        grad_norm = self._clip_grads()  # global over ranks: every rank takes the same decision
        totals = finish_step(self.optimizer, self.optim, self._mean_stats(stats, len(micro_batches)), grad_norm, True,
                             lr_scale)
        if not totals["nonfinite"]:
            self._copy(self.masters, self.params)
        return totals

    def _finish_grads(self) -> None:
        for p in self.params:
            if p.grad is None:  # a replica without micro-batches, or an unused parameter
                p.grad = torch.zeros_like(p)
        if self.dp > 1:
            _all_reduce_coalesced([p.grad for p in self.params], ps.get_data_parallel_group())
        if self.tp > 1:  # weights this rank applies to its heads (or, under SP, its tokens) only
            partial = [p.grad for n, p in self.local_params().items()
                       if convert.split_kind(n, self.shape) == "per_head" or getattr(p, "sequence_parallel", False)]
            _all_reduce_coalesced(partial, ps.get_tensor_model_parallel_group())
        if self.pp > 1 and self.tied and ps.is_rank_in_embedding_group():
            weight = self.stage.gpt.shared_embedding_or_output_weight()
            dist.all_reduce(weight.grad, group=ps.get_embedding_group())

    def _clip_grads(self) -> float:
        """Clip by the global L2 norm over unique parameters (TP duplicates and the tied
        embedding's last-stage copy counted once), as `clip_grad_norm_` does on one process."""
        # (megatron marks TP-sharded weights only when it initialises them; we load them instead)
        owned = [p.grad for n, p in self.local_params().items()
                 if (self.tp_rank == 0 or not convert.replicated(n, self.shape)) and not getattr(p, "shared", False)]
        sq = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for g in owned:
            sq += g.float().pow(2).sum()
        if self.tp * self.pp > 1:
            dist.all_reduce(sq, group=ps.get_model_parallel_group())
        norm = sq.sqrt()
        # one copy of the factor where the masters live (host-offloaded: not one sync a parameter)
        coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0).to(self.masters[0].device)
        for master, p in zip(self.masters, self.params):
            if master is not p:  # the fp32 master takes the gradient, scaled in fp32
                master.grad, p.grad = p.grad.to(master.device, torch.float32), None
            master.grad.mul_(coef)
        return float(norm)

    def _mean_stats(self, stats: list[dict[str, float]], count: int) -> dict[str, float]:
        """Mean over all micro-batches of the loss function's stats, the same on every rank."""
        mine: dict[str, float] = {}
        if self.last and self.tp_rank == 0:
            for st in stats:
                for k, v in st.items():
                    mine[k] = mine.get(k, 0.0) + v
        parts = [mine]
        if dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        totals: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / count for k, v in sorted(totals.items())}

    def eval(self) -> None:
        self.stage.eval()

    # -- checkpoints ---------------------------------------------------------------------

    def _optimizer_file(self, path: str) -> Path:
        return Path(path) / f"optimizer_tp{self.tp_rank}_pp{self.pp_rank}.pt"

    def save(self, path: str) -> None:
        """HF layout (config.json + model.safetensors, written by rank 0) and one optimiser
        file per (TP, PP) rank, written by data-parallel rank 0."""
        from safetensors.torch import save_file

        tensors = {n: t.contiguous().clone() for n, t in self.export_weights()
                   if not (self.tied and n == "lm_head.weight")}
        if dist.get_rank() == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            hf_config_for(self.hf_config, self.kind).save_pretrained(path)
            save_file({n: t.cpu() for n, t in tensors.items()}, str(Path(path) / "model.safetensors"),
                      metadata={"format": "pt"})
        if self.dp_rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            # bf16 weights: their fp32 masters too (rounding the saved weights up would not resume exactly)
            masters = None if self.masters is self.params else [m.detach() for m in self.masters]
            torch.save({"optimizer": self.optimizer.state_dict(), "masters": masters}, self._optimizer_file(path))
        dist.barrier()

    def load_optimizer(self, path: str) -> None:
        file = self._optimizer_file(path)
        if file.is_file():
            state = torch.load(file, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            if state["masters"] is not None:
                self._copy(state["masters"], self.masters)


def hf_config_for(hf_config, kind: str):
    """The HF config a saved checkpoint of this kind carries (critic: token classification, 1 label)."""
    import copy

    cfg = copy.deepcopy(hf_config)
    if kind == "critic":
        cfg.num_labels = 1
        cfg.classifier_dropout = 0.0
        arch = (cfg.architectures or ["Qwen3ForCausalLM"])[0]
        cfg.architectures = [arch.replace("ForCausalLM", "ForTokenClassification")]
    return cfg


def load_model(path: str, kind: str, *, dtype: torch.dtype, init_from_policy: bool = False, **kw) -> MegatronModel:
    """A policy or critic from an HF checkpoint; the critic's head is zero when made from the policy."""
    from transformers import AutoConfig

    model = MegatronModel(AutoConfig.from_pretrained(path), kind, dtype=dtype, **kw)
    model.load_hf(HFCheckpoint(path), zero_head=init_from_policy)
    return model


def init_parallel_for(paths: list[str], tensor_parallel: int, pipeline_parallel: int, seed: int) -> None:
    """Check that the TP/PP layout divides every model's heads, layers and FFN under the launched
    world size, then initialise Megatron's process groups."""
    from transformers import AutoConfig

    from tempo.dist import launched_world_size
    from tempo.models.megatron.parallel import check_layout, init_parallel

    layout = None
    for path in paths:
        s = ModelShape.from_hf(AutoConfig.from_pretrained(path))
        layout = check_layout(tensor_parallel, pipeline_parallel, launched_world_size(), num_heads=s.num_heads,
                              num_kv_heads=s.num_kv_heads, num_layers=s.num_layers, ffn_size=s.ffn_size)
    init_parallel(layout, seed)
