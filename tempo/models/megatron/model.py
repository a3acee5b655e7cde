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

import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tempo_kernels
from tempo.config import Optim
from tempo.models.base import LossFn, TokenBatch, TrainableLM, finish_step, sum_over_processes
from tempo.models.megatron import convert
from tempo.models.megatron.convert import HFCheckpoint, ModelShape, hf_config_for
from tempo.models.megatron.stage import Stage, layer_spec, olmo3_rope, transformer_config
from tempo.models.megatron.vocab_parallel import vocab_parallel_logprob

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

EXPORT_BUCKET_BYTES = 256 << 20


def _all_reduce_coalesced(tensors: list[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


class MegatronModel(TrainableLM):
    def __init__(self, hf_config, kind: str, *, dtype: torch.dtype, optim: Optim, temperature: float = 1.0,
                 sequence_parallel: bool = False, recompute: str = "none", cpu_offload: bool = False,
                 kernels: str = "auto"):
        assert kind in ("policy", "critic")
        self.hf_config, self.kind = hf_config, kind
        self.shape = s = ModelShape.from_hf(hf_config)
        self.temperature, self.grad_clip, self.optim = temperature, optim.grad_clip, optim
        self.kernels = kernels  # the tempo_kernels implementation (model.kernels)
        self.tp, self.pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.dp_size = ps.get_data_parallel_world_size()
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
                                                         self.temperature, with_entropy=True, backend=self.kernels)
        else:
            logp, entropy = vocab_parallel_logprob(h, weight, labels, self.tp_rank * weight.shape[0],
                                                   self.shape.vocab_size, self.temperature, self.kernels)
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

    def forward_many(self, parts: list[TokenBatch], mine: list[int]) -> list[dict[str, torch.Tensor] | None]:
        """Through the pipeline schedule; the outputs are the last stage's, written by its first
        TP rank only (the sum over processes must see each row once)."""
        got: list[dict[str, torch.Tensor]] = []

        def keep(outputs, mb):
            got.append(outputs)
            return torch.zeros(())

        self._schedule([parts[i] for i in mine], keep, forward_only=True)
        return got if self.last and self.tp_rank == 0 else [None] * len(mine)

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

        self._schedule(micro_batches[self.dp_rank::self.dp_size], loss, forward_only=False)
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
        if self.dp_size > 1:
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
        if self.last and self.tp_rank == 0:  # one writer a micro-batch
            for st in stats:
                for k, v in st.items():
                    mine[k] = mine.get(k, 0.0) + v
        return {k: v / count for k, v in sorted(sum_over_processes(mine).items())}

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
