"""The EM loop's formulas against hand-computed examples (TEMPO, arXiv 2604.19295)."""
import math

import pytest
import torch

from tempo import algorithm, rewards
from tempo.grading import Grade
from tempo.metrics import auroc, brier, pass_at_k


def test_em_token_advantage_by_hand():
    # Raw A = R - V on valid tokens: [[0.5, 1.0], [-1.0, -0.5]]; mean 0,
    # unbiased var = (0.25 + 1 + 1 + 0.25) / 3 = 0.8333, std 0.91287.
    R = torch.tensor([1.0, -1.0])
    V = torch.tensor([[0.5, 0.0, 9.0], [0.0, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = algorithm.em_token_advantage(R, V, mask)
    s = math.sqrt(2.5 / 3)
    expected = torch.tensor([[0.5 / s, 1.0 / s, 0.0], [-1.0 / s, -0.5 / s, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)


def test_value_loss_sequence_mean_clip_by_hand():
    # Mean shift 0.4 clipped to 0.1: v_clip = v − 0.3 = [0.2, 0.4];
    # max((v−1)², (v_clip−1)²) = [0.64, 0.36], token-mean 0.5, times 0.5.
    v = torch.tensor([[0.5, 0.7]], requires_grad=True)
    loss, stats = algorithm.value_loss(v, torch.tensor([[0.2, 0.2]]), torch.tensor([1.0]),
                                       torch.ones(1, 2), cliprange=0.1, agg="token-mean")
    assert loss.item() == pytest.approx(0.25)
    assert stats["vf_clipfrac"] == pytest.approx(1.0)
    loss.backward()
    # Through v_clip = v − mean(v) + const: d/dv of 0.25·[(v0−m+c−1)² + (v1−m+c−1)²].
    # Residuals r = [−0.8, −0.6]; grad_i = 0.5·(r_i − mean(r)) = [−0.05, 0.05].
    torch.testing.assert_close(v.grad, torch.tensor([[-0.05, 0.05]]))


def test_value_loss_unclipped_is_plain_regression():
    v = torch.tensor([[0.25, 0.25]])
    loss, stats = algorithm.value_loss(v, v.clone(), torch.tensor([-1.0]), torch.ones(1, 2), 0.1, "token-mean")
    assert loss.item() == pytest.approx(0.5 * 1.25 ** 2)
    assert stats["vf_clipfrac"] == 0.0


def test_gspo_loss_and_clip_by_hand():
    # s = exp(mean(logp − old)) = exp(0.1) = 1.10517; A = 1 on both tokens.
    old = torch.tensor([[-1.1, -2.1]])
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = algorithm.policy_loss(logp, old, adv, mask, kind="gspo", clip_low=0.2, clip_high=0.2,
                                        agg="seq-mean-token-mean")
    s = math.exp(0.1)
    assert loss.item() == pytest.approx(-s, rel=1e-5)
    assert float(stats["clipfrac"]) == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -s / 2))

    # clip_high 0.05: the clipped branch −A·1.05 is the max, and it carries no gradient.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = algorithm.policy_loss(logp, old, adv, mask, kind="gspo", clip_low=0.2, clip_high=0.05,
                                        agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.05, rel=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros(1, 2))


def test_grpo_advantage_groups():
    # Group [1, 0]: mean 0.5, unbiased std 0.7071 → ±0.7071; group [1, 1] → 0.
    adv = algorithm.grpo_advantage(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, torch.ones(4, 1))
    torch.testing.assert_close(adv.squeeze(1), torch.tensor([0.7071, -0.7071, 0.0, 0.0]), atol=1e-3, rtol=0)


def test_em_outcome_advantage_is_the_authors():
    """verl fork's compute_em_outcome_advantage: score = verified reward (labeled) or the
    critic's last value clamped to [-1, 1]; (score - group mean) / (unbiased std + 1e-6)."""
    from tempo.methods import METHODS

    reward = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.3, 1.7, -2.0, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 8, dtype=torch.float64)
    adv = METHODS["tempo-outcome"].advantage.compute(reward, None, mask, 4, "auto")
    expected = []
    for group in reward.clamp(-1, 1).view(2, 4):
        expected += ((group - group.mean()) / (group.std() + 1e-6)).tolist()
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64)[:, None] * mask)
    assert METHODS["tempo-outcome"].advantage.wrong == -1.0


