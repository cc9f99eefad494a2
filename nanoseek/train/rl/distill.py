"""On-policy distillation (DeepSeek-V4's OPD) as an RL stage: `nanoseek distill --student DIR
--teacher DIR --task T [--teacher DIR --task T ...] --out DIR`.

Each step, `batch_size` prompts (split evenly over the tasks) are sampled by the student
with nanoseek's engine, exactly as GRPO's rollouts are (RLStage's engine, cache sizing and
evaluation, reused by subclassing); each completion is scored by its task's teacher (kept
resident, eval mode, no grad), and the loss is the per-token full-vocabulary reverse KL
KL(π_student || π_teacher) of opd.py, weighted by the teacher's weight and normalised by
`loss_type` (objectives.normalise). No reward enters the loss: the task's reward and
accuracy are only logged, and the held-out greedy accuracy of every task is measured at
each evaluation ("accuracy" is their mean).

Tasks whose evaluation runs a conversation (tool use: the model calls the calculator, sees
its output and answers) are sampled the same way (`sample_conversations`), and only the
tokens the student wrote count in the loss (not the tool outputs).

`samples_from="teacher"` is the off-policy baseline: each task's teacher samples
(engine over the teacher) and the student is trained by SFT on those samples (negative
log-likelihood of the teacher's tokens), in the same loop, so both are timed alike.
`cold_start_steps=N` runs the first N steps of an on-policy run that way (the cold start
DeepSeek-R1 gives its RL), then the student samples: reverse KL's gradient on a token is
proportional to the student's own probability of it, so from a pretrained checkpoint that
never writes the teachers' format (p ≈ 0 for `<think>`) on-policy steps barely teach it.

Under torchrun each rank samples its share of every task's prompts with its own engine
(nanoseek/parallel/rl.py); the teachers are replicated on every rank.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from nanoseek.parallel.rl import gather_scores, max_over, share
from nanoseek.train.rl.distill_config import DistillConfig
from nanoseek.train.rl.grpo import RLStage, policy_blocks
from nanoseek.train.rl.memory import peak_rss_mb
from nanoseek.train.rl.objectives import normalise
from nanoseek.train.rl.opd import head_reverse_kl
from nanoseek.train.rl.recompute import recompute_blocks
from nanoseek.train.rl.rollout import (Rollouts, pack, rollout_engine, sample_rollouts, spread,
                                       stats_of, target_logprobs)


class DistillStage(RLStage):
    """RLStage with one task per teacher, teacher-scored micro-batches and the OPD loss."""

    def __init__(self, cfg: DistillConfig, policy, tokenizer, tasks: list, teachers: list,
                 parallel=None):
        self.tasks, self.teachers = tasks, teachers
        self.names = task_keys(tasks)
        super().__init__(cfg, policy, policy, tokenizer, tasks[0], None, parallel=parallel)
        self.task, self.max_len = tasks[0], max(self.budget(t) for t in tasks)
        self.teacher_llms = None  # off-policy steps: each teacher's own engine, built when first needed

    def budget(self, task) -> int:
        return self.cfg.max_completion_length or task.max_tokens

    @contextmanager
    def on(self, task):
        """RLStage's single-task machinery (make_room, evaluate) pointed at `task`."""
        saved = self.task, self.max_len
        self.task, self.max_len = task, self.budget(task)
        try:
            yield
        finally:
            self.task, self.max_len = saved

    def initial_blocks(self, tokenizer) -> int | None:
        needs = []
        for t in self.tasks:
            self.task, self.max_len = t, self.budget(t)
            needs.append(super().initial_blocks(tokenizer))
        return None if None in needs else max(needs)

    # ------------------------------------------------------------------ rollouts
    def rollout(self, r: int) -> list[dict]:
        """Rollout r: each task's share of the step's prompts (seeded by r, the run's seed
        and the task's index), this rank's share of each, sampled by the student (or, off
        policy, by the task's teacher), cut into micro-batches."""
        cfg, G = self.cfg, self.cfg.num_generations
        per_task = cfg.train.batch_size // len(self.tasks)
        off = cfg.off_policy(r * cfg.num_iterations)
        if off and self.teacher_llms is None:
            self.teacher_llms = [rollout_engine(t, self.tokenizer, self.max_num_seqs, self.engine_need)
                                 for t in self.teachers]
        elif not off:  # on-policy (the cold start is over, or a resume after it): no teacher caches
            self.teacher_llms = None
        parts, t0 = [], time.perf_counter()
        for i, task in enumerate(self.tasks):
            seed = (cfg.train.seed * 1_000_003 + r) * 64 + i
            examples = task.examples("train", per_task, seed=seed)
            lo, hi = share(len(examples), self.dp_rank, self.dp)
            with self.on(task):
                params = replace(self.params, max_tokens=self.max_len)
                llm = self.teacher_llms[i] if off else self.llm
                room = None if off else self.make_room
                ro, own = sample(llm, task, examples[lo:hi], G, params, seed * per_task * G + lo * G, room)
            parts.append((i, ro, own))
        seconds = time.perf_counter() - t0
        self.rollout_s = seconds
        rows = [(i, p, c, o, t) for i, ro, own in parts
                for p, c, o, t in zip(ro.prompt_ids, ro.completion_ids, own, ro.truncated)]
        scores = {k: torch.cat([ro.scores()[k] for _, ro, _ in parts]) for k in ("reward", "correct", "length", "truncated")}
        scores["task"] = torch.cat([torch.full((len(ro),), float(i)) for i, ro, _ in parts])
        if self.dp > 1:
            scores = gather_scores(scores, self.par.dp_group, self.par.device)
            seconds = max_over(seconds, self.par.dp_group, self.par.device)
        stats = {**stats_of(scores, seconds), "peak_rss_mb": peak_rss_mb(), "off_policy": float(off)}
        for i, name in enumerate(self.names):
            stats[f"accuracy_{name}"] = float(scores["correct"][scores["task"] == i].mean())
        chunks = torch.arange(len(rows)).tensor_split(cfg.train.grad_accum)
        batches = [self.make_micro(rows, idx.tolist(), off) for idx in chunks]
        batches[0]["stats"] = stats
        return batches

    @torch.no_grad()
    def make_micro(self, rows: list, idx: list[int], off: bool) -> dict:
        """Padded rows (rollout.pack), the loss mask (the student's own tokens), and for
        OPD each teacher's final hidden states at those tokens (the logits are formed
        chunk by chunk in the loss: opd.py)."""
        sel = [rows[j] for j in idx]
        inputs, targets, mask = pack([s[1] for s in sel], [s[2] for s in sel], self.pad_id, self.device)
        own = spread([[float(o) for o in s[3]] for s in sel], mask) > 0.5
        mask &= own
        if self.cfg.mask_truncated_completions:
            mask &= ~torch.tensor([s[4] for s in sel], device=self.device).unsqueeze(1)
        teacher = torch.tensor([s[0] for s in sel], device=self.device)
        batch = {"inputs": inputs, "targets": targets, "mask": mask, "teacher": teacher, "scored": [],
                 "off_policy": off}
        if not off:
            for k, model in enumerate(self.teachers):
                r = (teacher == k).nonzero().flatten()
                if len(r):
                    h = model.hidden(inputs[r])[mask[r]]
                    batch["scored"].append((k, r, h))
        return batch

    # ---------------------------------------------------------------------- loss
    def loss_fn(self, model, batch: dict, targets) -> tuple[torch.Tensor, dict]:
        return distill_loss(self, batch, targets)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, model) -> dict:
        """Every task's held-out greedy accuracy (format, mean reward) through the student's
        engine; `accuracy` is their mean."""
        out = {}
        for name, task in zip(self.names, self.tasks):
            with self.on(task):
                ev = super().evaluate(model)
            out.update({f"{k}_{name}": v for k, v in ev.items()})
        out["accuracy"] = sum(out[f"accuracy_{n}"] for n in self.names) / len(self.names)
        return out


