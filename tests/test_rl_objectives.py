"""The RL objectives against hand-computed values: group advantages under each reward
scaling, the k3 KL, the clipped surrogate (ratio 1 on the first pass: nothing clipped),
each loss normalisation, GAE on a hand-made trajectory, the clipped value loss, and the
packing of prompt + completion into masked training rows."""

import math

import pytest
import torch

from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.rl_objectives import (clipped_surrogate, clipped_value_loss,
                                          equal_reward_groups, gae, group_advantages, k3_kl,
                                          normalise, whiten)
from nanoseek.train.rollout import pack, spread


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # group 1: mean .5, sample std sqrt(1/3); group 2: mean .75, std .5
    g1 = (0.5) / (math.sqrt(1 / 3) + 1e-4)
    g2 = 0.25 / (0.5 + 1e-4)
    a = group_advantages(r, 4, "group")
    assert torch.allclose(a, torch.tensor([g1, -g1, -g1, g1, g2, g2, g2, -3 * g2]), atol=1e-6)
    none = group_advantages(r, 4, "none")
    assert torch.allclose(none, torch.tensor([.5, -.5, -.5, .5, .25, .25, .25, -.75]))
    batch = group_advantages(r, 4, "batch")
    assert torch.allclose(batch, none / (r.std() + 1e-4))
    for scale in ("group", "batch", "none"):  # zero-mean in every group: why the loss reads ~0
        assert torch.allclose(group_advantages(r, 4, scale).view(2, 4).sum(1), torch.zeros(2), atol=1e-6)


def test_equal_groups_get_zero_advantage_and_are_flagged():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert group_advantages(r, 2)[:2].abs().max() == 0
    assert equal_reward_groups(r, 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, 2, "token")


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # ratio ref/p = 0.5: 0.5 - log 0.5 - 1
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.5 - math.log(0.5) - 1, 0.0]), atol=1e-6)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_first_pass_ratio_is_one_and_nothing_is_clipped():
    logp = torch.randn(3, 5, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    obj, clipped = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2)
    assert torch.allclose(obj, adv.unsqueeze(1).expand(3, 5))
    assert not clipped.any()
    obj.sum().backward()  # the gradient is the policy gradient Σ Â ∇log π
    assert torch.allclose(logp.grad, adv.unsqueeze(1).expand(3, 5))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    obj, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    # ρ=1.5, Â=+1: min(1.5, 1.28) = 1.28 (clipped); ρ=1.5, Â=-1: min(-1.5, -1.28) = -1.5
    # ρ=0.5, Â=+1: min(0.5, 0.8) = 0.5;  ρ=0.5, Â=-1: min(-0.5, -0.8) = -0.8 (clipped)
    assert torch.allclose(obj, torch.tensor([[1.28, -1.5, 0.5, -0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_loss_normalisations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert normalise(per_token, mask, "grpo", 4, 2, 10).item() == pytest.approx((2.0 + 4.0) / 2)
    assert normalise(per_token, mask, "dapo", 4, 2, 10).item() == pytest.approx(10 / 4)
    assert normalise(per_token, mask, "bnpo", 4, 2, 10).item() == pytest.approx(10 / 4)
    assert normalise(per_token, mask, "dr_grpo", 4, 2, 10).item() == pytest.approx(10 / 20)
    # a micro-batch's share: two halves with the step's counts add up to the whole
    for lt in ("grpo", "dapo", "dr_grpo"):
        whole = normalise(per_token, mask, lt, 4, 2, 10)
        halves = sum(normalise(per_token[i:i + 1], mask[i:i + 1], lt, 4, 2, 10) for i in range(2))
        assert torch.allclose(whole, halves)
    with pytest.raises(ValueError, match="loss_type"):
        normalise(per_token, mask, "ppo", 4, 2, 10)


def test_gae_on_a_hand_made_trajectory():
    # one row: a prompt position (masked), 3 completion tokens, one padding position
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    d3 = 1.0 + 0 - 0.7                       # last token: the next value is 0
    d2 = 0.0 + gamma * 0.7 - 0.6
    d1 = 0.0 + gamma * 0.6 - 0.5
    a3, a2 = d3, d2 + gamma * lam * d3
    a1 = d1 + gamma * lam * a2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + .5, a2 + .6, a3 + .7, 0.0]]), atol=1e-6)
    # γ = λ = 1: the advantage is the return-to-go minus the value
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv1[0, 1:4], torch.tensor([0.5, 0.4, 0.3]), atol=1e-6)


def test_clipped_value_loss_and_whiten():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    # V moved 1.0 from 0 (clipped to 0.2): max((1-0)², (0.2-0)²)/2 = 0.5; second: max(1, 1)/2
    assert torch.allclose(clipped_value_loss(v, old, ret, 0.2), torch.tensor([0.5, 0.5]))
    v2 = torch.tensor([0.5])  # clipped to 0.2 is further from a return of 1: (0.8)²/2
    assert torch.allclose(clipped_value_loss(v2, torch.tensor([0.0]), torch.tensor([1.0]), 0.2),
                          torch.tensor([0.32]))
    x, m = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    w = whiten(x, m)
    assert w[3] == 0 and abs(float(w[:3].mean())) < 1e-6


def test_pack_masks_prompt_and_padding():
    inputs, targets, mask = pack([[5, 6, 7], [5, 6]], [[8, 9, 1], [3]], pad_id=2)
    assert inputs.tolist() == [[5, 6, 7, 8, 9], [5, 6, 2, 2, 2]]
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, 1],
                                [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    lp = spread([[-1.0, -2.0, -3.0], [-4.0]], mask)
    assert lp.tolist() == [[0, 0, -1, -2, -3], [0, -4, 0, 0, 0]]
