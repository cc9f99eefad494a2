"""GRPO (DeepSeekMath): reinforcement learning from a rule-based reward, rollouts by
nanoseek's own engine, on the shared training loop. `nanoseek grpo --model SFT_DIR --task
arithmetic --out DIR`.

One rollout per `num_iterations` optimizer steps: `train.batch_size` prompts x G
completions, sampled by the engine (which reads the policy's weights live; its prefix
cache is dropped before each rollout), scored by the task's reward, turned into
group-normalised advantages. Each optimizer step is one pass over that batch (split in
`grad_accum` micro-batches) of the loss

    L = -Σ_i Σ_t [min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε_high) Â_i) - β KL_k3(π_θ || π_ref)_it] / norm

(objectives.py: the normalisation is `loss_type`'s, as in TRL; with
`use_bias_correction_kl` the KL term is weighted by ρ_it as well). The old-policy
log-probs of ρ are the first pass's own: that pass runs on exactly the weights that
sampled (one optimizer step per pass), so its log-probs *are* π_old, computed at training
precision and temperature at no extra forward; later passes (num_iterations > 1) reuse
them. The
engine's sampled log-probs are kept and compared (`logp_mismatch`, temperature 1): they
agree to float rounding, which is what makes this substitution exact.

Why the logged loss sits near 0: see objectives.py (zero-mean advantages, ratio 1 on the
first pass). Watch `reward`, `accuracy` and the held-out evaluation instead.
Resuming: the Trainer's checkpoint (weights, optimizer, RNG, step); a rollout is
regenerated from its step's seed, so a resumed run samples what the first run would have.

Under torchrun (`nanoseek grpo --nproc N`, or `torchrun ... -m nanoseek.train.rl.grpo`) each
data-parallel rank samples its own share of the step's prompts with its own engine over
its own (replicated) copy of the policy; see nanoseek/parallel/rl.py for what is split
and what stays global.
"""

from __future__ import annotations

import time

import torch

from nanoseek.engine import SamplingParams
from nanoseek.parallel.rl import gather_scores, max_over, mean_over, share
from nanoseek.parallel.single import SingleProcess
from nanoseek.train.loop import StepTargets, Trainer
from nanoseek.train.rl.config import RLConfig
from nanoseek.train.rl.memory import peak_rss_mb
from nanoseek.train.rl.objectives import (clipped_surrogate, equal_reward_groups,
                                          group_advantages, kl_penalty, normalise)
from nanoseek.train.rl.recompute import recompute_blocks
from nanoseek.train.rl.rollout import (Rollouts, cache_blocks, pack, rollout_engine, sample_rollouts,
                                       spread, stats_of, token_logprobs)
from nanoseek.train.rl.shared_prefix import pack_shared_prefix, shared_prefix_logprobs


# the held-out problems every evaluation reads (evaluate_task's split and seed)
EVAL_SPLIT, EVAL_SEED = "test", 0




