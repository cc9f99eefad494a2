"""Supervised fine-tuning: chat data -> assistant-only loss -> the shared training loop.

The conversations (JSONL files, or a task's demonstrations) are rendered with DeepSeek-V3's
chat template, labelled so that only the assistant's tokens are learned (data/chat.py) and
packed into windows of seq_len. The loss is the model's own (`CausalLM.loss`: next-token CE,
plus the MTP heads on the same masked labels and the MoE balance term) divided by the
step's count of assistant tokens, so gradient accumulation weighs every answer token the
same however the masks spread them. Full fine-tuning or LoRA/QLoRA (`SFTConfig.lora`).
The run directory resumes (`--resume`) like a pretraining run: train_state.pt, run.json,
metrics.jsonl. Conversations with images (a DeepSeek-VL `--model`, or `--vision tiny-vl`)
run vision_sft.py's stage.

Under torchrun (`nanoseek sft --nproc N`, or `torchrun ... -m nanoseek.train.posttrain.sft`) the
run is pretraining's distributed one (nanoseek/parallel/): `batch_size` stays the global
micro-batch and each data-parallel rank trains on its rows of it, the assistant tokens
counted over every rank (so the summed gradient is the one-process gradient); FSDP2 for
the dense weights, `ep`/`tp` as given, sharded checkpoints; rank 0 alone logs and writes.
LoRA stays single-process (peft's wrapper is not sharded), and so does pipeline parallel
(the loss before and after runs the whole model on every rank).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nanoseek.data.chat import ChatWindows, chat_windows, read_conversations
from nanoseek.parallel.single import SingleProcess
from nanoseek.text.images import image_parts
from nanoseek.train.posttrain.settings import SFTConfig, sft_train_config  # noqa: F401 (re-exported)
from nanoseek.train.loop import Trainer
from nanoseek.train.posttrain.stage import (base_model, checkpoint_writer, data_parallel,
                                            load_task_lazily, merge_into, split, stage_settings, start_stage,
                                            with_adapters, write_run)
from nanoseek.train.pretrain import pretrain_loss


def conversations_of(config: SFTConfig) -> list[list[dict]]:
    if config.data:
        return read_conversations(config.data)
    task = load_task_lazily(config.task, **config.task_options)
    examples = task.examples("train", config.task_examples, config.train.seed)
    return [task.messages(ex) for ex in examples]


def steps_for(windows: ChatWindows, config: SFTConfig) -> int:
    t = config.train
    return max(1, math.ceil(config.epochs * len(windows) / (t.batch_size * t.grad_accum)))


LOSS_WINDOWS = 128  # training windows the before/after loss reads when nothing is held out


@torch.no_grad()
def masked_loss(model, windows: ChatWindows, batch_size: int, device, limit: int | None = None) -> float:
    """Mean cross-entropy over the assistant tokens of `windows` (the first `limit` of them
    if given; no MTP, no balance)."""
    total, count = 0.0, 0
    for i in range(0, min(len(windows), limit or len(windows)), batch_size):
        x, y = windows.inputs[i:i + batch_size].to(device), windows.labels[i:i + batch_size].to(device)
        out = model.loss(x, y)
        n = int(model.loss_targets(y)[0])
        total, count = total + float(out.lm_loss) * n, count + n
    return total / max(count, 1)


def sft(out_dir: str | Path, config: SFTConfig, resume: bool = False, max_steps: int | None = None,
        progress: bool = True, log=print, parallel=None, adapt_threads: bool = False) -> dict:
    """Run (or resume) supervised fine-tuning into `out_dir`; returns run.json's content.
    parallel: a nanoseek.parallel.ParallelConfig (ep, tp) for a run under torchrun; the run
    is distributed whenever torchrun started more than one process. adapt_threads: switch
    between all cores and one while training, as the pretraining speedrun does (threads.py)."""
    from nanoseek.parallel import launch
    with launch.session(parallel.timeout if parallel else 300.0) as rank_device:
        return _sft(Path(out_dir), config, resume, max_steps, progress,
                    log if launch.is_main() else (lambda *a, **k: None), rank_device, parallel,
                    adapt_threads)


def _check_distributable(config: SFTConfig, parallel) -> None:
    if config.lora.enabled:
        raise ValueError("SFT with --lora/--qlora runs on one process (peft's adapters are not "
                         "sharded): drop --nproc, or fine-tune every weight")
    if parallel is not None and parallel.pp > 1:
        raise ValueError("SFT does not run pipeline parallel (its loss before and after runs "
                         "the whole model on every rank): use dp, ep or tp")


def _sft(out_dir: Path, config: SFTConfig, resume: bool, max_steps: int | None, progress: bool,
         log, rank_device, parallel, adapt_threads: bool = False) -> dict:
    """rank_device: this rank's device under torchrun, None for one process."""
    from nanoseek.train.posttrain import vision_sft as vision
    if vision.is_vision_run(stage_settings(out_dir, config, resume, max_steps)):  # images: vision_sft.py
        return vision.vision_sft(out_dir, config, resume, max_steps, progress, log, rank_device, adapt_threads)
    config, device, model, tok = start_stage(out_dir, config, resume, max_steps, rank_device)
    if rank_device is not None:
        _check_distributable(config, parallel)
    if config.train_vision or config.task == "rendered_arithmetic" or config.tower_reading:
        vision.refuse_images_for_text_model(config)
    convs = conversations_of(config)
    if any(map(image_parts, convs)):
        vision.refuse_images_for_text_model(config)  # names the first row with an image
    train_convs, val_convs = split(convs, config.val_fraction, config.train.seed)
    data = chat_windows(train_convs, tok, config.train.seq_len, config.packing)
    val = chat_windows(val_convs, tok, config.train.seq_len, config.packing) if val_convs else None
    if not config.train.max_steps:
        config.train.max_steps = steps_for(data, config)
    torch.manual_seed(config.train.seed)  # the adapters' initial A, and the run after
    model, nf4 = with_adapters(model, config.lora, data.inputs[:2].to(device), log)
    par = SingleProcess()
    if rank_device is not None:  # every rank evaluates the whole of (val or data) below
        if config.eval_task_n:
            raise ValueError("--eval-n (held-out task accuracy through the engine) runs in one "
                             "process only: the engine cannot read FSDP-sharded weights")
        par = data_parallel(model, parallel, device, config.train.batch_size,
                            "training option 'batch_size'")
    trainer = build_trainer(model, config, data, val, out_dir, device, progress, par, tok, adapt_threads)
    before = loss_on(model, val or data, config, device)
    if resume and trainer.resume():
        log(f"resumed at step {trainer.step}")
    log(f"SFT: {data.meta['conversations']} conversations in {len(data)} windows of "
        f"{config.train.seq_len} ({data.meta['targets']:,} assistant tokens), "
        f"{config.train.max_steps} steps; loss on assistant tokens {before:.4f}")
    layout = {"parallel": {"dp": par.dp, "ep": par.ep, "tp": par.tp}} if par.distributed else {}
    run = write_run(out_dir, config, data=data.meta, loss_before=before,
                    nf4=None if nf4 is None else vars(nf4), precision=trainer.precision,
                    precision_reason=trainer.precision_reason, **layout)
    run["summary"] = trainer.fit()
    if run["summary"]["target_reached"]:
        log(f"stopped at step {trainer.step}: {run['summary']['target_reached']}")
    run["loss_after"] = loss_on(model, val or data, config, device)
    if config.merge:
        merge_into(out_dir, config.init)
    log(f"loss on assistant tokens ({'held out' if val else f'first {LOSS_WINDOWS} training windows'}): {before:.4f} -> "
        f"{run['loss_after']:.4f}")
    write_run(out_dir, config, **{k: v for k, v in run.items() if k not in ("stage", "settings")})
    return run


