"""Typed run configuration: dataclasses, YAML files and `section.key=value` overrides.

Every knob of a run lives here, so that a YAML file in configs/ describes a run completely
and the resolved config saved in the run directory reproduces it.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tempo.errors import ConfigError


def key(default: Any, help: str) -> Any:
    """A config key: its default, and the help that `tempo config --keys` prints."""
    if isinstance(default, list):  # each config its own list
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TaskConfig:
    """The embedded task: left-to-right chains of modular arithmetic, written out step by step."""

    seed: int = key(0, "draws the questions, their split and the teacher's misconceptions")
    modulus: int = key(13, "arithmetic modulo this prime: answers are 0 .. modulus-1")
    min_ops: int = key(3, "fewest operations in a chain")
    max_ops: int = key(5, "most operations in a chain")
    ops: str = key("+-*", "the operations a chain's steps draw from, uniformly")
    num_labeled: int = key(64, "D_L: the small labeled set the E-step recalibrates on")
    num_unlabeled: int = key(256, "D_U: answers hidden from training, used only to score")
    num_heldout: int = key(64, "labeled slice never trained on: measures the critic's calibration")
    num_stage1: int = key(1024, "stage 1's labeled training set (RLVR before test time), not D_L")
    labeled_is_stage1: bool = key(False,
        "true: D_L is stage 1's labeled set, a stream of questions the policy sees about once each (the authors' "
        "likely D_L: their stage-1 training set); false: task.num_labeled questions of D_L's own")
    stage1_max_ops: Optional[int] = key(None,
        "most operations in stage 1's chains (the verifier's solutions and the critic's pool); null: max_ops. "
        "Under max_ops the task drifts: test time brings longer chains than the critic was trained to judge")
    stage1_ops: Optional[str] = key(None,
        "the operations of stage 1's chains; null: ops. Fewer than ops, the task drifts: test time brings steps "
        "the critic was never trained to judge, and that only D_L shows it")
    # The teacher whose worked solutions the base policy imitates (tempo.task.Teacher).
    slip: float = key(0.0, "chance a step's result is a random wrong value")
    misconceptions: float = key(0.0, "share of the facts `a op b` the teacher believes wrong")
    belief: float = key(0.6, "how often the teacher writes its wrong belief about such a fact")


@dataclass
class DataConfig:
    """Where problems come from: the embedded task, or files (JSON, JSONL, parquet)."""

    source: str = key("embedded", "embedded | files")
    labeled_files: list[str] = key([], "data.source=files: D_L, the labeled questions (prompt + answer per row)")
    unlabeled_files: list[str] = key([], "data.source=files: D_U, the test questions; their answers only score")
    heldout_files: list[str] = key([], "data.source=files: a labeled slice never trained on, to choose settings on")
    stage1_files: list[str] = key([], "stage 1's labeled data; empty: D_L")
    labeled_fraction: float = key(0.0, "with only unlabeled_files: labeled share drawn from them")
    template: str = key("raw", "raw | plain | chat")
    seed: int = key(0, "draws the labeled share (data.labeled_fraction) from unlabeled_files")


@dataclass
class BaseModelConfig:
    """The embedded base policy: a tiny Qwen3 warm-started by SFT on worked solutions."""

    hidden_size: int = key(128, "the embedded Qwen3's width")
    num_layers: int = key(4, "its decoder layers")
    num_heads: int = key(4, "its attention heads")
    num_kv_heads: int = key(2, "its key/value heads (grouped-query attention)")
    head_dim: int = key(32, "each head's width")
    ffn_size: int = key(384, "its MLP's width")
    sft_examples: int = key(6000, "teacher-solved questions the SFT trains on")
    sft_heldout: int = key(512, "teacher solutions never trained on: the stopping criterion's measure")
    sft_max_steps: int = key(3000, "a cap: SFT stops when the held-out loss is within tolerance of the floor")
    sft_tolerance: float = key(0.01, "nats a token above the teacher's floor (tempo.task.teacher_floor)")
    sft_eval_every: int = key(50, "SFT steps between checks of the held-out loss")
    sft_batch_size: int = key(64, "SFT sequences per step")
    sft_lr: float = key(3e-3, "SFT's AdamW learning rate (constant after warm-up)")
    sft_warmup_steps: int = key(100, "SFT's linear warm-up")
    sft_weight_decay: float = key(0.1, "SFT's AdamW weight decay")
    verifier_max_steps: int = key(0,
        "The embedded critic's trunk: the base policy trained on right solutions until its held-out loss on them "
        "is under verifier_tolerance (a verifier that knows more than the policy); verifier_max_steps 0: the policy "
        "itself.")
    verifier_tolerance: float = key(0.002,
        "nats a token: the verifier stops when its held-out loss on right solutions is under this")
    verifier_lr: float = key(1e-3, "the verifier's AdamW learning rate")
    seed: int = key(0, "initialises and trains the base model and the verifier")
    cache_dir: str = key(".cache/tempo",
        "built base models, verifiers and stage-1 critics, keyed by a hash of their settings")


@dataclass
class ModelConfig:
    backend: str = key("hf", "hf | megatron")
    policy_path: str = key("", "a Hugging Face checkpoint; empty: the embedded base model")
    critic_path: str = key("", "empty: initialised from the policy")
    dtype: str = key("float32", "compute dtype: float32 | bfloat16 | float16 (fp32 master weights either way)")
    tensor_parallel: int = key(1, "megatron: TP size")
    pipeline_parallel: int = key(1, "megatron: PP size (data parallel is what the world size leaves)")
    sequence_parallel: bool = key(False, "megatron, TP > 1: tokens outside attention split over the TP group")
    recompute: str = key("none",
        "Activation recomputation: none | selective (megatron: core attention) | full (every layer; HF: gradient "
        "checkpointing, which turns share_prompts off)")
    cpu_offload: bool = key(False,
        "Model states in host memory (the authors' FSDP offload=True). hf: FSDP2's CPUOffloadPolicy (weights, "
        "gradients and AdamW state on the CPU, each layer copied in to compute; without torchrun, a one-process "
        "group); megatron: the fp32 masters and AdamW state on the CPU.")
    kernels: str = key("auto", "auto | triton | torch | reference")
    attn_implementation: str = key("sdpa", "HF backend: sdpa | eager | flash_attention_2 (pip install .[flash])")
    share_prompts: bool = key(True,
        "Rows that share a prompt (a group's n samples) run it once: in the HF rollout's prefill, and in the HF "
        "backend's forward and backward (exact; Megatron runs every row)")


@dataclass
class RolloutConfig:
    engine: str = key("hf", "hf | vllm")
    n: int = key(8, "responses per prompt")
    temperature: float = key(1.0, "sampling temperature (the trainer's log-probs use it too)")
    top_p: float = key(1.0, "nucleus sampling threshold")
    max_new_tokens: int = key(48, "longest response; a longer one is truncated and counted")
    min_new_tokens: int = key(0, "EOS suppressed before this many tokens (benchmarks force full length)")
    max_prompt_tokens: int = key(1024, "a longer prompt is an error naming it (the memory plan counts on it)")
    gpu_memory_utilization: float = key(0.5,
        "vllm: its share of each GPU (weights + KV cache) while awake, lowered (with a warning) to 95% of what is "
        "free when it starts beside the trainer's models")
    seed_requests: bool = key(False,
        "vllm: one seed per request, reproducible but on vLLM's slower per-request sampling path; off, the engine's "
        "seeded generator samples")
    split_over_ranks: bool = key(True,
        "under torchrun each data-parallel engine samples its slice of a call's prompts; off, every rank samples "
        "them all, as one process would (the multi-process equivalence tests)")


@dataclass
class AlgorithmConfig:
    method: str = key("tempo", "see tempo.methods.METHODS")
    policy_loss: str = key("gspo", "gspo | ppo")
    clip_low: float = key(3e-4, "GSPO/PPO ratio clip below 1")
    clip_high: float = key(5e-4, "GSPO/PPO ratio clip above 1 (the authors' 5e-4)")
    loss_agg: str = key("seq-mean-token-mean",
        "token-mean | seq-mean-token-sum | seq-mean-token-mean (policy and value loss)")
    cliprange_value: float = key(0.1,
        "value clip: a sequence's mean prediction moves at most this far from the old values")
    e_step_rows: str = key("labeled",
        "The E-step's rows. labeled: mini-batches of the labeled rows, shuffled. masked (the authors' verl fork): "
        "contiguous mini-batches of the whole batch, each micro-batch's loss over its labeled rows weighted by its "
        "rows' share of the mini-batch; one without any still steps AdamW.")
    recalibrate_every: int = key(1, "E-step period in steps (tempo); 0 never")
    adaptive_brier: float = key(0.05, "adaptive: E-step when the labeled batch's Brier rises this much")
    filter_groups: bool = key(True, "drop labeled groups whose rewards all agree")
    max_gen_batches: int = key(4, "generate calls a step may make to refill dropped labeled groups")
    vote_samples: int = key(0, "TTRL: samples that vote (0: same as rollout.n)")
    tis_cap: float = key(0.0,
        "An engine that reports its sampling log-probs (vLLM): weight each token's policy gradient by min(π_train / "
        "π_engine, tis_cap) (truncated importance sampling); 0 off")


@dataclass(frozen=True)
class Optim:
    """One model's AdamW settings and gradient clip."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    warmup_steps: int = 0  # linear warm-up over this many optimiser steps, constant after
    eps: float = 1e-8  # AdamW's epsilon