class RLStage:
    """What the Trainer calls: next_batch (rollouts), loss_fn, count_targets, evaluate."""

    def __init__(self, cfg: RLConfig, model, policy, tokenizer, task, ref=None, device=None,
                 parallel=None):
        """parallel: the run's `Parallel` under torchrun (replicated weights; this rank
        samples its share of the prompts)."""
        self.cfg, self.model, self.policy, self.task, self.ref = cfg, model, policy, task, ref
        self.device = device or next(policy.parameters()).device
        self.par = parallel or SingleProcess()
        self.dp, self.dp_rank = self.par.dp, self.par.dp_rank
        n = cfg.train.batch_size // self.dp * cfg.num_generations
        self.tokenizer, self.max_num_seqs = tokenizer, max(n, cfg.eval_n)
        self.max_len = cfg.max_completion_length or task.max_tokens
        self.engine_need = self.initial_blocks(tokenizer)  # None: the engine's default cache
        self.llm = rollout_engine(policy, tokenizer, self.max_num_seqs, self.engine_need)
        self.params = SamplingParams(temperature=cfg.temperature, max_tokens=self.max_len)
        self.pad_id = policy.config.pad_token_id or 0
        self.index, self.micro, self.rollout_s = -1, [], 0.0

    # ------------------------------------------------------------------- engine
    def initial_blocks(self, tokenizer) -> int | None:
        """Cache blocks of the first engine: the held-out evaluation's sequences, or the
        rollout's (max_num_seqs sequences of the evaluation's longest prompt) if more. None
        (the engine's default) when the task's evaluation runs its own loop (an overridden
        Task.rollout, e.g. tool use: conversations grow past prompt + max_len)."""
        from nanoseek.data.tasks.base import Task
        from nanoseek.data.tasks.prompting import prompt_ids
        if type(self.task).rollout is not Task.rollout:
            return None
        lengths = [len(prompt_ids(tokenizer, self.task.prompt_messages(ex))) for ex in self.eval_examples()]
        return max(cache_blocks(lengths, self.max_len),
                   cache_blocks([max(lengths, default=1)], self.max_len, self.max_num_seqs))

    def eval_examples(self) -> list:
        """This rank's share of the held-out problems, as evaluate_task picks them."""
        examples = self.task.examples(EVAL_SPLIT, self.cfg.eval_n, EVAL_SEED)
        return examples[self.dp_rank * len(examples) // self.dp:(self.dp_rank + 1) * len(examples) // self.dp]

    def make_room(self, prompts: list[list[int]], copies: int):
        """The engine, rebuilt (outside any bf16 context: the cache takes the fp32 policy's
        dtype, as the first one did) when `copies` sequences of each prompt may need more
        blocks than its cache holds; the policy keeps its train/eval mode."""
        need = cache_blocks([len(p) for p in prompts], self.max_len, copies)
        if self.engine_need is not None and need > self.engine_need:
            training = self.policy.training
            self.llm = None  # the old cache goes before the new one is written
            self.llm = rollout_engine(self.policy, self.tokenizer, self.max_num_seqs, need)
            self.policy.train(training)
            self.engine_need = need
        return self.llm

    # ------------------------------------------------------------------ rollouts
    def next_batch(self, step: int, micro: int) -> dict:
        r = step // self.cfg.num_iterations
        if r != self.index:
            self.micro = []  # the last rollout's batches go before the next is sampled
            self.micro, self.index = self.rollout(r), r
        batch = self.micro[micro]
        batch["pass"] = step % self.cfg.num_iterations
        if batch["pass"] and "stats" in batch:  # later passes sample nothing
            batch["stats"] = {**batch["stats"], "rollout_s": 0.0}
        return batch

    def rollout(self, r: int) -> list[dict]:
        """Sample rollout r (seeded by r and the run's seed; this rank's share of its
        prompts) and cut it into micro-batches."""
        cfg, G = self.cfg, self.cfg.num_generations
        seed = cfg.train.seed * 1_000_003 + r
        examples = self.task.examples("train", cfg.train.batch_size, seed=seed)
        lo, hi = share(len(examples), self.dp_rank, self.dp)
        n = cfg.train.batch_size * G  # completion k of prompt i: seed*n + i*G + k,
        ro = sample_rollouts(self.llm, self.task, examples[lo:hi], G, self.params,
                             seed * n + lo * G,  # so no two completions of a run share a seed
                             make_room=self.make_room)
        self.rollout_s = ro.seconds
        scores, seconds = ro.scores(), ro.seconds
        if self.dp > 1:  # every rank's: the batch std, and statistics over the whole step
            scores = gather_scores(scores, self.par.dp_group, self.par.device)
            seconds = max_over(seconds, self.par.dp_group, self.par.device)
        stats = {**stats_of(scores, seconds), "peak_rss_mb": peak_rss_mb()}
        adv = (group_advantages(scores["reward"], G, cfg.scale_rewards)[lo * G:hi * G]
               if cfg.algo == "grpo" else torch.zeros(len(ro)))
        stats["groups_kept"] = (float((~equal_reward_groups(scores["reward"], G)).float().mean())
                                if cfg.algo == "grpo" else 1.0)  # with signal, of every rank's
        ro, adv = self.keep_groups(ro, adv)
        # exactly grad_accum micro-batches (chunk may return fewer: 6 -> 2, 2, 2 for 4)
        chunks = torch.arange(len(ro)).tensor_split(cfg.train.grad_accum)
        batches = [self.make_micro(ro, adv, idx.tolist()) for idx in chunks]
        if cfg.algo == "ppo":
            from nanoseek.train.rl.ppo import ppo_prepare
            ppo_prepare(self, batches)
        batches[0]["stats"] = stats
        return batches

    def keep_groups(self, ro: Rollouts, adv: torch.Tensor):
        """Drop the groups whose rewards are all equal (if asked); keep at least one group
        and enough completions for every micro-batch (of this rank's groups)."""
        G = self.cfg.num_generations
        if self.cfg.algo != "grpo" or not self.cfg.drop_equal_groups:
            return ro, adv
        equal = equal_reward_groups(ro.rewards, G)
        keep = [i for g in (~equal).nonzero().flatten().tolist() for i in range(g * G, (g + 1) * G)]
        if equal.all() or len(keep) < self.cfg.train.grad_accum:
            return ro, adv
        return ro.select(keep), adv[keep]

    @torch.no_grad()
    def make_micro(self, ro: Rollouts, adv: torch.Tensor, idx: list[int]) -> dict:
        """One micro-batch. GRPO packs each group's prompt once (shared_prefix.py: its
        log-probs are per completion token, [N, longest completion]); PPO's critic reads
        every position, so PPO keeps the padded rows (rollout.pack)."""
        prompts, completions = [ro.prompt_ids[i] for i in idx], [ro.completion_ids[i] for i in idx]
        if self.cfg.algo == "grpo":
            packed = pack_shared_prefix(prompts, completions, self.pad_id, self.device)
            batch, mask = {"packed": packed}, packed.mask.clone()
        else:
            inputs, targets, mask = pack(prompts, completions, self.pad_id, self.device)
            batch = {"inputs": inputs, "targets": targets}
        if self.cfg.mask_truncated_completions:
            mask &= ~torch.tensor([ro.truncated[i] for i in idx], device=self.device).unsqueeze(1)
        batch.update({"mask": mask, "advantages": adv[idx].to(self.device),
                      "rewards": ro.rewards[idx].to(self.device),
                      "engine_logp": spread([ro.engine_logp[i] for i in idx], mask), "old_logp": None,
                      "ref_logp": None})
        if self.ref is not None and self.cfg.beta > 0:
            batch["ref_logp"] = policy_logprobs(self.ref, batch, self.cfg.temperature)
        return batch

    # ---------------------------------------------------------------------- loss
    def count_targets(self, batch: dict) -> torch.Tensor:
        """[completion tokens that count, completions], summed over the step: the tokens
        divide dapo's loss and every logged per-token mean."""
        return torch.stack([batch["mask"].sum().float(),
                            torch.tensor(float(len(batch["mask"])), device=self.device)])

    def loss_fn(self, model, batch: dict, targets) -> tuple[torch.Tensor, dict]:
        if self.cfg.algo == "ppo":
            from nanoseek.train.rl.ppo import ppo_loss
            return ppo_loss(self, model, batch, targets)
        return grpo_loss(self.cfg, self.policy, batch, targets, self.max_len)

    def tokens_in(self, batch: dict) -> int:
        return int(batch["mask"].sum())

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, model) -> dict:
        """Held-out greedy accuracy through the same engine (the current weights); under
        torchrun each rank evaluates its share of the problems and the means are combined."""
        from nanoseek.train.eval import evaluate_task
        self.llm.engine.reset_prefix_cache()
        ev = evaluate_task(self.llm, self.task, n=self.cfg.eval_n, k=0, max_tokens=self.max_len,
                           seed=EVAL_SEED, split=EVAL_SPLIT, shard=(self.dp_rank, self.dp))
        means = {k: ev[k] for k in ("accuracy", "format", "mean_reward")}
        if self.dp > 1:
            means = mean_over(means, ev["n"], self.par.dp_group, self.par.device)
        return means


