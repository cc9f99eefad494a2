"""Rollouts for RL: G completions per prompt sampled by nanoseek's own engine, scored by
the task's rule-based reward, and laid out as training batches.

The engine's `LLM` is built once over the *same module* the optimizer updates, so its
forwards always read the current weights (no copy to sync). What does go stale is its
prefix cache: the latents of cached prompt blocks were computed by the weights of the
last step, so `sample_rollouts` drops it before sampling (`reset_prefix_cache`). Within
one rollout the G completions of a prompt still share that prompt's cached blocks.

A rollout keeps, per completion, the engine's log-probability of each sampled token: the
raw distribution's (vLLM's convention), which is the sampling distribution at
temperature 1. The training side compares them with its own (`logp_mismatch`), the
check that engine and trainer run the same policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from nanoseek.data.tasks.prompting import prompt_ids, fit_context
from nanoseek.model.transformer import IGNORE_INDEX


@dataclass
class Rollouts:
    """N = prompts × G completions, in group order (the G of prompt 0 first)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    engine_logp: list[list[float]]
    truncated: list[bool]            # stopped by max_completion_length, not by eos
    rewards: torch.Tensor            # [N] total reward
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each reward term
    correct: torch.Tensor | None = None  # [N] bool
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-completion numbers [N] behind the logged statistics (what ranks gather)."""
        return {"reward": self.rewards.float(), "correct": self.correct.float(),
                "length": torch.tensor([float(len(c)) for c in self.completion_ids]),
                "truncated": torch.tensor([float(t) for t in self.truncated]),
                **{f"reward_{k}": v.float() for k, v in self.components.items()}}

    def stats(self) -> dict:
        """What a step logs about its samples."""
        return stats_of(self.scores(), self.seconds)

    def select(self, keep: list[int]) -> "Rollouts":
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        idx = torch.tensor(keep, dtype=torch.long)
        return Rollouts(pick(self.prompt_ids), pick(self.completion_ids), pick(self.engine_logp),
                        pick(self.truncated), self.rewards[idx],
                        {k: v[idx] for k, v in self.components.items()}, self.correct[idx], self.seconds)


def stats_of(scores: dict[str, torch.Tensor], seconds: float) -> dict:
    """A step's logged statistics from its completions' scores (Rollouts.scores)."""
    lengths, rewards = scores["length"], scores["reward"]
    out = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
           "accuracy": float(scores["correct"].mean()),
           "completion_len": float(lengths.mean()), "completion_len_min": float(lengths.min()),
           "completion_len_max": float(lengths.max()),
           "truncated_frac": float(scores["truncated"].mean()), "rollout_s": seconds,
           "rollout_tok_s": float(lengths.sum()) / max(seconds, 1e-9)}
    out.update({k: float(v.mean()) for k, v in scores.items() if k.startswith("reward_")})
    return out


def sample_rollouts(llm, task, examples, group_size: int, params, seed: int) -> Rollouts:
    """`group_size` completions of each example's prompt at `params` (temperature,
    max_tokens), reproducible from `seed`; the engine's prefix cache is dropped first."""
    t0 = time.perf_counter()
    llm.engine.reset_prefix_cache()
    prompts = [prompt_ids(llm.tokenizer, task.prompt_messages(ex)) for ex in examples]
    base = replace(params, n=group_size, logprobs=0, skip_special_tokens=False)
    plist = [fit_context(llm, ids, replace(base, seed=seed + i * group_size))
             for i, ids in enumerate(prompts)]
    model = llm.engine.model
    was_training = model.training
    model.eval()  # the MoE counts expert load only in training mode: sampling must not
    try:
        outs = llm.generate(prompts, plist, use_tqdm=False)
    finally:
        model.train(was_training)
    r = Rollouts([], [], [], [], torch.zeros(0))
    rewards, parts, correct = [], {}, []
    for ex, ids, out in zip(examples, prompts, outs):
        for comp in out.outputs:
            if comp.finish_reason == "error":
                raise RuntimeError(f"rollout failed for prompt {ex.prompt!r}: {comp.error}")
            r.prompt_ids.append(ids)
            r.completion_ids.append(list(comp.token_ids))
            r.engine_logp.append([lp[t] for lp, t in zip(comp.logprobs, comp.token_ids)])
            r.truncated.append(comp.finish_reason == "length")
            rew = task.reward(ex, comp.text)
            rewards.append(rew.total)
            correct.append(rew.correct)
            for k, v in rew.components.items():
                parts.setdefault(k, []).append(v)
    r.rewards = torch.tensor(rewards, dtype=torch.float)
    r.components = {k: torch.tensor(v, dtype=torch.float) for k, v in parts.items()}
    r.correct = torch.tensor(correct, dtype=torch.bool)
    r.seconds = time.perf_counter() - t0
    return r


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
         device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (inputs [B, S], targets [B, S], completion mask [B, S]): position i
    predicts targets[i] = token i+1; the mask is 1 exactly where that target is a
    completion token (prompt and padding targets are IGNORE_INDEX and 0)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    S = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), S), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, (p, row) in enumerate(zip(prompt_ids, rows)):
        n = len(row) - 1
        inputs[b, :n] = torch.tensor(row[:-1])
        targets[b, len(p) - 1:n] = torch.tensor(row[len(p):])
        mask[b, len(p) - 1:n] = True
    return inputs.to(device), targets.to(device), mask.to(device)


def spread(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values (e.g. the engine's log-probs) placed where `mask` is 1."""
    out = torch.zeros(mask.shape, dtype=torch.float, device=mask.device)
    for b, v in enumerate(values):
        idx = mask[b].nonzero().flatten()
        out[b, idx] = torch.tensor(v[:len(idx)], dtype=torch.float, device=mask.device)
    return out


def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """log π(target | prefix) per position [B, S] of the logits divided by the sampling
    temperature (the distribution the completions were drawn from); 0 where the target is
    IGNORE_INDEX. Pass `hidden` (model.hidden(inputs)) to reuse a trunk's forward."""
    h = model.hidden(inputs) if hidden is None else hidden
    return target_logprobs(model, h, targets, temperature)


def target_logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target) for hidden states h [..., D] and targets [...], of the language-model
    head's logits divided by the temperature; 0 where the target is IGNORE_INDEX."""
    logits = model.lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)
