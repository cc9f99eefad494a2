"""Pretraining: corpus -> tokenizer -> token arrays -> the training loop -> a checkpoint.

The run directory is at every save a checkpoint that transformers loads
(`config.json`, `model.safetensors`, the tokenizer files) plus the resumable state
(`train_state.pt`), the token arrays (`data/`), `metrics.jsonl` and `run.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.train.loop import TrainConfig, Trainer

DEFAULT_SOURCE = "<pydoc_data.topics>"
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


def pretrain_loss(model, batch):
    """The pretraining objective: next-token CE + λ·MTP + balance (+ z-loss), all inside
    model.loss; the parts are logged separately."""
    x, y = batch
    out = model.loss(x, y)
    return out.loss, {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}


def make_evaluate(data, byte_lengths: list[int], seq_len: int, max_tokens: int | None, device):
    """Validation loss (nats per token, every target) and bits per byte: the nats of the
    text tokens over ln 2 x their UTF-8 bytes (special tokens have no bytes)."""
    blen = torch.tensor(byte_lengths, dtype=torch.float64)

    def evaluate(model) -> dict:
        nats = tokens = text_nats = nbytes = 0.0
        for x, y in data.val_windows(seq_len, max_tokens or None):
            logits = model(x.to(device))
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                  reduction="none").double().cpu()
            b = blen[y.flatten()]
            nats += float(nll.sum())
            tokens += nll.numel()
            text_nats += float(nll[b > 0].sum())
            nbytes += float(b.sum())
        return {"val_loss": nats / tokens, "val_bpb": text_nats / (math.log(2) * nbytes),
                "val_tokens": int(tokens)}
    return evaluate


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


def prepare_data(out_dir: Path, cfg: ModelConfig, data_paths, tokenizer_dir, val_fraction: float,
                 seed: int, log=print, text_field: str = "text"):
    """Tokenizer (reused from the run, given, or trained on the training split) and the
    memory-mapped token arrays."""
    from nanoseek.data import build_token_arrays, load_corpus
    from nanoseek.data.tokenized import split_documents
    from nanoseek.tokenizer import (copy_tokenizer, load_tokenizer, save_tokenizer,
                                    train_tokenizer)

    docs = load_corpus(data_paths, text_field)
    if (out_dir / "tokenizer.json").exists():
        tok = load_tokenizer(out_dir)
    elif tokenizer_dir:
        tok = load_tokenizer(tokenizer_dir)
        copy_tokenizer(tokenizer_dir, out_dir)
    else:
        t = time.perf_counter()
        train_docs, _ = split_documents(docs, val_fraction, seed)
        tok = train_tokenizer(train_docs, vocab_size=cfg.vocab_size)
        save_tokenizer(tok, out_dir)
        log(f"tokenizer: byte-level BPE, {len(tok)} tokens, trained in {time.perf_counter() - t:.1f}s")
    if len(tok) > cfg.vocab_size:
        raise RunError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size}: raise vocab_size or use a smaller tokenizer")
    data = build_token_arrays(docs, tok, out_dir / "data", val_fraction=val_fraction, seed=seed)
    log(f"data: {data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens "
        f"({data.meta['train_docs']} / {data.meta['val_docs']} documents)")
    return tok, data


def pretrain(out_dir: str | Path, cfg: ModelConfig, tcfg: TrainConfig, data_paths=None,
             tokenizer_dir=None, resume: bool = False, val_fraction: float = 0.1,
             progress: bool = True, log=print, threads: int | None = None,
             sample_tokens: int = 48, resume_overrides: dict | None = None,
             text_field: str = "text") -> dict:
    """Run (or resume) a pretraining run in `out_dir`; returns run.json's content.
    threads: None = every core; 0 = adapt between every core and one while training (see
    train/threads.py: on a crowded machine one thread can be several times faster).
    On resume the model and training configs are the saved ones; `resume_overrides` (default:
    max_steps and time_limit of `tcfg`) may extend or shorten the run."""
    from nanoseek.model import CausalLM
    from nanoseek.train.checkpointing import STATE_FILE
    from nanoseek.calc.params import count_params
    from nanoseek.train.mfu import flops_per_token, measure_peak_flops
    from nanoseek.tokenizer import token_byte_lengths

    out_dir = Path(out_dir)
    if (out_dir / STATE_FILE).exists() and not resume:
        raise RunError(f"{out_dir} already holds a run; pass --resume to continue it or "
                       "choose another --out")
    if resume and (out_dir / "run.json").exists():
        saved = json.loads((out_dir / "run.json").read_text())
        cfg = ModelConfig.from_dict(saved["model_config"], source=str(out_dir / "run.json"))
        if resume_overrides is None:
            resume_overrides = {"max_steps": tcfg.max_steps, "time_limit": tcfg.time_limit}
        tcfg = dataclasses.replace(TrainConfig(**saved["train_config"]), **resume_overrides)
        # the run's own split: another --val-fraction would silently re-split the data
        val_fraction = saved.get("data", {}).get("val_fraction", val_fraction)
        if not data_paths:  # the run's own corpus, not the default one
            data_paths = [p for p in saved.get("data_paths", []) if p != DEFAULT_SOURCE] or None
            text_field = saved.get("text_field", text_field)
    tcfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    max_threads = setup_threads()
    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    tok, data = prepare_data(out_dir, cfg, data_paths, tokenizer_dir, val_fraction, tcfg.seed, log,
                             text_field)
    byte_lengths = token_byte_lengths(tok) + [0] * (cfg.vocab_size - len(tok))

    torch.manual_seed(tcfg.seed)
    model = CausalLM(cfg).to(device)
    params = count_params(cfg).summary()
    fpt = flops_per_token(model, tcfg.seq_len)
    chosen = torch.get_num_threads()
    torch.set_num_threads(max_threads)  # MFU is against the whole machine's peak
    peak = measure_peak_flops(device)  # measured once and cached (`nanoseek peak --remeasure`)
    torch.set_num_threads(chosen)
    baseline = data.unigram_baseline(tcfg.seq_len, byte_lengths, tcfg.eval_tokens or None)

    adapt = threads == 0
    threads = "adaptive" if adapt else torch.get_num_threads()

    def on_checkpoint(m, step):
        m.save_pretrained(out_dir)

    trainer = Trainer(
        model, tcfg, out_dir,
        next_batch=lambda step, micro: tuple(t.to(device) for t in data.batch(
            step, micro, tcfg.batch_size, tcfg.seq_len, tcfg.seed)),
        loss_fn=pretrain_loss,
        evaluate=make_evaluate(data, byte_lengths, tcfg.seq_len, tcfg.eval_tokens, device),
        sample=make_sampler(tok, device, max_new_tokens=sample_tokens) if sample_tokens else None, on_checkpoint=on_checkpoint,
        flops_per_token=fpt, peak_flops=peak, progress=progress, adapt_threads=adapt)
    resumed = trainer.resume() if resume else False
    if resume:
        log(f"resumed at step {trainer.step}" if resumed else "nothing to resume: starting fresh")
    run = {"model_config": cfg.to_dict(), "train_config": dataclasses.asdict(tcfg),
           "params": params, "flops_per_token": fpt, "peak_flops": peak, "device": str(device),
           "threads": threads, "cores": max_threads, "moe_layers": moe_layer_names(model),
           "precision": trainer.precision, "data": data.meta,
           "data_paths": [str(p) for p in data_paths or []] or [DEFAULT_SOURCE], "text_field": text_field,
           **baseline}
    write_run(out_dir, run)
    log(f"model: {params['total'] / 1e6:.2f}M parameters, {params['activated'] / 1e6:.2f}M activated "
        f"(+ MTP {params['mtp'] / 1e6:.2f}M, {params['mtp_activated'] / 1e6:.2f}M activated); "
        f"{fpt / 1e6:.1f} MFLOPs/token; measured peak {peak / 1e9:.1f} GFLOP/s; "
        f"{trainer.precision} on {device}, threads: {threads} (of {max_threads} cores)")
    summary = trainer.fit()
    run.update(summary=summary, mfu=fpt * summary["tok_s"] / peak if peak else None)
    write_run(out_dir, run)
    return run


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
    from nanoseek.checkpoint import atomic_write_text

    atomic_write_text(out_dir / "run.json", json.dumps(run, indent=2, default=str) + "\n")
