"""Shared pieces of the post-training tests: a micro checkpoint with a tokenizer to start
from, and small chat / preference files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.model import CausalLM
from tests.train_utils import micro_config, small_corpus

PAIRS = [("What is the capital of France?", "Paris."),
         ("Name a primary colour.", "Red."),
         ("How many legs has a cat?", "Four."),
         ("What does a cow say?", "Moo.")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_init(path: Path, seed: int = 0, **config) -> Path:
    """A randomly initialised micro model and a byte-level BPE trained on a little text
    (the prompts and answers included), saved as a checkpoint directory."""
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    texts = small_corpus(20) + [p + " " + r for p, r in PAIRS] * 5
    tok = train_tokenizer(texts, vocab_size=384)
    torch.manual_seed(seed)
    model = CausalLM(micro_config(**config))
    save_pretrained(model, path)
    save_tokenizer(tok, path)
    return path