def grpo_loss(cfg: RLConfig, policy, batch: dict, targets: StepTargets, max_len: int):
    """This micro-batch's share of the step's GRPO loss, and its shares of the logged values.
    targets: the step's [tokens, completions] over every micro-batch and rank, and how many
    micro-batches that is (what the `loss_type` normalisations divide by)."""
    mask, count = batch["mask"], targets.count
    blocks = policy_blocks(policy) if cfg.gradient_checkpointing else []
    with recompute_blocks(blocks):  # the update's activations, one block at a time
        logp = policy_logprobs(policy, batch, cfg.temperature)
    first_pass = batch["old_logp"] is None
    if first_pass:
        batch["old_logp"] = logp.detach()  # the sampling weights' log-probs (see the docstring)
    objective, clipped = clipped_surrogate(logp, batch["old_logp"], batch["advantages"],
                                           cfg.epsilon, cfg.eps_high)
    per_token = -objective
    tokens = count[0].clamp(min=1)
    m = mask.float()
    logs = {"clip_frac": (clipped.float() * m).sum() / tokens,
            "ratio": (torch.exp(logp - batch["old_logp"]).detach() * m).sum() / tokens}
    if batch["ref_logp"] is not None:
        kl = kl_penalty(logp, batch["old_logp"], batch["ref_logp"], cfg.use_bias_correction_kl)
        per_token = per_token + cfg.beta * kl
        logs["kl"] = (kl.detach() * m).sum() / tokens
    if first_pass and cfg.temperature == 1.0:
        logs["logp_mismatch"] = ((logp.detach() - batch["engine_logp"]).abs() * m).sum() / tokens
    loss = normalise(per_token, mask, cfg.loss_type, count[0], targets.micro_batches, max_len)
    return loss, {**logs, **batch.get("stats", {})}


def policy_blocks(policy) -> list:
    """The transformer blocks of the policy's trunk (recompute.py recomputes them)."""
    return list(getattr(getattr(policy, "model", None), "layers", []))


def policy_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """Per-token log-probs in the micro-batch's own layout (packed groups or padded rows)."""
    if "packed" in batch:
        return shared_prefix_logprobs(model, batch["packed"], temperature)
    return token_logprobs(model, batch["inputs"], batch["targets"], temperature)


class RLTrainer(Trainer):
    """The shared loop, plus the split of each step's time into rollout and update."""

    def __init__(self, stage: RLStage, *args, **kw):
        super().__init__(*args, **kw)
        self.stage = stage

    def lr(self, step: int) -> float:
        """The schedule's rate times the run's factor for this step (RLConfig.lr_factor)."""
        return super().lr(step) * self.stage.cfg.lr_factor(step)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.stage.rollout_s = 0.0
        m = super().train_step()
        m["update_s"] = time.perf_counter() - t0 - self.stage.rollout_s
        return m


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m nanoseek.train.rl.grpo ARGS
    import runpy  # == nanoseek grpo ARGS
    import sys
    sys.argv = ["nanoseek", "grpo", *sys.argv[1:]]
    runpy.run_module("nanoseek", run_name="__main__")
