"""Direct Preference Optimization (Rafailov et al., 2023) with the sigmoid loss:

    L = -log σ(β [(log π(c|x) - log π_ref(c|x)) - (log π(r|x) - log π_ref(r|x))])

log π(y|x) is the sum of the completion's token log-probs (prompt tokens excluded, its eos
included); π_ref is the frozen starting model: a copy of --model that gets no gradient, or,
with LoRA, the same network with its adapters switched off (no second copy in memory).
β (r_θ = β log π/π_ref is the implicit reward) sets how far the policy may move from the
reference. Logged: the loss, the implicit rewards of chosen and rejected, their margin
and the reward accuracy (margin > 0, TRL's `rewards/accuracies`); before and after the run
also how often the policy itself prefers the chosen answer (log π(c) > log π(r)).

Pairs come from a JSONL file (data/preferences.py) or are sampled from a task: several
completions per prompt from the starting model through the engine, scored with the task's
reward, the best paired with the worst when one is correct and the other not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.data.preferences import PairBatch, encode_pairs, read_pairs
from nanoseek.model.cache import PaddedRows
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.posttrain.settings import DPOConfig, PairSampling, dpo_train_config  # noqa: F401 (re-exported)
from nanoseek.train.loop import Trainer
from nanoseek.train.posttrain.stage import (base_model, checkpoint_writer, load_task_lazily, merge_into,
                                            start_stage, with_adapters, write_run)
from nanoseek.train.pretrain import RunError

PAIRS_FILE = "pairs.jsonl"


# ------------------------------------------------------------------ the loss
def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log π(label | prefix) over each row's labelled positions -> [N] (fp32).
    A row ends with its last label, so the columns after it are padding, which the MoE
    does not count toward its load (`PaddedRows`)."""
    mask = labels != IGNORE_INDEX
    logits = model(input_ids, None, PaddedRows(PaddedRows.through_last(mask))).float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float):
    """Per-pair sigmoid DPO loss and the implicit rewards β·log(π/π_ref) of both answers."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses, chosen_reward.detach(), rejected_reward.detach()


@contextlib.contextmanager
def reference_mode(policy, reference):
    """The reference's forward: a frozen copy, or the policy with adapters off; eval mode
    (the MoE counts no load for it) and no graph."""
    net = reference if reference is not None else base_model(policy)
    was_training = net.training
    adapters = policy.disable_adapter() if reference is None else contextlib.nullcontext()
    net.eval()
    try:
        with adapters, torch.no_grad():
            yield net
    finally:
        net.train(was_training)


def pair_terms(policy, reference, batch: PairBatch, beta: float):
    """(losses, chosen_reward, rejected_reward, policy_chosen, policy_rejected) per pair."""
    net = base_model(policy)
    pc, pr = sequence_logps(net, *batch.chosen), sequence_logps(net, *batch.rejected)
    with reference_mode(policy, reference) as ref:
        rc, rr = sequence_logps(ref, *batch.chosen), sequence_logps(ref, *batch.rejected)
    return (*dpo_loss(pc, pr, rc, rr, beta), pc.detach(), pr.detach())


def make_loss(reference, beta: float):
    def loss_fn(model, batch: PairBatch, targets):
        losses, cr, rr, _, _ = pair_terms(model, reference, batch, beta)
        n = targets.count  # the step's pairs
        return losses.sum() / n, {"reward_chosen": cr.sum() / n, "reward_rejected": rr.sum() / n,
                                  "reward_margin": (cr - rr).sum() / n,
                                  "reward_accuracy": (cr > rr).float().sum() / n}
    return loss_fn


@torch.no_grad()
def preference_stats(policy, reference, pairs: PairBatch, beta: float, batch_size: int) -> dict:
    """Means over `pairs`: DPO loss, reward margin and accuracy, and how often the policy
    itself ranks the chosen answer higher."""
    net = base_model(policy)
    was_training = net.training
    net.eval()
    sums = torch.zeros(4)
    try:
        for i in range(0, len(pairs), batch_size):
            b = pairs.select(list(range(i, min(i + batch_size, len(pairs)))))
            losses, cr, rr, pc, pr = pair_terms(policy, reference, b, beta)
            sums += torch.stack([losses.sum(), (cr - rr).sum(), (cr > rr).float().sum(),
                                 (pc > pr).float().sum()]).cpu()
    finally:
        net.train(was_training)
    loss, margin, acc, prefers = (sums / len(pairs)).tolist()
    return {"dpo_loss": loss, "reward_margin": margin, "reward_accuracy": acc, "policy_accuracy": prefers}


# -------------------------------------------------------------- the pairs
def sample_pairs(init: str, task, sampling: PairSampling, seed: int, log=print,
                 progress: bool = False) -> list[dict]:
    """Pairs from the starting model's own samples on the task's training prompts, scored
    by the task's reward: (correct, reward) best as chosen, worst as rejected, when they
    differ in correctness or reward. progress: a bar of the requests done, on stderr."""
    from nanoseek.data.chat import encode_with_mask
    from nanoseek.engine import LLM, SamplingParams
    from nanoseek.text.tokenizer import load_tokenizer

    tok = load_tokenizer(init)
    examples = task.examples("train", sampling.prompts, seed)
    prompts = [{"prompt_token_ids": encode_with_mask(task.prompt_messages(ex), tok,
                                                add_generation_prompt=True)[0]} for ex in examples]
    params = SamplingParams(n=sampling.samples, temperature=sampling.temperature,
                            max_tokens=sampling.max_tokens, seed=seed)
    outputs = LLM(init).generate(prompts, params, use_tqdm=progress)
    pairs = []
    for ex, out in zip(examples, outputs):
        scored = sorted(((task.reward(ex, c.text), c.text) for c in out.outputs),
                        key=lambda s: (bool(s[0].correct), s[0].total))
        (worst, rejected), (best, chosen) = scored[0], scored[-1]
        if (bool(best.correct), best.total) > (bool(worst.correct), worst.total):
            pairs.append({"messages": task.prompt_messages(ex), "chosen": chosen, "rejected": rejected})
    log(f"pairs from sampling: {len(pairs)} of {len(examples)} prompts had a better and a worse "
        f"completion among {sampling.samples} samples")
    if not pairs:
        raise RunError("sampling gave no pair (every prompt's completions scored the same): raise "
                       "--samples or --temperature, or give --data pairs.jsonl")
    return pairs


def load_pairs(config: DPOConfig, out_dir: Path, log=print, progress: bool = False) -> list[dict]:
    """The run's pairs: the files given, or pairs.jsonl of this run (sampled once, so a
    resumed run trains on the same pairs), or freshly sampled ones written there."""
    if config.data:
        return [row for path in config.data for row in read_pairs(path)]
    if (out_dir / PAIRS_FILE).exists():
        return read_pairs(out_dir / PAIRS_FILE)
    pairs = sample_pairs(config.init, load_task_lazily(config.task, **config.task_options), config.sampling,
                         config.train.seed, log, progress)
    from nanoseek.checkpoint.atomic import atomic_write_text
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PAIRS_FILE, "".join(json.dumps(p) + "\n" for p in pairs))
    return read_pairs(out_dir / PAIRS_FILE)


# ---------------------------------------------------------------- the run
def dpo(out_dir: str | Path, config: DPOConfig, resume: bool = False, max_steps: int | None = None,
        progress: bool = True, log=print) -> dict:
    """Run (or resume) DPO into `out_dir`; returns run.json's content."""
    out_dir = Path(out_dir)
    config, device, model, tok = start_stage(out_dir, config, resume, max_steps)
    pairs = encode_pairs(load_pairs(config, out_dir, log, progress), tok, config.train.seq_len)
    t = config.train
    if not t.max_steps:
        t.max_steps = max(1, math.ceil(config.epochs * len(pairs) / (t.batch_size * t.grad_accum)))
    reference = None if config.lora.enabled else frozen_copy(model)
    torch.manual_seed(config.train.seed)  # the adapters' initial A, and the run after
    model, nf4 = with_adapters(model, config.lora, pairs.chosen[0][:2].to(device), log)
    trainer = build_trainer(model, reference, config, pairs, out_dir, device, progress)
    before = preference_stats(model, reference, pairs.to(device), config.beta, t.batch_size)
    if resume and trainer.resume():
        log(f"resumed at step {trainer.step}")
    log(f"DPO: {len(pairs)} pairs, beta {config.beta}, {t.max_steps} steps; before: "
        + describe(before))
    run = write_run(out_dir, config, pairs=len(pairs), before=before,
                    nf4=None if nf4 is None else vars(nf4))
    run["summary"] = trainer.fit()
    run["after"] = preference_stats(model, reference, pairs.to(device), config.beta, t.batch_size)
    if config.merge:
        merge_into(out_dir, config.init)
    log("after: " + describe(run["after"]))
    write_run(out_dir, config, **{k: v for k, v in run.items() if k not in ("stage", "settings")})
    return run


