"""The arithmetic of policy-gradient RL on language models, as pure tensor functions:
GRPO's group-relative advantages, the k3 KL estimator (optionally importance-weighted:
TRL's `use_bias_correction_kl`), the clipped surrogate with its loss normalisations (TRL
1.16's `loss_type`, with TRL's meaning), and PPO's GAE and clipped value loss.

Shapes: `logp`, `old_logp`, `ref_logp`, `mask` are [B, T] over completion tokens (mask 1 on
a completion token that counts, 0 on prompt, padding, or a masked truncated completion);
`advantages` are [B] (one per completion, GRPO) or [B, T] (per token, PPO).

Why a GRPO loss reads ~0: the advantages are zero-mean within each group, and on the
first optimizer pass over a batch the ratio π_θ/π_old is exactly 1 (the old log-probs are
the current ones), so the surrogate is Σ Â·1 ≈ 0 (exactly 0 with equal lengths and the
"grpo"/"dr_grpo" normalisations). Its *gradient* is not zero: it is Σ Â ∇log π, the policy
gradient. The number to watch is the reward, not the loss.
"""

from __future__ import annotations

import torch

from nanoseek.train.rl.config import LOSS_TYPES, SCALE_REWARDS  # the settings' names

STD_EPS = 1e-4  # TRL's: a group of equal rewards gets advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """DeepSeekMath's outcome advantage Â_i = (r_i - mean(group)) / std, std per group
    ("group", GRPO), over the whole batch ("batch", more robust to easy/hard prompts) or
    not at all ("none", Dr. GRPO: the std reweights prompts by their difficulty).
    rewards [B*G] in group order -> advantages [B*G]."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale!r}: expected one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected [B * {group_size}]")
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std() + STD_EPS)
    return adv.flatten()


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: the groups whose G rewards are all equal (zero advantage: no signal;
    DAPO's dynamic sampling drops them)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) by Schulman's k3 estimator, π_ref/π_θ - log(π_ref/π_θ) - 1:
    unbiased, always >= 0, and low-variance (what DeepSeekMath uses)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_penalty(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
               bias_correction: bool) -> torch.Tensor:
    """The per-token KL term of GRPO's loss: k3, or with `bias_correction` (TRL's
    use_bias_correction_kl, DeepSeek-V3.2) k3·ρ with ρ = π_θ/π_old, not detached. The tokens
    were sampled from π_old, and differentiating k3 with them held fixed does not give the
    gradient of KL(π_θ || π_ref), even on-policy; E_π_old[ρ·k3] = KL(π_θ || π_ref), value
    and gradient. On the first pass ρ = 1: the value is unchanged, the gradient gains
    k3·∇log π."""
    kl = k3_kl(logp, ref_logp)
    return kl * torch.exp(logp - old_logp) if bias_correction else kl


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token objective min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â), ρ = π_θ/π_old, and the
    tokens where the clip is active (the ratio moved past the trust region in the direction
    the advantage pushes). DAPO's clip-higher: eps_high > eps_low."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    objective = torch.min(ratio * adv, clipped_ratio * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return objective, clipped


def normalise(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, step_tokens,
              micro_batches: int, max_completion_length: int) -> torch.Tensor:
    """This micro-batch's loss: a per-token loss [B, T] summed the way `loss_type` weighs
    tokens, as TRL 1.16's GRPOTrainer does. `step_tokens`: the tokens that count in the
    whole optimizer step (every micro-batch, every data-parallel rank); `micro_batches`: the
    micro-batches of the step over all ranks (grad_accum x dp; nanoseek sums gradients
    over ranks, where DDP averages them, so this one divisor is TRL's ga and DDP's mean):
      grpo    each completion's mean over its tokens, averaged over the micro-batch's
              completions (DeepSeekMath; a long completion's tokens weigh less: the length
              bias Dr. GRPO points out);
      bnpo    the micro-batch's own token mean ("batch-normalised": a token weighs more in
              a micro-batch with fewer tokens; with one micro-batch per step it is dapo);
      dapo    sum over tokens / the step's tokens (every token of the step weighs the same);
      dr_grpo sum over tokens / (the micro-batch's completions × max_completion_length): a
              constant, no length bias.
    grpo, bnpo and dr_grpo are then divided by `micro_batches`. With micro-batches of equal
    size, grpo and dr_grpo equal the same loss over the whole step; bnpo does not."""
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    rows = per_token.shape[0]
    if loss_type == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / (rows * micro_batches)
    if loss_type == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1) / micro_batches
    if loss_type == "dapo":
        return summed.sum() / torch.as_tensor(step_tokens).clamp(min=1)
    if loss_type == "dr_grpo":
        return summed.sum() / (rows * micro_batches * max_completion_length)
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each completion's tokens (Schulman et al. 2016):
    δ_t = r_t + γV_{t+1} - V_t, Â_t = δ_t + γλÂ_{t+1}, from the last token back; the value
    after the last token is 0 (the episode ends). Returns (advantages, returns = Â + V),
    zero outside the mask. rewards, values, mask: [B, T], each row's mask one contiguous run
    (its completion: nothing after it counts, what comes before is not reached)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """PPO's value loss per token, ½ max((V - R)², (clip(V, V_old ± ε) - R)²): the critic may
    not move further than ε from the values the advantages were computed with."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean unit-variance over the masked entries (PPO's advantage normalisation)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m