def loss_on(model, windows: ChatWindows, config: SFTConfig, device) -> float:
    """The before/after loss: every held-out window, or the first LOSS_WINDOWS training
    windows (a full pass over a large training set would cost as much as many steps)."""
    limit = None if config.val_fraction else LOSS_WINDOWS
    return masked_loss(base_model(model).eval(), windows, config.train.batch_size, device, limit)


def task_accuracy(config: SFTConfig, net, tok):
    """`evaluate` for a task run: greedy held-out accuracy on `eval_task_n` problems,
    through nanoseek's engine over the module being trained (it reads the live weights;
    its prefix cache is dropped before each evaluation, as the weights have moved)."""
    from nanoseek.engine import LLM
    from nanoseek.train.eval import evaluate_task
    task = load_task_lazily(config.task, **config.task_options)
    llm = LLM(net, tokenizer=tok, max_num_seqs=min(config.eval_task_n, 256),
              max_num_batched_tokens=4096, speculative=False)

    def accuracy() -> dict:
        llm.engine.reset_prefix_cache()
        ev = evaluate_task(llm, task, n=config.eval_task_n, k=0)
        return {"accuracy": ev["accuracy"], "format": ev["format"]}
    return accuracy


def build_trainer(model, config: SFTConfig, data: ChatWindows, val: ChatWindows | None,
                  out_dir: Path, device, progress: bool, parallel=None, tok=None,
                  adapt_threads: bool = False) -> Trainer:
    """parallel: the run's `Parallel` under torchrun (each DP rank takes its rows of a
    micro-batch); tok: the tokenizer, for the engine of --eval-n."""
    t, lora = config.train, config.lora.enabled
    parallel = parallel or SingleProcess()
    net = base_model(model)
    on_task = task_accuracy(config, net, tok) if config.eval_task_n else None

    def next_batch(step, micro):
        batch = data.batch(step * t.grad_accum + micro, t.batch_size, t.seed)
        return tuple(x.to(device) for x in parallel.local_rows(batch))

    def evaluate(m):
        out = {"val_loss": masked_loss(net, val, t.batch_size, device)} if val else {}
        return {**out, **(on_task() if on_task else {})}

    def stop_when(ev: dict) -> str | None:
        target = config.stop_at_accuracy
        if target is not None and ev.get("accuracy", 0.0) >= target:
            return f"held-out accuracy {ev['accuracy']:.3f} >= {target}"
        return None

    return Trainer(model, t, out_dir, next_batch, pretrain_loss,
                   count_targets=lambda b: net.loss_targets(b[1]),
                   evaluate=evaluate if (val or on_task) else None, stop_when=stop_when,
                   on_checkpoint=checkpoint_writer(out_dir, config.init, config.lora),
                   progress=progress, update_router_biases=not lora, trainable_state_only=lora,
                   parallel=parallel, adapt_threads=adapt_threads)


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m nanoseek.train.posttrain.sft ARGS
    import runpy  # == nanoseek sft ARGS
    import sys
    sys.argv = ["nanoseek", "sft", *sys.argv[1:]]
    runpy.run_module("nanoseek", run_name="__main__")
