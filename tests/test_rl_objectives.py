"""The RL objectives against hand-computed values: group advantages under each reward
scaling, the k3 KL, the clipped surrogate (ratio 1 on the first pass: nothing clipped),
each loss normalisation, GAE on a hand-made trajectory, the clipped value loss, and the
packing of prompt + completion into masked training rows."""

import math

import pytest
import torch

from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.rl.objectives import (clipped_surrogate, clipped_value_loss,
                                          equal_reward_groups, gae, group_advantages, k3_kl,
                                          kl_penalty, normalise, whiten)
from nanoseek.train.rl.rollout import pack, spread


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
    # one micro-batch: (per_token, mask, loss_type, the step's tokens, micro-batches, max length)
    assert normalise(per_token, mask, "grpo", 4, 1, 10).item() == pytest.approx((2.0 + 4.0) / 2)
    assert normalise(per_token, mask, "dapo", 4, 1, 10).item() == pytest.approx(10 / 4)
    assert normalise(per_token, mask, "bnpo", 4, 1, 10).item() == pytest.approx(10 / 4)
    assert normalise(per_token, mask, "dr_grpo", 4, 1, 10).item() == pytest.approx(10 / 20)
    # two micro-batches of one row each: grpo, dapo, dr_grpo add up to the whole batch's loss
    for lt in ("grpo", "dapo", "dr_grpo"):
        whole = normalise(per_token, mask, lt, 4, 1, 10)
        halves = sum(normalise(per_token[i:i + 1], mask[i:i + 1], lt, 4, 2, 10) for i in range(2))
        assert torch.allclose(whole, halves)
    # bnpo averages each micro-batch's tokens (TRL's): (6/3 + 4/1) / 2 = 3, not dapo's 10/4
    halves = sum(normalise(per_token[i:i + 1], mask[i:i + 1], "bnpo", 4, 2, 10) for i in range(2))
    assert halves.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="loss_type"):
        normalise(per_token, mask, "ppo", 4, 1, 10)


# ------------------------------------------------------------- against TRL 1.16's formulas
def trl_micro_loss(per_token_loss, mask, loss_type, *, ga, num_items_in_batch, num_processes,
                   max_completion_length, steps_per_generation=None):
    """GRPOTrainer._compute_loss's aggregation of one micro-batch in train mode (trl 1.16.0,
    trl/trainer/grpo_trainer.py), transcribed. num_items_in_batch: the active tokens of the
    whole generation batch, gathered over processes; steps_per_generation defaults to ga."""
    mask = mask.float()
    spg = steps_per_generation or ga
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / ga
    if loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        normalizer = normalizer * ga / spg
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(loss_type)


def random_step(ranks, rows_per_micro, T=7, seed=0):
    """[rank][micro] (per-token loss with grad, mask): unequal micro-batches, ragged
    completions, one fully masked row (a masked truncated completion)."""
    g = torch.Generator().manual_seed(seed)
    step = []
    for _ in range(ranks):
        micros = []
        for rows in rows_per_micro:
            lengths = torch.randint(1, T + 1, (rows,), generator=g)
            mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
            mask[0] &= rows < 3  # a masked row in the larger micro-batches
            micros.append((torch.randn(rows, T, generator=g).requires_grad_(), mask))
        step.append(micros)
    return step


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("ranks,rows_per_micro", [(1, [4]), (1, [3, 1, 5]), (2, [2, 4]), (2, [3, 3])])
def test_each_loss_type_is_trls(loss_type, ranks, rows_per_micro):
    """Every micro-batch's loss (hence every gradient) equals TRL's for the same layout:
    `ranks` data-parallel processes (TRL's DDP averages gradients over them; nanoseek sums,
    dividing by ranks x micro-batches instead), each accumulating len(rows_per_micro)
    micro-batches of those sizes."""
    step, L = random_step(ranks, rows_per_micro), 7
    ga = len(rows_per_micro)
    tokens = torch.stack([m.sum() for micros in step for _, m in micros]).sum().float()
    for micros in step:
        for per_token, mask in micros:
            ours = normalise(per_token, mask, loss_type, tokens, ga * ranks, L)
            trl = trl_micro_loss(per_token, mask, loss_type, ga=ga, num_items_in_batch=tokens,
                                 num_processes=ranks, max_completion_length=L) / ranks
            assert torch.allclose(ours, trl, rtol=1e-6, atol=1e-7), (ours, trl)
            g_ours, = torch.autograd.grad(ours, per_token)
            g_trl, = torch.autograd.grad(trl, per_token)
            assert torch.allclose(g_ours, g_trl, rtol=1e-6, atol=1e-8)


