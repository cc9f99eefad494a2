"""The speedrun: the whole pipeline on the embedded corpus with the `tiny` preset, on a
CPU, in minutes: tokenizer -> pretraining -> evaluation of the saved checkpoint -> report.

Training runs for `max_steps` or `minutes`, whichever ends first (the learning-rate
schedule follows whichever is further along, so a slow or shared machine still gets a
fully decayed run). The post-training stages (SFT, GRPO) are to be added after step 2.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from nanoseek.config import preset
from nanoseek.train.loop import TrainConfig

# The speedrun's training recipe, sized on a 2-core CPU (see README "Training").
SPEEDRUN_TRAIN = dict(batch_size=8, seq_len=256, grad_accum=1, lr=3e-3, warmup_steps=30,
                      schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
                      eval_every=50, eval_tokens=0, save_every=100, sample_every=0, seed=1337)


# γ of the aux-loss-free update. V3 uses 0.001 over ~10^5 steps; in a few hundred steps that
# moves a bias by at most a few tenths and the busiest expert of a layer ends up with most
# tokens (measured: max violation 5-7 of a possible 7 at step 179 with 0.001).
SPEEDRUN_BIAS_SPEED = 0.01


def _is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("run.json", "train_state.pt", "metrics.jsonl"))


def evaluate_checkpoint(run_dir: Path, seq_len: int) -> dict:
    """Reload the saved checkpoint from disk and score the whole validation split: proves
    the directory holds the model that was trained."""
    import torch

    from nanoseek.checkpoint import from_pretrained
    from nanoseek.data.tokenized import TokenArrays
    from nanoseek.tokenizer import load_tokenizer, token_byte_lengths
    from nanoseek.train.pretrain import make_evaluate

    model = from_pretrained(run_dir)
    if not 1 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len}: must be in [1, {model.config.max_position_embeddings}] "
                         f"(the model's max_position_embeddings)")
    tok = load_tokenizer(run_dir)
    data = TokenArrays.open(run_dir / "data")
    lengths = token_byte_lengths(tok) + [0] * (model.config.vocab_size - len(tok))
    with torch.no_grad():
        return make_evaluate(data, lengths, seq_len, None, torch.device("cpu"))(model)


def speedrun(name: str = "speedrun", root: str | Path = "runs", minutes: float = 7.0,
             max_steps: int = 300, progress: bool = True, log=print, threads: int | None = 0,
             **train_overrides) -> Path:
    """Run every stage; returns the path of report.md."""
    from nanoseek.report import write_report
    from nanoseek.train.pretrain import pretrain, write_run

    t_start = time.perf_counter()
    out = Path(root) / name
    if out.exists():
        if not _is_run_dir(out):
            raise FileExistsError(f"{out} exists and is not a nanoseek run; choose another --name")
        log(f"removing the previous speedrun in {out}")
        shutil.rmtree(out)
    cfg = preset("tiny", bias_update_speed=SPEEDRUN_BIAS_SPEED)
    tcfg = TrainConfig(**{**SPEEDRUN_TRAIN, "max_steps": max_steps, "time_limit": minutes * 60,
                          **train_overrides})
    log(f"[1/3] tokenizer + pretraining: tiny preset, up to {max_steps} steps or {minutes:g} min")
    run = pretrain(out, cfg, tcfg, progress=progress, log=log, threads=threads)
    log("[2/3] evaluation: reloading the checkpoint from disk")
    ev = evaluate_checkpoint(out, tcfg.seq_len)
    log(f"      validation loss {ev['val_loss']:.4f} nats/token, {ev['val_bpb']:.4f} bits/byte "
        f"(unigram baseline {run['unigram_loss']:.4f} / {run['unigram_bpb']:.4f})")
    log("[3/3] report")
    total = time.perf_counter() - t_start
    run["report_extra"] = {
        "reloaded checkpoint: validation loss / bits per byte (all validation tokens)":
            f"{ev['val_loss']:.4f} / {ev['val_bpb']:.4f}",
        "speedrun wall time, all stages (s)": f"{total:.0f}",
    }
    write_run(out, run)  # so that `nanoseek report` re-makes the same card later
    path = write_report(out, title="nanoseek speedrun")
    log(f"report: {path}  ({total / 60:.1f} min in all)")
    return path