def distill_loss(stage: DistillStage, batch: dict, targets):
    """This micro-batch's share of the step's loss: Σ_t w·KL(π_θ || π_teacher) per token
    (OPD), or −log π_θ(token) (off-policy SFT), normalised by `loss_type`."""
    cfg, policy, mask = stage.cfg, stage.policy, batch["mask"]
    blocks = policy_blocks(policy) if cfg.gradient_checkpointing else []
    with recompute_blocks(blocks):
        h = policy.hidden(batch["inputs"])
    tokens = targets.count[0].clamp(min=1)
    m = mask.float()
    if batch["off_policy"]:
        per_token = -target_logprobs(policy, h, batch["targets"])
        logs = {"nll": (per_token.detach() * m).sum() / tokens}
    else:
        per_token = h.new_zeros(mask.shape, dtype=torch.float32)
        for k, r, h_teacher in batch["scored"]:
            kl = head_reverse_kl(policy.lm_head, h[r][mask[r]], stage.teachers[k].lm_head, h_teacher,
                                 cfg.temperature)
            rows = torch.zeros(len(r), mask.shape[1], dtype=kl.dtype, device=kl.device)
            per_token = per_token.index_add(0, r, rows.masked_scatter(mask[r], kl * cfg.weight(k)))
        logs = {"kl": (per_token.detach() * m).sum() / tokens}
    loss = normalise(per_token, mask, cfg.loss_type, targets.count[0], targets.micro_batches, stage.max_len)
    return loss, {**logs, **batch.get("stats", {})}


