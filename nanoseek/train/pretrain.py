"""Pretraining: corpus -> tokenizer -> token arrays -> the training loop -> a checkpoint.

A run is described by one `PretrainConfig` (the model, the loop's `TrainConfig`, the
data); run.json saves it whole under "settings" and `--resume` rebuilds it from there.
The run directory is at every save a checkpoint that transformers loads
(`config.json`, `model.safetensors`, the tokenizer files) plus the resumable state
(`train_state.pt`), the token arrays (`data/`), `metrics.jsonl` and `run.json`, which is
written first and marks the directory as a nanoseek run (run_dir.py: what a run may
replace), under a lock (run_lock.py); Ctrl-C and SIGTERM save at the next step (signals.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.train.config import settings_to_dict
from nanoseek.train.eval import make_evaluate
from nanoseek.train.loop import Trainer
from nanoseek.train.run.run_dir import (MARKER, RunError, check_run_dir,  # noqa: F401 (RunError: API)
                                    read_run_json, remove_own_files, run_kind)
from nanoseek.train.run.run_lock import check_unlocked, run_lock
from nanoseek.train.run.run_settings import (DataConfig, PretrainConfig,  # noqa: F401 (DataConfig: API)
                                         read_settings, with_overrides)
from nanoseek.train.run.signals import Interrupted, stop_on_signals

SAMPLE_PROMPTS = ("The for statement", "A function definition", "Exceptions are")


def setup_threads() -> int:
    """Use every core this process may run on (torch's default can be fewer)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrain_loss(model, batch, targets):
    """The pretraining objective: next-token CE + λ·MTP + balance (+ z-loss) (+ V3.2's and
    V4's indexer loss), all inside model.loss, as this micro-batch's share of the step (see
    CausalLM.loss for the rule each term follows); the parts are logged separately, the
    indexer's only for a model that has one (a V3 run's records keep their fields)."""
    x, y = batch
    out = model.loss(x, y, num_targets=targets.count, num_batches=targets.micro_batches)
    logs = {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}
    if getattr(out, "indexer_loss", None) is not None:
        logs["indexer_loss"] = out.indexer_loss
    return out.loss, logs


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


def prepare_data(out_dir: Path, cfg: ModelConfig, data: DataConfig, seed: int, log=print,
                 fresh: bool = True):
    """Tokenizer and the memory-mapped token arrays. A resumed run (fresh=False) reuses
    the run's own tokenizer.json; a fresh run never reads one from `out_dir` (it has none:
    see run_dir.py) and uses `data.tokenizer`, or trains one on the training split."""
    from nanoseek.data import build_token_arrays, load_corpus
    from nanoseek.data.tokenized import split_documents
    from nanoseek.text.tokenizer import (copy_tokenizer, load_tokenizer, save_tokenizer,
                                         train_tokenizer)

    docs = load_corpus(data.paths or None, data.text_field)
    if not fresh and (out_dir / "tokenizer.json").exists():
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
    saved = read_settings(out_dir) if resume else None
    if saved is None:
        return config
    if overrides is None:
        overrides = {"train.max_steps": config.train.max_steps,
                     "train.time_limit": config.train.time_limit}
    return with_overrides(saved, overrides)


def threads_for_run(out_dir: Path, threads: int | None, resume: bool, log=print) -> int | None:
    """The thread count changes the float results (a different reduction order): a resumed
    run keeps the run's own unless `threads` is given, and then says it may diverge."""
    saved = (read_run_json(out_dir) or {}).get("threads") if resume else None
    if saved is None:
        return threads
    saved = 0 if saved == "adaptive" else saved
    if threads is None:
        return saved
    if threads != saved:
        log(f"threads: {threads or 'adaptive'} as given, though the run trained with "
            f"{saved or 'adaptive'}: the losses will not match an uninterrupted run's bit for bit")
    return threads


def pretrain(out_dir: str | Path, config: PretrainConfig, resume: bool = False,
             overrides: dict | None = None, progress: bool = True, log=print,
             threads: int | None = None, overwrite: bool = False, kind: str = "pretrain",
             parallel=None) -> dict:
    """Run (or resume) a pretraining run in `out_dir`; returns run.json's content.
    On resume the settings are the run's saved ones (see `settings_for_run`), its thread
    count too unless `threads` is given. A directory that is not empty must hold a run of
    ours (run_dir.py); `overwrite` starts such a run over, deleting only its own files.
    The directory is locked for the call (run_lock.py). SIGINT / SIGTERM stop at the next
    step with a checkpoint and raise `Interrupted` (signals.py).
    threads: None = every core; 0 = adapt between every core and one while training (see
    train/numerics/threads.py: on a crowded machine one thread can be several times faster).
    parallel: a nanoseek.parallel.ParallelConfig (ep, tp, pp) for a run under torchrun; the
    run is distributed whenever torchrun started more than one process."""
    from nanoseek.parallel import launch
    out_dir = Path(out_dir)
    if launch.under_torchrun():
        with launch.clear_peer_errors():
            ok = False
            try:
                run = _checked(out_dir, config, resume, overrides, progress, log, threads,
                               overwrite, kind, parallel)
                ok = True
                return run
            finally:
                launch.finish(drain=ok)
    return _checked(out_dir, config, resume, overrides, progress, log, threads, overwrite, kind, None)


def _checked(out_dir: Path, config: PretrainConfig, resume: bool, overrides: dict | None,
             progress: bool, log, threads: int | None, overwrite: bool, kind: str, parallel) -> dict:
    """The run directory's checks and lock, then training. Under torchrun rank 0 alone
    checks, locks and writes; the other ranks follow what it prepared (launch.main_first)."""
    from nanoseek.parallel import launch
    if not launch.is_main():
        config = settings_for_run(out_dir, config, resume, overrides)
        config.validate()
        return _train(out_dir, config, "resume" if resume else "new", progress, log, threads,
                      kind, parallel)
    check_unlocked(out_dir)  # every check before the lock only reads: a refusal writes nothing
    mode = check_run_dir(out_dir, resume, overwrite)
    if resume and mode == "new":
        log(f"nothing to resume in {out_dir}: starting a new run")
    config = settings_for_run(out_dir, config, mode == "resume", overrides)
    config.validate()
    threads = threads_for_run(out_dir, threads, mode == "resume", log)
    with run_lock(out_dir):
        mode = check_run_dir(out_dir, resume, overwrite)  # again, now that no one else can write
        if mode == "replace":
            log(f"starting over in {out_dir}: deleting the previous run's files "
                f"({', '.join(remove_own_files(out_dir))})")
        if mode == "resume":  # a speedrun resumed by `pretrain --resume` stays a speedrun
            kind = run_kind(out_dir) or kind
        return _train(out_dir, config, mode, progress, log, threads, kind, parallel)


def _train(out_dir: Path, config: PretrainConfig, mode: str, progress: bool, log,
           threads: int | None, kind: str, parallel) -> dict:
    from nanoseek.parallel import launch
    max_threads = setup_threads()
    if threads:
        torch.set_num_threads(threads)
    marker = {MARKER: kind, "threads": "adaptive" if threads == 0 else torch.get_num_threads()}
    if mode != "resume" and launch.is_main():  # run.json first: from here on the directory is ours
        write_run(out_dir, {**marker, "settings": settings_to_dict(config)})
    device = default_device()
    if launch.under_torchrun():  # one process of several: see nanoseek/parallel/
        from nanoseek.parallel import ParallelConfig
        from nanoseek.parallel.mesh import init_distributed
        parallel = parallel or ParallelConfig()
        device = init_distributed(parallel.timeout)
        torch.set_num_threads(threads or launch.threads_per_process())
        log = log if launch.is_main() else (lambda *a, **k: None)
    with launch.main_first():  # rank 0 writes the tokenizer and token arrays; the others read them
        tok, data = prepare_data(out_dir, config.model, config.data, config.train.seed, log,
                                 fresh=mode != "resume" and launch.is_main())
    check_sample_length(tok, config)
    trainer, run = build_trainer(out_dir, config, tok, data, device, progress, adapt=threads == 0,
                                 parallel=parallel)
    run = {**marker, **run, "cores": max_threads, "settings": settings_to_dict(config)}
    if mode == "resume":
        resumed = trainer.resume()
        log(f"resumed at step {trainer.step}" if resumed else "nothing to resume: starting fresh")
    if launch.is_main():
        write_run(out_dir, run)
    log(describe(run))
    with stop_on_signals(trainer):
        summary = trainer.fit()
    if summary.get("interrupted"):
        raise Interrupted(summary["interrupted"], trainer.step, out_dir)
    run.update(summary=summary, mfu=run["flops_per_token"] * summary["tok_s"] / run["peak_flops"]
               if run["peak_flops"] else None)
    if launch.is_main():
        write_run(out_dir, run)
    return run


def check_sample_length(tok, config: PretrainConfig) -> None:
    """The samples run after the last step, before the last save: a prompt plus
    sample_tokens beyond the context would fail there, so check now."""
    if not config.sample_tokens:
        return
    longest = max(len(tok(p)["input_ids"]) for p in SAMPLE_PROMPTS)
    ctx = config.model.max_position_embeddings
    if longest + config.sample_tokens > ctx:
        raise ValueError(f"option 'sample_tokens': {config.sample_tokens} tokens after a "
                         f"{longest}-token prompt exceed the model's context ({ctx}); "
                         f"use at most {ctx - longest}")


def build_trainer(out_dir: Path, config: PretrainConfig, tok, data, device, progress: bool,
                  adapt: bool, parallel=None) -> tuple[Trainer, dict]:
    """The model (seeded), its measured facts for run.json, and the loop wired to the data."""
    from nanoseek.calc.params import count_params
    from nanoseek.model import CausalLM
    from nanoseek.parallel.single import runtime_for
    from nanoseek.text.tokenizer import token_byte_lengths
    from nanoseek.train.numerics.mfu import flops_per_token, measure_peak_flops
    from nanoseek.train.numerics.precision import peak_dtype

    cfg, tcfg = config.model, config.train
    byte_lengths = token_byte_lengths(tok) + [0] * (cfg.vocab_size - len(tok))
    torch.manual_seed(tcfg.seed)
    model = CausalLM(cfg).to(device)
    fpt = flops_per_token(model, tcfg.seq_len)
    # batch_size is the global micro-batch: each DP rank takes its slice of it, so a run
    # resumed on another number of processes trains alike
    par = runtime_for(model, parallel, device)
    if tcfg.batch_size % par.dp:
        raise ValueError(f"training option 'batch_size': {tcfg.batch_size} sequences cannot "
                         f"be split over {par.dp} data-parallel ranks (use a multiple of {par.dp})")

    def next_batch(step, micro):
        batch = data.batch(step, micro, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
        return tuple(t.to(device) for t in par.local_rows(batch))
    # no samples under TP (the absorbed decode path is not split); no evaluation or samples
    # under PP (the forward is the schedule's; a rank holds only its stage up to date)
    sample_tokens = config.sample_tokens if par.tp == 1 and par.pp == 1 else 0
    pipelined = par.pp > 1
    trainer = Trainer(
        model, tcfg, out_dir, next_batch=next_batch,
        loss_fn=pretrain_loss, count_targets=lambda batch: model.loss_targets(batch[1]),
        evaluate=None if pipelined else make_evaluate(data, byte_lengths, tcfg.seq_len,
                                                      tcfg.eval_tokens, device),
        sample=(make_sampler(tok, device, max_new_tokens=sample_tokens) if sample_tokens else None),
        on_checkpoint=lambda m, step: save_pretrained(m, out_dir),
        flops_per_token=fpt, progress=progress, adapt_threads=adapt, parallel=par)
    chosen = torch.get_num_threads()
    setup_threads()  # MFU is against the whole machine's peak
    # MFU is against the peak of the dtype the run multiplies in (the trainer chose it);
    # measured once per dtype and cached (`nanoseek peak --remeasure`)
    peak = trainer.peak_flops = measure_peak_flops(device, peak_dtype(trainer.precision))
    torch.set_num_threads(chosen)
    run = {"params": count_params(cfg).summary(), "flops_per_token": trainer.flops_per_token,
           "peak_flops": peak, "device": str(device),
           "threads": "adaptive" if adapt else torch.get_num_threads(),
           "moe_layers": moe_layer_names(model), "precision": trainer.precision,
           "precision_reason": trainer.precision_reason, "compile": trainer.compiled,
           "compile_reason": trainer.compile_reason, "data": data.meta,
           **data.unigram_baseline(tcfg.seq_len, byte_lengths, tcfg.eval_tokens or None)}
    if par.distributed:
        run["parallel"] = {"world": par.dp * par.tp * par.pp, "dp": par.dp, "ep": par.ep, "tp": par.tp,
                           "pp": par.pp, "replicate": par.replicate,
                           "backend": torch.distributed.get_backend()}
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
    """Checkpoint-style names of the MoE layers, in model.moe_layers() order; V4's
    hash-routed layers say so (their load is the token-id table's, not the router's)."""
    L = model.config.num_hidden_layers
    names = []
    for name, m in model.named_modules():
        if type(m).__name__ == "MoE":
            parts = name.split(".")
            names.append((f"layer {parts[2]}" if parts[0] == "model" else f"MTP {parts[1]} (layer {L + int(parts[1])})")
                         + (" (hash)" if getattr(m, "is_hash", False) else ""))
    return names


def write_run(out_dir: Path, run: dict) -> None:
    from nanoseek.checkpoint.atomic import atomic_write_text

    atomic_write_text(out_dir / "run.json", json.dumps(run, indent=2, default=str) + "\n")


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m nanoseek.train.pretrain ARGS
    import runpy  # == nanoseek pretrain ARGS (run as a module: the CLI is not imported here)
    import sys
    sys.argv = ["nanoseek", "pretrain", *sys.argv[1:]]
    runpy.run_module("nanoseek", run_name="__main__")
