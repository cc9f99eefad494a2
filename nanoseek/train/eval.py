"""Evaluation of a language model on its run's held-out split: `nanoseek eval RUN_DIR`.

The same function scores the model during training (the loop's periodic evaluation) and
a checkpoint reloaded from disk afterwards (the speedrun's proof that the run directory
holds the model that was trained).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


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


def evaluate_checkpoint(run_dir: str | Path, seq_len: int) -> dict:
    """Reload the saved checkpoint from disk and score the whole validation split."""
    from nanoseek.checkpoint import from_pretrained
    from nanoseek.data.tokenized import TokenArrays
    from nanoseek.tokenizer import load_tokenizer, token_byte_lengths

    run_dir = Path(run_dir)
    model = from_pretrained(run_dir).eval()
    if not 1 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len}: must be in [1, {model.config.max_position_embeddings}] "
                         f"(the model's max_position_embeddings)")
    tok = load_tokenizer(run_dir)
    data = TokenArrays.open(run_dir / "data")
    lengths = token_byte_lengths(tok) + [0] * (model.config.vocab_size - len(tok))
    with torch.no_grad():
        return make_evaluate(data, lengths, seq_len, None, torch.device("cpu"))(model)


def evaluate_run(run_dir: str | Path, seq_len: int | None = None) -> dict:
    """`nanoseek eval`: a pretraining run's checkpoint on its held-out split, in windows of
    `seq_len` tokens (default: the run's own training length, 256 without run.json)."""
    from nanoseek.train.run_settings import read_settings

    run_dir = Path(run_dir)
    if not (run_dir / "data" / "meta.json").exists():
        raise FileNotFoundError(f"{run_dir}: no data/meta.json (not a nanoseek pretraining run)")
    if seq_len is None:
        settings = read_settings(run_dir)
        seq_len = settings.train.seq_len if settings is not None else 256
    return evaluate_checkpoint(run_dir, seq_len)
