"""An RL run from a checkpoint: `rl(out_dir, RLConfig(init=SFT_DIR, ...))`.

The run directory is, like every stage's, a checkpoint transformers loads (the policy:
config.json, model.safetensors, the tokenizer copied from --init) plus train_state.pt,
metrics.jsonl (one "train" line per step: reward and its parts, accuracy, KL, clip
fraction, lengths, rollout vs update time, peak memory; "eval" lines: held-out greedy
accuracy, step 0 = the starting point) and run.json (the settings, for --resume).
Under torchrun the run is data parallel with replicated weights (nanoseek/parallel/rl.py),
its checkpoint sharded (torch.distributed.checkpoint) and consolidated by rank 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from nanoseek.parallel.single import SingleProcess
from nanoseek.train.config import settings_from_dict, settings_to_dict
from nanoseek.train.rl.config import RLConfig
from nanoseek.train.rl.memory import cap_kernel_caches, release_large_allocations, reset_peak


def load_policy(init: str | Path, device=None):
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import Tokenizer
    init = Path(init)
    if not (init / "config.json").exists():
        raise FileNotFoundError(f"--init {init}: not a checkpoint directory (no config.json)")
    tok = Tokenizer.from_dir(init)
    if tok is None:
        raise FileNotFoundError(f"--init {init}: no tokenizer.json (RL prompts with chat text)")
    return CausalLM.from_pretrained(init, dtype=torch.float32, device=device), tok


def data_parallel(policy, cfg: RLConfig, layout, device):
    """The `Parallel` of an RL run under torchrun: DP only, weights replicated (the engine
    reads them whole; see nanoseek/parallel/rl.py)."""
    import dataclasses

    from nanoseek.parallel import ParallelConfig
    from nanoseek.train.posttrain.stage import data_parallel as stage_parallel
    layout = layout or ParallelConfig()
    if (layout.ep, layout.tp, layout.pp) != (1, 1, 1):
        raise ValueError(f"RL under torchrun is data parallel only (got ep={layout.ep}, "
                         f"tp={layout.tp}, pp={layout.pp}): every rank's rollout engine runs the "
                         "whole policy by itself")
    if cfg.algo == "ppo":
        raise ValueError(f"--algo {cfg.algo} runs on one process (its critic and whitened "
                         "advantages are not split over ranks): drop --nproc, or use --algo grpo")
    return stage_parallel(policy, dataclasses.replace(layout, replicate=True), device,
                          cfg.train.batch_size, "RL option 'batch_size' (prompts per step)")


def build(out_dir: Path, cfg: RLConfig, progress: bool = True, rank_device=None, parallel=None,
          adapt_threads: bool = False):
    """(trainer, stage) for `cfg`: the policy from cfg.init, a frozen reference copy when
    beta > 0, a critic for PPO, the engine over the live policy. rank_device: this rank's
    device under torchrun (None: one process); parallel: its ParallelConfig."""
    from nanoseek.data.tasks import load_task
    from nanoseek.train.rl.grpo import RLStage

    torch.manual_seed(cfg.train.seed)
    policy, tok = load_policy(cfg.init, rank_device)
    par = data_parallel(policy, cfg, parallel, rank_device) if rank_device is not None else SingleProcess()
    ref = None
    if cfg.beta > 0:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    model = policy
    if cfg.algo == "ppo":
        from nanoseek.train.rl.ppo import ActorCritic
        model = ActorCritic(policy)
    task = load_task(cfg.task, **cfg.task_options)
    stage = RLStage(cfg, model, policy, tok, task, ref, parallel=par)
    return rl_trainer(stage, model, policy, cfg, out_dir, progress, par, adapt_threads), stage


def rl_trainer(stage, model, policy, cfg, out_dir: Path, progress: bool, par, adapt_threads: bool):
    """The training loop over `stage` (GRPO's, PPO's or distillation's), training `model`
    (the policy, or PPO's actor-critic); every checkpoint saves the policy alone as a
    Hugging Face checkpoint with cfg.init's tokenizer."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.text.tokenizer import copy_tokenizer
    from nanoseek.train.rl.grpo import RLTrainer

    def on_checkpoint(m, step):
        save_pretrained(policy, out_dir)
        copy_tokenizer(cfg.init, out_dir)

    return RLTrainer(stage, model, cfg.train, out_dir, next_batch=stage.next_batch,
                     loss_fn=stage.loss_fn, count_targets=stage.count_targets,
                     evaluate=stage.evaluate, on_checkpoint=on_checkpoint,
                     tokens_in=stage.tokens_in, progress=progress, parallel=par,
                     adapt_threads=adapt_threads)


def rl(out_dir: str | Path, cfg: RLConfig, resume: bool = False, progress: bool = True,
       log=print, parallel=None, adapt_threads: bool = False, build_fn=None) -> dict:
    """Run (or resume) an RL run; returns run.json's content. Under torchrun every rank
    runs it (parallel: a nanoseek.parallel.ParallelConfig, DP only) and rank 0 writes.
    adapt_threads: switch between all cores and one while training (threads.py).
    build_fn: another stage's `build` (distill.py's), same signature."""
    from nanoseek.parallel import launch
    with launch.session(parallel.timeout if parallel else 300.0) as rank_device:
        return _rl(Path(out_dir), cfg, resume, progress,
                   log if launch.is_main() else (lambda *a, **k: None), rank_device, parallel,
                   adapt_threads, build_fn or build)


def _rl(out_dir: Path, cfg: RLConfig, resume: bool, progress: bool, log, rank_device,
        parallel, adapt_threads: bool = False, build_fn=None) -> dict:
    from nanoseek.parallel.launch import is_main
    from nanoseek.train.posttrain.stage import holds_run
    from nanoseek.train.pretrain import write_run

    if resume and (out_dir / "run.json").exists():
        saved = json.loads((out_dir / "run.json").read_text())["settings"]
        saved["train"]["max_steps"] = cfg.train.max_steps
        cfg = settings_from_dict(type(cfg), saved, f"{out_dir}/run.json")
    elif holds_run(out_dir):
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume or choose another --out")
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    release_large_allocations()  # process-wide, and the same numbers: memory.py says why
    cap_kernel_caches()
    reset_peak()  # metrics' peak_rss_mb: this run's
    trainer, stage = (build_fn or build)(out_dir, cfg, progress, rank_device, parallel, adapt_threads)
    run = {"stage": cfg.algo, "settings": settings_to_dict(cfg), "precision": trainer.precision,
           "precision_reason": trainer.precision_reason}
    if stage.par.distributed:
        run["parallel"] = {"dp": stage.dp, "replicate": True}
    resumed = resume and trainer.resume()
    if is_main():
        write_run(out_dir, run)
    if not resumed:
        ev = trainer.run_eval()
        trainer.log({"kind": "eval", "step": 0, "tokens": 0, **ev})
        log(f"step 0 (the starting point): held-out accuracy {ev['accuracy']:.3f}")
    summary = trainer.fit()
    evals = [r for r in _metrics(out_dir) if r.get("kind") == "eval"] if is_main() else []
    run.update(summary=summary, start_eval=evals[0] if evals else None,
               final_eval=evals[-1] if evals else None)
    if is_main():
        write_run(out_dir, run)
    return run



def _metrics(out_dir: Path) -> list[dict]:
    from nanoseek.train.run.metrics import read_metrics
    return read_metrics(out_dir)