def describe(stats: dict) -> str:
    return (f"loss {stats['dpo_loss']:.4f}, reward margin {stats['reward_margin']:+.4f}, reward "
            f"accuracy {stats['reward_accuracy']:.3f}, policy prefers chosen {stats['policy_accuracy']:.3f}")


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def build_trainer(model, reference, config: DPOConfig, pairs: PairBatch, out_dir: Path, device,
                  progress: bool) -> Trainer:
    t, lora = config.train, config.lora.enabled

    def next_batch(step, micro):
        """Micro-batch `step * grad_accum + micro` of the pairs in a seeded order per epoch."""
        n, index = len(pairs), step * t.grad_accum + micro
        rows = []
        for k in range(index * t.batch_size, (index + 1) * t.batch_size):
            epoch, pos = divmod(k, n)
            rows.append(int(torch.randperm(n, generator=torch.Generator().manual_seed(t.seed + epoch))[pos]))
        return pairs.select(rows).to(device)

    return Trainer(model, t, out_dir, next_batch, make_loss(reference, config.beta),
                   count_targets=lambda b: torch.tensor(len(b), device=device),
                   on_checkpoint=checkpoint_writer(out_dir, config.init, config.lora),
                   tokens_in=lambda b: int(b.chosen[0].numel() + b.rejected[0].numel()),
                   progress=progress, update_router_biases=not lora, trainable_state_only=lora)
