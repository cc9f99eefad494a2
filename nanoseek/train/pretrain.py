"""Pretraining: corpus -> tokenizer -> token arrays -> the training loop -> a checkpoint.

A run is described by one `PretrainConfig` (the model, the loop's `TrainConfig`, the
data); run.json saves it whole under "settings" and `--resume` rebuilds it from there.
The run directory is at every save a checkpoint that transformers loads
(`config.json`, `model.safetensors`, the tokenizer files) plus the resumable state
(`train_state.pt`), the token arrays (`data/`), `metrics.jsonl` and `run.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.train.config import settings_to_dict
from nanoseek.train.eval import make_evaluate
from nanoseek.train.loop import Trainer
from nanoseek.train.run_settings import (DataConfig, PretrainConfig,  # noqa: F401 (DataConfig: API)
                                         read_settings, with_overrides)

SAMPLE_PROMPTS = ("The for statement", "A function definition", "Exceptions are")


class RunError(RuntimeError):
    """The run directory or the inputs do not allow this run."""


def setup_threads() -> int:
    """Use every core this process may run on (torch's default can be fewer)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrain_loss(model, batch, targets):
    """The pretraining objective: next-token CE + λ·MTP + balance (+ z-loss), all inside
    model.loss, as this micro-batch's share of the step (see CausalLM.loss for the rule
    each term follows); the parts are logged separately."""
    x, y = batch
    out = model.loss(x, y, num_targets=targets.count, num_batches=targets.micro_batches)
    return out.loss, {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}


def make_sampler(tokenizer, device, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 48, seed: int = 0):
    def sample(model) -> list[str]:
        g = torch.Generator(device=device).manual_seed(seed)
        out = []
        for p in prompts:
            ids = torch.tensor([tokenizer(p)["input_ids"]], device=device)
            gen = model.generate(ids, max_new_tokens, temperature=0.8, top_k=40,
                                 eos_token_id=tokenizer.eos_token_id, generator=g)
            out.append(tokenizer.decode(gen[0].tolist(), skip_special_tokens=True))
        return out
    return sample


def prepare_data(out_dir: Path, cfg: ModelConfig, data: DataConfig, seed: int, log=print):
    """Tokenizer (reused from the run, given, or trained on the training split) and the
    memory-mapped token arrays."""
    from nanoseek.data import build_token_arrays, load_corpus
    from nanoseek.data.tokenized import split_documents
    from nanoseek.tokenizer import (copy_tokenizer, load_tokenizer, save_tokenizer,
                                    train_tokenizer)

    docs = load_corpus(data.paths or None, data.text_field)
    if (out_dir / "tokenizer.json").exists():
        tok = load_tokenizer(out_dir)
    elif data.tokenizer:
        tok = load_tokenizer(data.tokenizer)
        copy_tokenizer(data.tokenizer, out_dir)
    else:
        t = time.perf_counter()
        train_docs, _ = split_documents(docs, data.val_fraction, seed)
        tok = train_tokenizer(train_docs, vocab_size=cfg.vocab_size)
        save_tokenizer(tok, out_dir)
        log(f"tokenizer: byte-level BPE, {len(tok)} tokens, trained in {time.perf_counter() - t:.1f}s")
    if len(tok) > cfg.vocab_size:
        raise RunError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size}: raise vocab_size or use a smaller tokenizer")
    arrays = build_token_arrays(docs, tok, out_dir / "data", val_fraction=data.val_fraction, seed=seed)
    log(f"data: {arrays.meta['train_tokens']:,} train / {arrays.meta['val_tokens']:,} val tokens "
        f"({arrays.meta['train_docs']} / {arrays.meta['val_docs']} documents)")
    return tok, arrays


def settings_for_run(out_dir: Path, config: PretrainConfig, resume: bool,
                     overrides: dict | None) -> PretrainConfig:
    """A new run's settings are `config`; a resumed run's are its saved ones, with
    `overrides` (default: max_steps and time_limit of `config`) applied."""
    from nanoseek.train.checkpointing import STATE_FILE

    if (out_dir / STATE_FILE).exists() and not resume:
        raise RunError(f"{out_dir} already holds a run; pass --resume to continue it or "
                       "choose another --out")
    saved = read_settings(out_dir) if resume else None
    if saved is None:
        return config
    if overrides is None:
        overrides = {"train.max_steps": config.train.max_steps,
                     "train.time_limit": config.train.time_limit}
    return with_overrides(saved, overrides)