def sample(llm, task, examples, G: int, params, seed: int, make_room=None):
    """(Rollouts, own): G completions per example and, per completion token, whether the
    sampling model wrote it (False for tool outputs inside a conversation). Conversations
    run on an engine of the default cache size (RLStage.initial_blocks), so make_room is
    not needed for them."""
    from nanoseek.data.tasks.base import Task
    if type(task).rollout is Task.rollout:
        ro = sample_rollouts(llm, task, examples, G, params, seed, make_room=make_room)
        return ro, [[True] * len(c) for c in ro.completion_ids]
    return sample_conversations(llm, task, examples, G, params, seed)


def sample_conversations(llm, task, examples, G: int, params, seed: int):
    """A task's conversation rollout (tool use: generate, run the tool calls, go on, up to
    `task.max_rounds` turns), keeping the token ids and which of them the model wrote.
    Reuses the task's own conversation state (tool_use._Conversation)."""
    from nanoseek.data.tasks.prompting import fit_context, prompt_ids
    from nanoseek.data.tasks.tool_use import _Conversation
    t0 = time.perf_counter()
    llm.engine.reset_prefix_cache()
    tok, base = llm.tokenizer, replace(params, n=1, skip_special_tokens=False)
    convs, spans, heads = [], [], []
    for i, ex in enumerate(examples):
        ids = prompt_ids(tok, task.prompt_messages(ex))
        for k in range(G):
            convs.append(_Conversation(list(ids), replace(base, seed=seed + i * G + k)))
            spans.append([])
            heads.append(len(ids))
    truncated = [False] * len(convs)
    model = llm.engine.model
    was_training = model.training
    model.eval()
    try:
        for round_ in range(task.max_rounds):
            for c in convs:
                c.done = c.done or len(c.ids) >= llm.max_model_len
            active = [j for j, c in enumerate(convs) if not c.done]
            if not active:
                break
            outs = llm.generate([convs[j].ids for j in active],
                                [fit_context(llm, convs[j].ids, convs[j].params) for j in active],
                                use_tqdm=False)
            for j, out in zip(active, outs):
                comp, c = out.outputs[0], convs[j]
                if comp.finish_reason == "error":
                    raise RuntimeError(f"rollout failed: {comp.error}")
                start, ids = len(c.ids), list(comp.token_ids)
                c.step(comp, tok, last=round_ == task.max_rounds - 1)
                if c.done:  # the last turn: step() leaves the ids as they were
                    c.ids = c.ids + ids
                spans[j].append((start, start + len(ids)))
                truncated[j] = comp.finish_reason == "length"
    finally:
        model.train(was_training)
    ro = Rollouts([], [], [], truncated, torch.zeros(0))
    own, rewards, correct = [], [], []
    for j, c in enumerate(convs):
        ex, head = examples[j // G], heads[j]
        ro.prompt_ids.append(c.ids[:head])
        ro.completion_ids.append(c.ids[head:])
        ro.engine_logp.append([])
        mine = [False] * (len(c.ids) - head)
        for a, b in spans[j]:
            mine[a - head:b - head] = [True] * (b - a)
        own.append(mine)
        rew = task.reward(ex, c.text)
        rewards.append(rew.total)
        correct.append(rew.correct)
    ro.rewards = torch.tensor(rewards, dtype=torch.float)
    ro.correct = torch.tensor(correct, dtype=torch.bool)
    ro.seconds = time.perf_counter() - t0
    return ro, own


def task_keys(tasks: list) -> list[str]:
    """Metric suffixes: each task's name, with its index where names repeat."""
    names = [t.name for t in tasks]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


# ---------------------------------------------------------------------- building
def load_teachers(cfg: DistillConfig, student, device=None) -> list:
    """Each --teacher, frozen in eval mode, after checking it speaks the student's
    vocabulary (same tokenizer.json ids, same vocab_size)."""
    from nanoseek.train.rl.run import load_policy
    mine = vocabulary(cfg.init, "--student")
    teachers = []
    for path in cfg.teachers:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--teacher {path}: no such directory")
        theirs = vocabulary(path, "--teacher")
        if theirs != mine:
            raise ValueError(f"--teacher {path}: its tokenizer differs from the student's "
                             f"({cfg.init}): OPD compares the two distributions id by id")
        model, _ = load_policy(path, device)
        if model.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"--teacher {path}: vocab_size {model.config.vocab_size} differs from "
                             f"the student's {student.config.vocab_size}")
        teachers.append(model.eval().requires_grad_(False))
    return teachers


