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


def sample_rollouts(llm, task, examples, group_size: int, params, seed: int, make_room=None) -> Rollouts:
    """`group_size` completions of each example's prompt at `params` (temperature,
    max_tokens), reproducible from `seed`; the engine's prefix cache is dropped first.
    make_room(prompts, group_size) -> llm: called before sampling, it may return another
    engine (one with a larger cache: RLStage.make_room)."""
    t0 = time.perf_counter()
    prompts = [prompt_ids(llm.tokenizer, task.prompt_messages(ex)) for ex in examples]
    if make_room is not None:
        llm = make_room(prompts, group_size)
    llm.engine.reset_prefix_cache()
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


# The rollout engine's cache block, in tokens (EngineConfig's default).
BLOCK_SIZE = 16


def cache_blocks(prompt_lengths: list[int], max_tokens: int, copies: int = 1) -> int:
    """Cache blocks that `copies` sequences of each prompt, each up to max_tokens generated
    tokens, occupy when none of them shares a block: an upper bound on what one engine call
    over them ever holds (the prefix cache only lowers it)."""
    return copies * sum(-(-(p + max_tokens) // BLOCK_SIZE) for p in prompt_lengths)


def rollout_engine(policy, tokenizer, max_num_seqs: int, blocks: int | None):
    """The engine RL samples and evaluates with, over the live policy: its latent cache
    holds `blocks` blocks (None: the engine's default, a share of free memory capped at
    max_num_seqs sequences of the whole context), and never less than one sequence of the
    whole context, so that `max_model_len` (which fit_context reads) is the model's.

    Why sized: the default is max_num_seqs x max_position_embeddings tokens, written as
    zeros: 335 MB for the RL speedrun's model (256 sequences x 1,024 tokens x 1,280 bytes),
    where its rollouts hold 256 x (~45 + 64) tokens, 37 MB. A cache that holds every
    sequence of a call at once never preempts nor evicts a prefix-cache block within it,
    so what the engine computes is what it computed with the default cache."""
    from nanoseek.engine import LLM
    from nanoseek.engine.cache import PagedLatentCache, budget_bytes
    from nanoseek.engine.dtype import activation_dtype
    cfg = policy.config
    kw = dict(tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
              speculative=False, block_size=BLOCK_SIZE)
    if blocks is not None and not cfg.is_v4:  # V4's windows and compressed entries: default sizing
        per_block = PagedLatentCache.bytes_per_token(cfg, cfg.num_hidden_layers, activation_dtype(policy))
        device = next(policy.parameters()).device
        default = budget_bytes(0.9 if device.type == "cuda" else 0.05, device)
        blocks = max(blocks, -(-cfg.max_position_embeddings // BLOCK_SIZE)) + 1
        kw["kv_cache_memory"] = min(blocks * per_block * BLOCK_SIZE, default)
    return LLM(policy, **kw)


def engine_blocks(llm) -> int:
    """Blocks the engine's cache holds."""
    return llm.engine.block_manager.num_blocks


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


def target_logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """log π(target) for hidden states h [..., D] and targets [...], of the language-model
    head's logits divided by the temperature; 0 where the target is IGNORE_INDEX.

    The numbers (and, through `HeadLogprobs`, the gradients) are those of
    `-cross_entropy(lm_head(h).float() / T)` over all rows at once, bit for bit; what
    changes is the memory: the fp32 [rows, vocab] tensors exist `chunk_rows` rows at a
    time (default: LOGITS_CHUNK_BYTES of them), and nothing of vocabulary width is kept
    between the forward and the backward. At the RL speedrun's update (~9,900 completion
    tokens x 4,096 ids) the plain expression keeps a 155 MB log-softmax for the backward
    and peaks near 0.5 GB of such tensors."""
    head = model.lm_head
    rows = chunk_rows or max(1, LOGITS_CHUNK_BYTES // (4 * head.out_features))
    w = getattr(head, "weight", None)
    plain = (type(head) is torch.nn.Linear and head.bias is None and type(w.data) is torch.Tensor)
    if not plain:  # an adapter, a quantised or sharded head: autograd's own graph
        return _logprobs_of(head(h), targets, temperature)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return HeadLogprobs.apply(h, w, targets, temperature, rows)
    return _chunked_logprobs(torch.nn.functional.linear(h, w), targets, temperature, rows)


# fp32 bytes of the [rows, vocab] logits handled at once by target_logprobs
LOGITS_CHUNK_BYTES = 16 * 2**20


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """-cross_entropy(logits.float() / T) per target: the one expression every path runs."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def _chunked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                      rows: int) -> torch.Tensor:
    """_logprobs_of over `rows` rows at a time (each row's softmax is its own: same bits)."""
    flat, tgt = logits.flatten(0, -2), targets.flatten()
    out = torch.empty(tgt.shape, dtype=torch.float32, device=logits.device)
    for lo in range(0, len(tgt), rows):
        out[lo:lo + rows] = _logprobs_of(flat[lo:lo + rows], tgt[lo:lo + rows], temperature)
    return out.view(targets.shape)


class HeadLogprobs(torch.autograd.Function):
    """log π(target) through the head's weight W, keeping only h, W and the targets for
    the backward. The backward recomputes the logits with the same call, replaces them
    chunk by chunk by their gradient, computed with autograd's own formulas (cross-entropy,
    the division by T, the cast), and hands that to autograd's own linear backward: the
    gradients of h and W are the plain graph's, bit for bit (tests/test_grpo_memory.py),
    for one more head matmul per update."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, rows):
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.rows = temperature, rows
        return _chunked_logprobs(torch.nn.functional.linear(h, weight), targets, temperature, rows)

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [h.detach().requires_grad_(ctx.needs_input_grad[0]),
                      weight.detach().requires_grad_(ctx.needs_input_grad[1])]
            logits = torch.nn.functional.linear(*leaves)
            # each chunk's gradient overwrites its logits (the linear's backward reads h and W,
            # not its output): one [rows, vocab] tensor of the logits' dtype for both
            flat, tgt, g = logits.detach().flatten(0, -2), targets.flatten(), grad.flatten()
            for lo in range(0, len(tgt), ctx.rows):
                x = flat[lo:lo + ctx.rows].clone().requires_grad_()
                y = _logprobs_of(x, tgt[lo:lo + ctx.rows], ctx.temperature)
                flat[lo:lo + ctx.rows], = torch.autograd.grad(y, x, g[lo:lo + ctx.rows])
            wanted = [t for t in leaves if t.requires_grad]
            found = iter(torch.autograd.grad(logits, wanted, flat.view(logits.shape)))
        return (*(next(found) if t.requires_grad else None for t in leaves), None, None, None)