@dataclass
class TrainConfig:
    steps: int = key(30, "EM steps")
    prompts_per_step: int = key(32, "prompts a step (labeled and unlabeled), each rolled out rollout.n times")
    labeled_per_step: int = key(8, "of prompts_per_step, drawn from D_L (train.mixing=fixed)")
    mixing: str = key("fixed",
        "fixed: labeled_per_step D_L prompts a step, dropped labeled groups refilled with D_L prompts. flagged (the "
        "authors' verl fork): prompts_per_step prompts from one shuffled stream of D_L and D_U, each flagged; "
        "dropped groups refilled by whole batches from the stream, the kept groups cut to prompts_per_step; an "
        "error when algorithm.max_gen_batches runs out.")
    mini_batches: int = key(2, "optimiser steps per pass over the step's batch, policy and critic")
    update_epochs: int = key(1, "passes over the step's batch, policy and critic")
    shuffle_minibatches: bool = key(True,
        "true: each pass's mini-batches are drawn from a seeded shuffle of the rows; false (the authors' verl "
        "fork): contiguous slices of the batch in its order, whole groups together")
    micro_batch_size: int = key(64, "sequences per forward/backward")
    policy_lr: float = key(2e-4, "the policy's AdamW learning rate")
    critic_lr: Optional[float] = key(None,
        "None: the policy's; 0 freezes the critic (configs/paper: the authors' choices)")
    weight_decay: float = key(0.0, "the policy's")
    critic_weight_decay: float = key(0.01, "the critic's AdamW weight decay")
    betas: list[float] = key([0.9, 0.999], "AdamW betas, both models")
    adam_eps: float = key(1e-8, "AdamW epsilon, both models")
    grad_clip: float = key(1.0, "global gradient-norm clip, both models")
    lr_warmup_steps: int = key(0, "both models' lr rises linearly over this many optimiser steps, then stays")
    max_bad_steps: int = key(5, "stop after this many steps in a row skipped a non-finite update (0: never)")
    seed: int = key(0, "the EM loop's sampling and shuffles, and stage 1's critic")

    def optim(self, kind: str) -> Optim:
        if kind == "policy":
            return Optim(self.policy_lr, self.weight_decay, tuple(self.betas), self.grad_clip, self.lr_warmup_steps,
                         self.adam_eps)
        lr = self.policy_lr if self.critic_lr is None else self.critic_lr
        return Optim(lr, self.critic_weight_decay, tuple(self.betas), self.grad_clip, self.lr_warmup_steps,
                     self.adam_eps)