def test_bnpo_and_dapo_differ_under_gradient_accumulation():
    """Same tokens, same step: dapo divides by the step's tokens, bnpo by each micro-batch's."""
    step = random_step(1, [1, 5], seed=3)[0]
    tokens = sum(m.sum() for _, m in step).float()
    dapo = sum(normalise(p, m, "dapo", tokens, 2, 7) for p, m in step)
    bnpo = sum(normalise(p, m, "bnpo", tokens, 2, 7) for p, m in step)
    assert step[0][1].sum() != step[1][1].sum() and not torch.allclose(dapo, bnpo)
    whole_p = torch.cat([torch.nn.functional.pad(p, (0, 0)) for p, _ in step])
    whole_m = torch.cat([m for _, m in step])
    one = normalise(whole_p, whole_m, "bnpo", tokens, 1, 7)  # one micro-batch: the same
    assert torch.allclose(one, dapo)


def trl_per_token_loss(logp, old_logp, ref_logp, advantages, eps_low, eps_high, beta,
                       use_bias_correction_kl):
    """GRPOTrainer._compute_loss's per-token loss (trl 1.16.0; token-level importance
    sampling, no vLLM correction, loss types grpo/bnpo/dr_grpo/dapo), transcribed."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(logp - old_logp)
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    if use_bias_correction_kl:
        per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return per_token_loss + beta * per_token_kl


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("on_policy", [False, True])
def test_per_token_loss_and_kl_bias_correction_are_trls(bias_correction, on_policy):
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(3, 5, generator=g) - 2).requires_grad_()
    old = logp.detach() if on_policy else logp.detach() + 0.3 * torch.randn(3, 5, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    objective, _ = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    ours = -objective + 0.04 * kl_penalty(logp, old, ref, bias_correction)
    trl = trl_per_token_loss(logp, old, ref, adv, 0.2, 0.28, 0.04, bias_correction)
    assert torch.allclose(ours, trl, atol=1e-6)
    g_ours, = torch.autograd.grad(ours.sum(), logp)
    g_trl, = torch.autograd.grad(trl.sum(), logp)
    assert torch.allclose(g_ours, g_trl, atol=1e-6)


def test_bias_correction_changes_the_gradient_even_on_policy():
    """On the first pass the ratio is 1, so the value is plain k3; its gradient is not:
    d(k3·ρ)/dlogp = dk3/dlogp + k3 (TRL's docs say the same)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    plain = kl_penalty(logp, logp.detach(), ref, False)
    corrected = kl_penalty(logp, logp.detach(), ref, True)
    assert torch.allclose(plain, corrected)
    g_plain, = torch.autograd.grad(plain.sum(), logp)
    g_corr, = torch.autograd.grad(corrected.sum(), logp)
    assert torch.allclose(g_corr - g_plain, plain.detach())


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


def trl_grpo_defaults() -> dict:
    """GRPOConfig's field defaults, read from the installed TRL's source with `ast` (importing
    trl takes ~20 s); skips where TRL 1.16 is not installed."""
    import ast
    import importlib.metadata
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("trl")
    if spec is None or not importlib.metadata.version("trl").startswith("1.16."):
        pytest.skip("DIFFERS_FROM_TRL describes TRL 1.16 (pip install -e '.[dev]')")
    source = Path(spec.origin).parent / "trainer" / "grpo_config.py"
    cls = next(n for n in ast.parse(source.read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "GRPOConfig")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg == "default":
                    out[node.target.id] = ast.literal_eval(kw.value)
    return out


def test_defaults_that_differ_from_trl_are_exactly_the_listed_ones():
    """Every RLConfig option named as in TRL's GRPOConfig has TRL's default, or is listed in
    DIFFERS_FROM_TRL with TRL's actual default (and so is the learning rate)."""
    import dataclasses
    from nanoseek.train.rl.config import DIFFERS_FROM_TRL, RLConfig
    trl = trl_grpo_defaults()
    assert trl["use_bias_correction_kl"] is True and trl["loss_type"] == "dapo"
    cfg = RLConfig(init="x")
    ours = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RLConfig) if f.name in trl}
    ours["learning_rate"] = cfg.train.lr
    assert {"loss_type", "beta", "epsilon", "use_bias_correction_kl"} <= set(ours)
    differ = {name for name, value in ours.items() if value != trl[name]}
    assert differ == set(DIFFERS_FROM_TRL), differ ^ set(DIFFERS_FROM_TRL)
    for name, (theirs, why) in DIFFERS_FROM_TRL.items():
        assert theirs == trl[name] and why, name


def test_bias_correction_is_a_grpo_option():
    from nanoseek.train.rl.config import RLConfig
    RLConfig(init="x", use_bias_correction_kl=True).validate()
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        RLConfig(init="x", algo="ppo", use_bias_correction_kl=True).validate()
