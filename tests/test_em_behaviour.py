"""The EM loop's behaviour, with assertions that a wrong loop would fail: value/token
alignment, the E-step, loss shares, GSPO's clips, TTRL's voters, drift, stage 1's cache."""
import copy
import math

import pytest
import torch

from tempo import algorithm, rewards
from tempo.base_model import base_model_dir
from tempo.build import build_models, build_splits
from tempo.algorithm import loss_shares
from tempo.em import EMTrainer
from tempo.errors import RefillError
from tempo.grading import Grade
from tempo.methods import METHODS
from tempo.models.base import TokenBatch
from tempo.models.hf import HFModel
from tempo.config import Optim
from tempo.stage1 import stage1_key
from tempo.train import train
from helpers import micro_config


# -- the critic reads V(x, y_<t) --------------------------------------------------------

class TokenValueTrunk(torch.nn.Module):
    """A 'transformer' whose hidden state at a position is the one-hot of that position's token,
    so a linear value head reads a per-token table: values are computable by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        class Out:
            last_hidden_state = torch.nn.functional.one_hot(input_ids, self.vocab).float()
        return Out()


class TinyCritic(torch.nn.Module):
    def __init__(self, table: list[float]):
        super().__init__()
        self.model = TokenValueTrunk(len(table))
        self.score = torch.nn.Linear(len(table), 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(torch.tensor([table]))


def test_value_of_a_response_token_is_read_before_it():
    # Prompt [3], response [1, 2] (token 2 = EOS). Value table: token 1 -> 0.5, 2 -> -0.7, 3 -> 0.9.
    # V(x, y_<1) is read at the prompt's last token (3): 0.9; V(x, y_<2) at token 1: 0.5.
    # The old alignment, V(x, y_<=t), would give [0.5, -0.7].
    critic = HFModel(TinyCritic([0.0, 0.5, -0.7, 0.9]), "critic", Optim(0.0, 0.0, (0.9, 0.999), 1.0))
    batch = TokenBatch(torch.tensor([[3, 1, 2]]), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2))
    values = critic.infer(batch, 8)["values"]
    torch.testing.assert_close(values, torch.tensor([[0.9, 0.5]]))
    # The unlabeled terminal reward is the value at the last response column: the state
    # before the final token, after the whole answer was read.
    assert rewards.last_token(values, batch.response_mask).item() == pytest.approx(0.5)
    # So a right token (R = +1 after it) earns credit for its own choice: A_1 = R − V_<1 ≠ 0.
    adv_raw = 1.0 - values
    assert adv_raw[0, 0].item() == pytest.approx(0.1)


# -- E-step --------------------------------------------------------------------------------

def trainer_for(tmp_path, policy_path, *extra, method="tempo"):
    cfg = micro_config(tmp_path, policy_path, "stage1.steps=0", "stage1.critic_epochs=0",
                       f"algorithm.method={method}", *extra)
    torch.manual_seed(0)
    models = build_models(cfg, policy_path, None, need_critic=METHODS[method].uses_critic)
    return EMTrainer(cfg, models, build_splits(cfg))


def labeled_batch(trainer, returns):
    problems = trainer.splits.labeled[:2]
    rollouts, _ = trainer.collector.roll(problems, trainer.cfg.rollout.n)
    tokens = rollouts.token_batch()
    old = trainer.critic.infer(tokens, 8)["values"]
    tokens.extras = {"old_values": old, "returns": returns(len(tokens))}
    return tokens


def value_loss_of(trainer, tokens):
    v = trainer.critic.infer(tokens, 8)["values"]
    return algorithm.value_loss(v, tokens.extras["old_values"], tokens.extras["returns"], tokens.response_mask,
                                math.inf, "seq-mean-token-mean")[0].item()


def test_e_step_lowers_the_value_loss_on_labeled_rows(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "train.critic_lr=0.01", "train.mini_batches=2", "train.update_epochs=2")
    tokens = labeled_batch(trainer, lambda b: torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0))
    before = value_loss_of(trainer, tokens)
    stats = trainer.e_step(tokens, torch.ones(len(tokens), dtype=torch.bool))
    assert value_loss_of(trainer, tokens) < before
    assert stats["critic/grad_norm"] > 0


def test_masked_e_step_is_the_hand_computed_update(tmp_path, micro_model):
    # The authors' E-step: the whole batch in order, each micro-batch's loss over its labeled
    # rows weighted by its rows' share of the mini-batch (3/8, 3/8, 2/8 here; the middle one has none).
    trainer = trainer_for(tmp_path, micro_model, "algorithm.e_step_rows=masked", "train.mini_batches=1",
                          "train.shuffle_minibatches=false",
                          "train.micro_batch_size=3", "train.grad_clip=1e9", "train.critic_lr=0.01")
    tokens = labeled_batch(trainer, lambda b: torch.where(torch.arange(b) % 3 == 0, 1.0, -1.0))
    labeled = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    by_hand = copy.deepcopy(trainer.critic)
    trainer.e_step(tokens, labeled)
    a = trainer.cfg.algorithm
    total = 0.0
    for start in range(0, len(tokens), 3):
        mb, keep = tokens.select(slice(start, start + 3)), labeled[start:start + 3]
        if keep.any():
            loss, _ = algorithm.value_loss(by_hand.forward(mb)["values"][keep], mb.extras["old_values"][keep],
                                           mb.extras["returns"][keep], mb.response_mask[keep], a.cliprange_value, a.loss_agg)
            total = total + loss * len(mb) / len(tokens)
    by_hand.module.zero_grad()
    total.backward()
    for (name, p), q in zip(trainer.critic.module.named_parameters(), by_hand.module.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_masked_e_step_steps_the_optimiser_on_a_mini_batch_without_labeled_rows(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "algorithm.e_step_rows=masked", "train.mini_batches=2",
                          "train.shuffle_minibatches=false")
    tokens = labeled_batch(trainer, lambda b: torch.ones(b))
    stats = trainer.e_step(tokens, torch.arange(len(tokens)) < 2)  # the second mini-batch has none
    steps = {int(state["step"]) for state in trainer.critic.optimizer.state.values()}
    assert steps == {2} and stats["critic/value_loss"] > 0


@pytest.mark.parametrize("shuffle", [True, False])
def test_mini_batches_are_contiguous_slices_or_a_seeded_shuffle(tmp_path, micro_model, shuffle):
    trainer = trainer_for(tmp_path, micro_model, f"train.shuffle_minibatches={str(shuffle).lower()}",
                          "train.mini_batches=3", "train.update_epochs=2")
    tokens = labeled_batch(trainer, lambda b: torch.ones(b))
    tokens.extras["row"] = torch.arange(len(tokens))
    seen = []

    class Recorder:  # stands in for a model: records each optimiser step's rows
        def train_step(self, micro_batches, loss_fn):
            seen.append(torch.cat([mb.extras["row"] for mb in micro_batches]).tolist())
            return {}

    trainer._optimise(Recorder(), tokens, None, "token-mean")
    size = -(-len(tokens) // 3)
    contiguous = [list(range(i, min(i + size, len(tokens)))) for i in range(0, len(tokens), size)]
    assert len(seen) == 2 * len(contiguous) and sorted(sum(seen[:len(contiguous)], [])) == list(range(len(tokens)))
    assert all(sorted(rows) == rows for rows in seen)  # in row order: a group shares micro-batches
    assert (seen == contiguous * 2) != shuffle


def test_unlabeled_only_batch_never_touches_the_critic(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "train.critic_lr=0.01", "train.labeled_per_step=0")
    with torch.no_grad():  # a head that says something, so that the policy has a reward to follow
        trainer.critic.module.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    critic_before = {k: v.clone() for k, v in trainer.critic.module.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}
    stats = trainer.train_step()
    assert "critic/value_loss" not in stats and stats["recalibrations"] == 0
    for k, v in trainer.critic.module.state_dict().items():
        assert torch.equal(v, critic_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.policy.module.state_dict().items())


# -- loss shares ------------------------------------------------------------------------------

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_losses_weighted_by_shares_add_up_to_the_mini_batch_loss(agg):
    g = torch.Generator().manual_seed(0)
    B, R = 7, 5
    mask = (torch.rand(B, R, generator=g) > 0.3).float()
    mask[:, 0] = 1
    values, old = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    returns = torch.where(torch.rand(B, generator=g) > 0.5, 1.0, -1.0)
    whole = algorithm.value_loss(values, old, returns, mask, 0.1, agg)[0]
    shares = loss_shares(mask, agg)
    parts = sum(algorithm.value_loss(values[s], old[s], returns[s], mask[s], 0.1, agg)[0] * shares[s].sum()
                for s in (slice(0, 3), slice(3, 5), slice(5, 7)))
    if agg == "seq-mean-token-sum":  # a sum per sequence is a sequence mean too: shares 1/rows
        assert torch.allclose(parts, whole)
    else:
        torch.testing.assert_close(parts, whole)


# -- GSPO's clips ---------------------------------------------------------------------------

def gspo(logp, old, adv, low=0.2, high=0.2):
    logp = torch.tensor([logp], requires_grad=True)
    loss, stats = algorithm.policy_loss(logp, torch.tensor([old]), torch.full((1, len(old)), adv),
                                        torch.ones(1, len(old)), kind="gspo", clip_low=low, clip_high=high,
                                        agg="seq-mean-token-mean")
    loss.backward()
    return loss.item(), float(stats["clipfrac"]), logp.grad


def test_gspo_lower_clip_binds_for_a_negative_advantage():
    # s = exp(−0.5) = 0.607 < 1 − 0.2: for A = −1 the clipped branch −A·0.8 = 0.8 is the max.
    loss, clipfrac, grad = gspo([-1.5, -2.5], [-1.0, -2.0], -1.0)
    assert loss == pytest.approx(0.8, rel=1e-5) and clipfrac == 1.0
    assert torch.count_nonzero(grad) == 0


def test_gspo_upper_clip_binds_for_a_positive_advantage():
    # s = exp(0.5) = 1.65 > 1.2: for A = +1 the clipped −1.2 is the max; no gradient.
    loss, clipfrac, grad = gspo([-0.5, -1.5], [-1.0, -2.0], 1.0)
    assert loss == pytest.approx(-1.2, rel=1e-5) and clipfrac == 1.0
    assert torch.count_nonzero(grad) == 0


def test_gspo_log_ratio_cap_keeps_a_runaway_ratio_finite():
    # mean log-ratio 50 → s = e^50 without the cap; capped at e^10 the loss stays finite.
    loss, _, grad = gspo([49.0, 51.0], [0.0, 0.0], -1.0, low=0.2, high=1e9)
    assert loss == pytest.approx(math.exp(10.0), rel=1e-5)
    assert torch.isfinite(grad).all()


# -- TTRL's voters, drift ---------------------------------------------------------------------

def record_generate_calls(trainer) -> list[tuple[int, int]]:
    """(prompts, n) of every generate call the trainer makes from now on."""
    calls, real = [], trainer.models.engine.generate
    trainer.models.engine.generate = lambda texts, n, **kw: calls.append((len(texts), n)) or real(texts, n, **kw)
    return calls


def test_ttrl_votes_with_more_samples_than_it_trains_on(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "algorithm.vote_samples=8", "rollout.n=4",
                          "train.prompts_per_step=2", method="ttrl")
    calls = record_generate_calls(trainer)
    batch, _ = trainer.collector.collect()
    assert calls == [(2, 8)]
    assert len(batch.grades) == 2 * 4 and len(batch.self_reward) == 8
    # The reward of a trained row is its agreement with the majority of all 8 voters.
    assert set(batch.self_reward.tolist()) <= {0.0, 1.0}


def test_tempo_rolls_labeled_and_unlabeled_prompts_in_one_call(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "train.prompts_per_step=4", "train.labeled_per_step=2")
    calls = record_generate_calls(trainer)
    batch, stats = trainer.collector.collect()
    assert calls == [(4, 4)] and stats["gen_batches"] == 1
    assert [p.is_labeled for p in batch.problems] == [True, True, False, False]
    assert batch.labeled_rows.tolist() == [True] * 8 + [False] * 8


def test_dropped_labeled_groups_are_refilled_in_later_calls(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "train.prompts_per_step=4", "train.labeled_per_step=2",
                          "algorithm.filter_groups=true", "algorithm.max_gen_batches=3")
    calls = record_generate_calls(trainer)
    batch, stats = trainer.collector.collect()
    # The first call carries both kinds; each refill only the labeled prompts still missing.
    assert calls[0] == (4, 4) and all(n == 4 and k <= 2 for k, n in calls[1:])
    assert stats["gen_batches"] == len(calls) <= 3
    labeled = sum(p.is_labeled for p in batch.problems) if batch else 0
    assert stats["dropped_groups"] == 2 + sum(k for k, _ in calls[1:]) - labeled
    if len(calls) < 3:  # stopped early: every wanted labeled group was found
        assert labeled == 2


def record_draws(trainer) -> list[list]:
    """The prompts of every draw from the flagged stream, in order."""
    draws, real = [], trainer.collector.stream.take
    trainer.collector.stream.take = lambda k: draws.append(real(k)) or draws[-1]
    return draws


def test_flagged_mixing_refills_by_whole_batches_and_cuts_to_the_batch_size(tmp_path, micro_model):
    # The micro model is never right: every labeled group lacks signal and is dropped.
    trainer = trainer_for(tmp_path, micro_model, "train.mixing=flagged", "train.prompts_per_step=4",
                          "algorithm.filter_groups=true", "algorithm.max_gen_batches=8")
    draws = record_draws(trainer)
    batch, stats = trainer.collector.collect()
    assert all(len(d) == 4 for d in draws) and stats["gen_batches"] == len(draws)
    drawn = [p for d in draws for p in d]
    kept = [p for p in drawn if not p.is_labeled]
    assert len(kept) >= 4 and len([p for p in draws[-1] if not p.is_labeled]) > 0  # the last draw completed it
    assert [p.id for p in batch.problems] == [p.id for p in kept[:4]]  # stream order, cut to the batch size
    assert stats["dropped_groups"] == len(drawn) - len(kept) and stats["labeled_acc"] == 0.0
    assert len(batch.grades) == len(batch.self_reward) == 4 * trainer.cfg.rollout.n


def test_flagged_mixing_stops_with_one_line_when_the_refills_run_out(tmp_path, micro_model):
    trainer = trainer_for(tmp_path, micro_model, "train.mixing=flagged", "train.prompts_per_step=4",
                          "task.num_unlabeled=1", "algorithm.filter_groups=true", "algorithm.max_gen_batches=2")
    with pytest.raises(RefillError, match=r"algorithm.max_gen_batches: 2 generation batches kept [0-2] of "
                                          r"train.prompts_per_step=4 prompts"):
        trainer.collector.collect()


def test_drift_stats_by_hand():
    grades = [Grade("1", True), Grade("2", False), Grade("1", True), Grade("3", False)]
    pseudo = torch.tensor([0.6, 0.4, -0.2, -0.9])
    unlabeled = torch.tensor([True, True, True, True])
    out = rewards.drift_stats(pseudo, 0.0, grades, unlabeled, n=2)
    # Verdicts (pseudo > 0): [1, 1, 0, 0] against truth [1, 0, 1, 0]: 2 of 4 agree.
    assert out["drift/pseudo_acc"] == pytest.approx(0.5)
    truth = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = torch.corrcoef(torch.stack([pseudo, truth]))[0, 1].item()
    assert out["drift/pseudo_corr"] == pytest.approx(expected)
    assert out["drift/true_acc_unlabeled"] == pytest.approx(0.5)
    # Group 1: {1, 2} tie → earliest "1" (right); group 2: {1, 3} → "1" (right).
    assert out["drift/majority_correct"] == pytest.approx(1.0)


# -- stage 1's cache --------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["stage1.critic_lr=0.5", "algorithm.cliprange_value=0.3",
                                      "stage1.critic_epochs=9", "stage1.critic_samples=3", "stage1.critic_decay=false",
                                      "stage1.critic_target_auroc=0.9", "train.critic_weight_decay=0.2",
                                      "stage1.critic_retry_lr=0.001", "stage1.critic_retry_below=0.7",
                                      "base_model.hidden_size=32", "model.critic_path=/elsewhere", "train.seed=3"])
def test_stage1_key_changes_with_every_critic_setting(tmp_path, override):
    from tempo.config import load_config

    def key(cfg):  # the base model's path carries its shape and training (base_model.*)
        return stage1_key(cfg, str(base_model_dir(cfg.task, cfg.base_model)), cfg.model.critic_path or None)

    assert key(load_config("configs/tiny_cpu.yaml")) != key(load_config("configs/tiny_cpu.yaml", [override]))


def test_stage1_key_ignores_kernels_offload_method_and_length():
    from tempo.config import load_config

    base = load_config("configs/tiny_cpu.yaml")
    for override in ("model.kernels=reference", "model.cpu_offload=true", "algorithm.method=ttrl", "train.steps=7",
                     "train.critic_lr=0"):
        assert stage1_key(base, "b", None) == stage1_key(load_config("configs/tiny_cpu.yaml", [override]), "b", None)
    assert stage1_key(base, "b", None) != stage1_key(base, "b", "other-critic")


def test_a_second_run_reuses_stage1(tmp_path, micro_model, caplog):
    cfg = micro_config(tmp_path, micro_model, "stage1.critic_epochs=1", "stage1.steps=0", "train.steps=1",
                       "run.save_checkpoints=false")
    with caplog.at_level("INFO", logger="tempo"):
        train(cfg)
        assert "stage 1: critic" in caplog.text
        caplog.clear()
        cfg.run.out_dir = str(tmp_path / "run2")
        train(cfg)
        assert "stage 1: critic" not in caplog.text


def test_a_critic_checkpoint_is_told_from_a_language_model(tmp_path, micro_model):
    from tempo.models.base import has_value_head
    from tempo.models.hf import load_critic_module

    assert not has_value_head(micro_model)
    load_critic_module(micro_model, torch.float32, init_from_policy=True).save_pretrained(tmp_path / "critic")
    assert has_value_head(str(tmp_path / "critic"))


def test_on_policy_m_step_without_a_scoring_pass_moves_the_policy_the_same(tmp_path, micro_model):
    """One mini-batch, one epoch: the M-step's own forward gives the old log-probs; the update is
    the one the separate scoring pass would have given."""
    params = []
    for skip in (True, False):
        trainer = trainer_for(tmp_path / str(skip), micro_model, "train.mini_batches=1", "train.micro_batch_size=64")
        rollouts, _ = trainer.collector.roll(trainer.splits.unlabeled[:2], trainer.cfg.rollout.n)
        tokens = rollouts.token_batch()
        adv = torch.linspace(-1, 1, len(tokens))[:, None].expand_as(tokens.response_mask).contiguous()
        tokens.extras = {"advantages": adv}
        if not skip:
            tokens.extras["old_logp"] = trainer.policy.infer(tokens, 64)["logp"]
        stats = trainer.m_step(tokens)
        assert ("actor/entropy_sum" in stats) == skip
        params.append([p.detach().clone() for p in trainer.policy.module.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*params))
    assert any(not torch.equal(a, p) for a, p in zip(params[0], build_models(
        trainer.cfg, micro_model, None, need_critic=False).policy.module.parameters()))


# -- an engine that reports its sampling log-probs -----------------------------------------------

def test_engine_log_probs_are_compared_and_truncated_importance_sampling_weights_advantages(
        tmp_path, micro_model, monkeypatch):
    """An engine whose log-probs sit log 2 below the trainer's on every sampled token: the step
    logs that gap, and with tis_cap 1.5 every advantage is scaled by min(2, 1.5)."""
    seen = {}
    for cap in (0.0, 1.5):
        trainer = trainer_for(tmp_path, micro_model, "train.mini_batches=1", f"algorithm.tis_cap={cap}")
        real = trainer.models.engine.generate

        def generate(texts, n, **kw):
            out = real(texts, n, **kw)
            tokens = out.token_batch()
            out.logprobs = trainer.policy.infer(tokens, 8)["logp"] - math.log(2.0) * tokens.response_mask
            return out

        trainer.models.engine.generate = generate
        m_step = trainer.m_step
        monkeypatch.setattr(trainer, "m_step", lambda tokens: seen.setdefault(cap, tokens.extras) and m_step(tokens))
        torch.manual_seed(0)
        stats = trainer.train_step()
        assert stats["rollout/logp_diff_mean"] == pytest.approx(math.log(2.0), abs=1e-5)
        assert stats["rollout/logp_diff_max"] == pytest.approx(math.log(2.0), abs=1e-5)
        assert "old_logp" in seen[cap]  # scored before the update, to compare with the engine's
    torch.testing.assert_close(seen[1.5]["advantages"], seen[0.0]["advantages"] * 1.5)
    # unit check of the weights: below the cap they are the ratio itself
    w = algorithm.tis_weights(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.1, -2.0, -1.0]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(-0.1), 2.0, 1.0]))