def pretrain(out_dir: str | Path, config: PretrainConfig, resume: bool = False,
             overrides: dict | None = None, progress: bool = True, log=print,
             threads: int | None = None) -> dict:
    """Run (or resume) a pretraining run in `out_dir`; returns run.json's content.
    On resume the settings are the run's saved ones (see `settings_for_run`).
    threads: None = every core; 0 = adapt between every core and one while training (see
    train/threads.py: on a crowded machine one thread can be several times faster)."""
    out_dir = Path(out_dir)
    config = settings_for_run(out_dir, config, resume, overrides)
    config.train.validate()
    if config.train.seq_len > config.model.max_position_embeddings:
        raise ValueError(f"training option 'seq_len': {config.train.seq_len} exceeds the model's "
                         f"context (max_position_embeddings={config.model.max_position_embeddings})")
    out_dir.mkdir(parents=True, exist_ok=True)
    max_threads = setup_threads()
    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    tok, data = prepare_data(out_dir, config.model, config.data, config.train.seed, log)
    trainer, run = build_trainer(out_dir, config, tok, data, device, progress, adapt=threads == 0)
    run.update(cores=max_threads, settings=settings_to_dict(config))
    if resume:
        resumed = trainer.resume()
        log(f"resumed at step {trainer.step}" if resumed else "nothing to resume: starting fresh")
    write_run(out_dir, run)
    log(describe(run))
    summary = trainer.fit()
    run.update(summary=summary, mfu=run["flops_per_token"] * summary["tok_s"] / run["peak_flops"]
               if run["peak_flops"] else None)
    write_run(out_dir, run)
    return run


def build_trainer(out_dir: Path, config: PretrainConfig, tok, data, device, progress: bool,
                  adapt: bool) -> tuple[Trainer, dict]:
    """The model (seeded), its measured facts for run.json, and the loop wired to the data."""
    from nanoseek.model import CausalLM
    from nanoseek.tokenizer import token_byte_lengths
    from nanoseek.calc.params import count_params
    from nanoseek.train.mfu import flops_per_token, measure_peak_flops
    from nanoseek.train.precision import choose_precision, peak_dtype

    cfg, tcfg = config.model, config.train
    byte_lengths = token_byte_lengths(tok) + [0] * (cfg.vocab_size - len(tok))
    torch.manual_seed(tcfg.seed)
    model = CausalLM(cfg).to(device)
    chosen = torch.get_num_threads()
    setup_threads()  # MFU is against the whole machine's peak
    # MFU is against the peak of the dtype the run multiplies in; measured once per dtype and
    # cached (`nanoseek peak --remeasure`)
    peak = measure_peak_flops(device, peak_dtype(choose_precision(tcfg.precision, device)[0]))
    torch.set_num_threads(chosen)
    trainer = Trainer(
        model, tcfg, out_dir,
        next_batch=lambda step, micro: tuple(t.to(device) for t in data.batch(
            step, micro, tcfg.batch_size, tcfg.seq_len, tcfg.seed)),
        loss_fn=pretrain_loss, count_targets=lambda batch: model.loss_targets(batch[1]),
        evaluate=make_evaluate(data, byte_lengths, tcfg.seq_len, tcfg.eval_tokens, device),
        sample=(make_sampler(tok, device, max_new_tokens=config.sample_tokens)
                if config.sample_tokens else None),
        on_checkpoint=lambda m, step: save_pretrained(m, out_dir),
        flops_per_token=flops_per_token(model, tcfg.seq_len), peak_flops=peak,
        progress=progress, adapt_threads=adapt)
    run = {"params": count_params(cfg).summary(), "flops_per_token": trainer.flops_per_token,
           "peak_flops": peak, "device": str(device),
           "threads": "adaptive" if adapt else torch.get_num_threads(),
           "moe_layers": moe_layer_names(model), "precision": trainer.precision,
           "precision_reason": trainer.precision_reason, "compile": trainer.compiled,
           "compile_reason": trainer.compile_reason, "data": data.meta,
           **data.unigram_baseline(tcfg.seq_len, byte_lengths, tcfg.eval_tokens or None)}
    return trainer, run


def describe(run: dict) -> str:
    params, fpt, peak = run["params"], run["flops_per_token"], run["peak_flops"]
    return (f"model: {params['total'] / 1e6:.2f}M parameters, {params['activated'] / 1e6:.2f}M "
            f"activated (+ MTP {params['mtp'] / 1e6:.2f}M, {params['mtp_activated'] / 1e6:.2f}M "
            f"activated); {fpt / 1e6:.1f} MFLOPs/token; measured peak {peak / 1e9:.1f} GFLOP/s; "
            f"{run['precision']} ({run.get('precision_reason', '')}) on {run['device']}, "
            f"torch.compile {'on' if run.get('compile') else 'off'} ({run.get('compile_reason', '')}), "
            f"threads: {run['threads']} (of {run['cores']} cores)")


def moe_layer_names(model) -> list[str]:
    """Checkpoint-style names of the MoE layers, in model.moe_layers() order."""
    L = model.config.num_hidden_layers
    names = []
    for name, m in model.named_modules():
        if type(m).__name__ == "MoE":
            parts = name.split(".")
            names.append(f"layer {parts[2]}" if parts[0] == "model" else f"MTP {parts[1]} (layer {L + int(parts[1])})")
    return names


def write_run(out_dir: Path, run: dict) -> None:
    from nanoseek.atomic import atomic_write_text

    atomic_write_text(out_dir / "run.json", json.dumps(run, indent=2, default=str) + "\n")