@dataclass
class Stage1Config:
    """Before test time (the paper's stage 1): train the critic on labeled rollouts of the base
    policy, then optionally RLVR steps, on stage 1's own labeled data. Cached."""

    critic_epochs: int = key(0, "at most this many passes of value regression over one roll-out of the pool")
    critic_prompts: int = key(0, "stage-1 prompts rolled out for it (0: all)")
    critic_samples: int = key(0, "responses rolled out per prompt (0: rollout.n)")
    critic_validation: int = key(0,
        "pool questions held out of the fit: it stops after the first pass that brings their AUROC to "
        "critic_target_auroc, or after two passes in a row that do not lower their value loss by 0.5% (0: every "
        "pass runs)")
    critic_target_auroc: float = key(1.0, "the fit stops once the held-out pool questions' AUROC reaches this")
    critic_batch: int = key(64, "rows per critic optimiser step")
    critic_lr: float = key(1e-3, "the stage-1 fit's AdamW learning rate")
    critic_decay: bool = key(False, "the fit's learning rate falls linearly to zero over critic_epochs passes")
    critic_retry_lr: float = key(0.0,
        "a fit whose held-out AUROC ends under critic_retry_below starts once more from the critic's trunk, on the "
        "same rollouts, at this learning rate (0: never)")
    critic_retry_below: float = key(0.8, "the held-out AUROC under which the fit starts over (critic_retry_lr)")
    steps: int = key(0, "RLVR steps after the critic's training (policy and critic)")