def test_pass_at_k_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # C(6,4)=15, C(8,4)=70
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_calibration_metrics():
    assert auroc(torch.tensor([0.9, 0.8, -0.1, -0.5]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.0, 0.0]), torch.tensor([1, 0])) == 0.5
    assert math.isnan(auroc(torch.tensor([0.3]), torch.tensor([1])))
    # V = 1 → p = 1 on a right answer (0), V = −1 → p = 0 on a right answer (1).
    assert brier(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.5)


def test_no_answer_is_wrong_and_counted():
    grades = rewards.score(["no box here", "1+1=2;\\boxed{2}", "\\boxed{3}", "\\boxed{"], ["2", "2"], 2)
    assert grades[0] == Grade(None, False)
    assert grades[1].correct and not grades[2].correct and grades[3].extracted is None
    m = rewards.group_metrics(grades, k=2, pass_k=1)
    assert m["mean@k"] == pytest.approx(0.25)
    assert m["maj@k"] == pytest.approx(0.5)  # group 1's only answer is right; group 2's is wrong
    assert m["distinct_answers"] == pytest.approx(1.0)


def test_majority_and_cluster_rewards():
    grades = [Grade(a, False) for a in ["2", "2", "3", None, "\\frac{1}{2}", "0.5", "7", None]]
    # 1/2 and 0.5 are one semantic cluster of 2: the most voted, though written two ways.
    assert rewards.majority_reward(grades, 4).tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    # A response without an answer is a cluster of its own (1/n), as in the authors' code.
    cluster = rewards.cluster_reward(grades, 4)
    torch.testing.assert_close(cluster, torch.tensor([0.5, 0.5, 0.25, 0.25, 0.5, 0.5, 0.25, 0.25]))


def test_ttrl_rewards_every_cluster_tied_for_the_most_votes():
    grades = [Grade(a, False) for a in ["2", "3", "2", "3", "2", "3", "5", None]]
    assert rewards.majority_reward(grades[:4], 4).tolist() == [1, 1, 1, 1]
    assert rewards.majority_reward(grades[4:], 4).tolist() == [1, 1, 1, 1]  # all singletons: all tied


def test_unparseable_groups_give_every_response_the_same_reward():
    grades = [Grade(None, False)] * 4  # four clusters of one: a zero advantage for every response
    assert rewards.majority_reward(grades, 4).tolist() == [1, 1, 1, 1]
    assert rewards.cluster_reward(grades, 4).tolist() == [0.25] * 4
    m = rewards.group_metrics(grades, k=4, pass_k=2)
    assert m["maj@k"] == 0.0 and m["distinct_answers"] == 0.0 and m["answer_entropy"] == 0.0


def test_empo_clusters_differently_written_equal_answers():
    # 1/2, 0.5 and \dfrac12 are one semantic cluster of 3; 3 is alone.
    grades = [Grade(a, False) for a in ["\\frac{1}{2}", "0.5", "3", "\\dfrac12"]]
    torch.testing.assert_close(rewards.cluster_reward(grades, 4), torch.tensor([0.75, 0.75, 0.25, 0.75]))


def test_answers_without_truth_still_vote():
    # Unlabeled data may carry no answer at all: the response is not right, but it votes.
    grades = rewards.score(["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "none"], [None], 4)
    assert [g.extracted for g in grades] == ["4", "4", "5", None]
    assert not any(g.correct for g in grades)
    assert rewards.majority_reward(grades, 4).tolist() == [1, 1, 0, 0]