def vocabulary(path, flag: str):
    """The id -> token map of a checkpoint's tokenizer.json (model vocabulary + added tokens)."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise FileNotFoundError(f"{flag} {path}: no tokenizer.json (not a checkpoint directory?)")
    tj = json.loads(f.read_text())
    added = sorted((t["id"], t["content"]) for t in tj.get("added_tokens", []))
    return tj.get("model", {}).get("vocab"), added


def build(out_dir: Path, cfg: DistillConfig, progress: bool = True, rank_device=None, parallel=None,
          adapt_threads: bool = False):
    """(trainer, stage) of a distillation run: the student from cfg.init, the teachers,
    the tasks, RLStage's engine; the Trainer is GRPO's."""
    from nanoseek.data.tasks import load_task
    from nanoseek.parallel.single import SingleProcess
    from nanoseek.train.rl.run import data_parallel, load_policy, rl_trainer

    torch.manual_seed(cfg.train.seed)
    for flag, path in [("--student", cfg.init)] + [("--teacher", t) for t in cfg.teachers]:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such directory")
    policy, tok = load_policy(cfg.init, rank_device)
    teachers = load_teachers(cfg, policy, rank_device)
    par = data_parallel(policy, cfg, parallel, rank_device) if rank_device is not None else SingleProcess()
    tasks = [load_task(name, **cfg.options(i)) for i, name in enumerate(cfg.tasks)]
    stage = DistillStage(cfg, policy, tok, tasks, teachers, parallel=par)
    return rl_trainer(stage, policy, policy, cfg, out_dir, progress, par, adapt_threads), stage


def distill(out_dir: str | Path, cfg: DistillConfig, resume: bool = False, progress: bool = True,
            log=print, parallel=None, adapt_threads: bool = False) -> dict:
    """Run (or resume) a distillation run; returns run.json's content (run.rl's loop:
    checkpoint, metrics.jsonl, run.json, the step-0 and final evaluations)."""
    from nanoseek.train.rl.run import rl
    return rl(out_dir, cfg, resume, progress, log, parallel, adapt_threads, build_fn=build)


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m nanoseek.train.rl.distill ARGS
    import runpy  # == nanoseek distill ARGS
    import sys
    sys.argv = ["nanoseek", "distill", *sys.argv[1:]]
    runpy.run_module("nanoseek", run_name="__main__")