@dataclass
class EvalConfig:
    every: int = key(5, "EM steps between evaluations (and at the last step)")
    k: int = key(8, "samples per D_U prompt: mean@k, maj@k")
    pass_k: int = key(4, "pass@pass_k, unbiased estimate from the k samples")
    max_prompts: int = key(0, "0: all of D_U")


@dataclass
class RunConfig:
    out_dir: str = key("runs/default", "the run's directory: config, metrics, checkpoints, report")
    tensorboard: bool = key(True, "also write TensorBoard event files")
    progress: bool = key(True, "progress bars on a terminal")
    save_checkpoints: bool = key(True, "write checkpoints (run.checkpoint_every)")
    checkpoint_every: int = key(10, "steps between checkpoints (0: only at the end); the last step always")
    keep_checkpoints: int = key(2, "newest checkpoints kept (0: all)")
    resume: str = key("never", "never | auto (newest whole checkpoint, same config) | force (config may differ)")
    profile_steps: str = key("", "A-B: a torch.profiler trace and table; on GPUs also an Nsight capture window")


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


_CHOICES = {
    ("data", "source"): ("embedded", "files"),
    ("data", "template"): ("raw", "plain", "chat"),
    ("model", "backend"): ("hf", "megatron"),
    ("model", "recompute"): ("none", "selective", "full"),
    ("model", "attn_implementation"): ("sdpa", "eager", "flash_attention_2"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("model", "kernels"): ("auto", "triton", "torch", "reference"),
    ("rollout", "engine"): ("hf", "vllm"),
    ("algorithm", "policy_loss"): ("gspo", "ppo"),
    ("algorithm", "loss_agg"): ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    ("algorithm", "e_step_rows"): ("labeled", "masked"),
    ("train", "mixing"): ("fixed", "flagged"),
    ("run", "resume"): ("never", "auto", "force"),
}


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]: null or an X
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, inner, where)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {typ} at {where}")


