"""PPO with a learned critic, beside GRPO for comparison (`nanoseek grpo --algo ppo`).

What GRPO was designed to remove (DeepSeekMath §4.1): PPO's value model, as large as the
policy, trained alongside it, and the extra forwards it costs. Here the critic is a copy
of the policy's transformer (as OpenRLHF/verl initialise it from the SFT model) with a
scalar head; it lives in one module with the policy (`ActorCritic`), so one optimizer,
one checkpoint and one resume cover both.

Per token t of a completion: reward r_t = -β (log π_old - log π_ref)_t, plus the task's
reward on the last token (the KL is in the reward, the InstructGPT way); advantages by GAE
(γ, λ) over the critic's values, whitened over the batch; loss = clipped surrogate +
vf_coef × clipped value loss. The rollout costs one more policy forward (π_old, needed by
the KL reward before any update) and a critic forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nanoseek.model.cache import PaddedRows
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.rl.objectives import clipped_surrogate, clipped_value_loss, gae, normalise
from nanoseek.train.rl.rollout import token_logprobs


class ActorCritic(nn.Module):
    """The policy and a critic (a copy of the policy's trunk + a value head, zero-initialised
    so the first values are 0)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.critic = copy.deepcopy(policy)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def values(self, inputs: torch.Tensor, cache=None) -> torch.Tensor:
        """V(prefix up to position i) [B, S]: the value of the state in which target i is chosen."""
        return self.value_head(self.critic.hidden(inputs, None, cache)).squeeze(-1).float()

    def moe_layers(self) -> list:
        return self.policy.moe_layers() + self.critic.moe_layers()

    def update_router_biases(self) -> None:
        self.policy.update_router_biases()
        self.critic.update_router_biases()


@torch.no_grad()
def ppo_prepare(stage, batches: list[dict]) -> None:
    """Old log-probs, old values, per-token rewards, GAE advantages (whitened over the whole
    rollout) and returns, added to each micro-batch."""
    cfg, model = stage.cfg, stage.model
    model.eval()
    try:
        for b in batches:
            b["old_logp"] = token_logprobs(model.policy, b["inputs"], b["targets"], cfg.temperature)
            b["old_values"] = model.values(b["inputs"]) * b["mask"]
            b["token_rewards"] = token_rewards(b, cfg.beta)
            b["gae"], b["returns"] = gae(b["token_rewards"], b["old_values"], b["mask"], cfg.gamma, cfg.lam)
    finally:
        model.train()
    adv = torch.cat([b["gae"][b["mask"]] for b in batches])
    mean, std = adv.mean(), adv.std(unbiased=False)
    for b in batches:
        b["advantages"] = (b["gae"] - mean) / (std + 1e-8) * b["mask"]


def token_rewards(b: dict, beta: float) -> torch.Tensor:
    """-β·(log π_old - log π_ref) on every completion token (k1), the task's reward added
    on its last one."""
    mask = b["mask"]
    r = torch.zeros_like(b["old_logp"])
    if b["ref_logp"] is not None and beta > 0:
        r = -beta * (b["old_logp"] - b["ref_logp"]) * mask
    last = mask.float().cumsum(-1).argmax(-1)  # the last completion position of each row
    rows = torch.arange(len(mask), device=mask.device)
    r[rows, last] += b["rewards"] * mask.any(-1)
    return r


def ppo_loss(stage, model, batch: dict, targets):
    cfg, count = stage.cfg, targets.count
    mask = batch["mask"]
    # right-padded rows end with their last target: the MoE counts no padding (PaddedRows)
    rows = PaddedRows(PaddedRows.through_last(batch["targets"] != IGNORE_INDEX))
    h = model.policy.hidden(batch["inputs"], None, rows)
    logp = token_logprobs(model.policy, batch["inputs"], batch["targets"], cfg.temperature, hidden=h)
    objective, clipped = clipped_surrogate(logp, batch["old_logp"], batch["advantages"],
                                           cfg.epsilon, cfg.eps_high)
    values = model.values(batch["inputs"], rows)
    vloss = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.cliprange_value)
    micro = targets.micro_batches
    pg = normalise(-objective, mask, cfg.loss_type, count[0], micro, stage.max_len)
    vf = normalise(vloss, mask, "dapo", count[0], micro, stage.max_len)  # the step's token mean
    tokens, m = count[0].clamp(min=1), mask.float()
    logs = {"pg_loss": pg.detach(), "value_loss": vf.detach(),
            "clip_frac": (clipped.float() * m).sum() / tokens,
            "value_mean": (values.detach() * m).sum() / tokens}
    if batch["ref_logp"] is not None:
        logs["kl"] = ((logp.detach() - batch["ref_logp"]) * m).sum() / tokens
    return pg + cfg.vf_coef * vf, {**logs, **batch.get("stats", {})}