def _merge(cfg: Config, updates: dict, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for sec_name, sec_values in updates.items():
        if sec_name not in sections:
            raise ConfigError(f"{origin}: unknown section '{sec_name}'{_closest(sec_name, list(sections))}")
        if not isinstance(sec_values, dict):
            raise ConfigError(f"{origin}: section '{sec_name}' must be a mapping")
        section = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(section))
        for key, value in sec_values.items():
            if key not in hints:
                valid = [f"{sec_name}.{k}" for k in hints]
                raise ConfigError(
                    f"{origin}: unknown key '{sec_name}.{key}'{_closest(f'{sec_name}.{key}', valid)}"
                )
            setattr(section, key, _coerce(value, hints[key], f"{origin}: {sec_name}.{key}"))


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:  # not YAML: taken as text, which the key's type check then judges
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _merge(cfg, data, str(path))
    for text in overrides:
        section, key, value = _parse_override(text)
        _merge(cfg, {section: {key: value}}, "override")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Choices and cross-field rules that the type check cannot see."""
    from tempo.methods import METHODS  # lazy: methods pull in grading and voting

    for (sec, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, sec), key)
        if value not in choices:
            raise ConfigError(f"{sec}.{key}: '{value}' is not one of {', '.join(choices)}")
    if cfg.algorithm.method not in METHODS:
        raise ConfigError(
            f"algorithm.method: '{cfg.algorithm.method}' is not one of {', '.join(METHODS)}"
            f"{_closest(cfg.algorithm.method, list(METHODS))}"
        )
    positive = [
        ("rollout", "n"), ("rollout", "max_new_tokens"), ("train", "prompts_per_step"),
        ("train", "mini_batches"), ("train", "micro_batch_size"), ("eval", "k"), ("eval", "every"),
        ("task", "modulus"), ("task", "min_ops"),
    ]
    for sec, key in positive:
        if getattr(getattr(cfg, sec), key) <= 0:
            raise ConfigError(f"{sec}.{key}: must be positive")
    if cfg.task.max_ops < cfg.task.min_ops:
        raise ConfigError("task.max_ops: must be at least task.min_ops")
    if cfg.task.stage1_max_ops is not None and not cfg.task.min_ops <= cfg.task.stage1_max_ops <= cfg.task.max_ops:
        raise ConfigError("task.stage1_max_ops: must be between task.min_ops and task.max_ops")
    if not cfg.task.ops or set(cfg.task.ops) - set("+-*"):
        raise ConfigError(f"task.ops: {cfg.task.ops!r} must be some of +, - and *")
    if cfg.task.stage1_ops is not None and (not cfg.task.stage1_ops or set(cfg.task.stage1_ops) - set(cfg.task.ops)):
        raise ConfigError(f"task.stage1_ops: {cfg.task.stage1_ops!r} must be some of task.ops ({cfg.task.ops!r})")
    if not 0 <= cfg.train.labeled_per_step <= cfg.train.prompts_per_step:
        raise ConfigError("train.labeled_per_step: must be between 0 and train.prompts_per_step")
    if not 1 <= cfg.eval.pass_k <= cfg.eval.k:
        raise ConfigError("eval.pass_k: must be between 1 and eval.k")
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature: must be positive")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError("rollout.top_p: must be in (0, 1]")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError("train.betas: expected two numbers in [0, 1)")
    if cfg.train.update_epochs < 1:
        raise ConfigError("train.update_epochs: must be positive")
    if cfg.model.tensor_parallel < 1 or cfg.model.pipeline_parallel < 1:
        raise ConfigError("model.tensor_parallel / model.pipeline_parallel: must be at least 1")
    if cfg.model.sequence_parallel and (cfg.model.backend != "megatron" or cfg.model.tensor_parallel < 2):
        raise ConfigError("model.sequence_parallel: needs model.backend=megatron and model.tensor_parallel >= 2")
    if cfg.model.recompute == "selective" and cfg.model.backend != "megatron":
        raise ConfigError("model.recompute: selective is megatron's; the HF backend has none | full")
    from tempo.profiling import parse_steps

    parse_steps(cfg.run.profile_steps)
    if not 0 < cfg.rollout.gpu_memory_utilization < 1:
        raise ConfigError("rollout.gpu_memory_utilization: must be in (0, 1)")
    for key in ("checkpoint_every", "keep_checkpoints"):
        if getattr(cfg.run, key) < 0:
            raise ConfigError(f"run.{key}: must be 0 or more")
    for key in ("slip", "misconceptions", "belief"):
        if not 0 <= getattr(cfg.task, key) <= 1:
            raise ConfigError(f"task.{key}: must be a probability in [0, 1]")
    if cfg.train.max_bad_steps < 0:
        raise ConfigError("train.max_bad_steps: must be 0 or more")
    if cfg.train.mixing == "flagged" and cfg.algorithm.vote_samples > cfg.rollout.n:
        raise ConfigError("algorithm.vote_samples: extra voters need train.mixing=fixed")
    if cfg.stage1.critic_samples < 0:
        raise ConfigError("stage1.critic_samples: must be 0 (rollout.n) or more")
    if not 0 <= cfg.stage1.critic_target_auroc <= 1:
        raise ConfigError("stage1.critic_target_auroc: must be in [0, 1]")
    if not 0 <= cfg.stage1.critic_retry_below <= 1:
        raise ConfigError("stage1.critic_retry_below: must be in [0, 1]")
    if cfg.stage1.critic_retry_lr < 0:
        raise ConfigError("stage1.critic_retry_lr: must be 0 (no retry) or more")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_diff(a: Config, b: Config) -> list[str]:
    """The `section.key`s whose values differ between two configs."""
    da, db = to_dict(a), to_dict(b)
    return [f"{sec}.{key}" for sec in da for key in da[sec] if da[sec][key] != db[sec][key]]


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(section.key, type, default, help) for every key: `tempo config --keys` prints them."""
    rows = []
    for sec in dataclasses.fields(Config):
        section = sec.default_factory()
        for f in dataclasses.fields(section):
            typ = typing.get_type_hints(type(section))[f.name]
            name = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
            rows.append((f"{sec.name}.{f.name}", name, getattr(section, f.name), f.metadata["help"]))
    return rows

