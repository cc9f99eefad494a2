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
    from nanoseek.data.tokenized import TokenArrays
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import load_tokenizer, token_byte_lengths

    run_dir = Path(run_dir)
    model = CausalLM.from_pretrained(run_dir).eval()
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
    from nanoseek.train.run.run_settings import read_settings

    run_dir = Path(run_dir)
    if not (run_dir / "data" / "meta.json").exists():
        raise FileNotFoundError(f"{run_dir}: no data/meta.json (not a nanoseek pretraining run)")
    if seq_len is None:
        settings = read_settings(run_dir)
        seq_len = settings.train.seq_len if settings is not None else 256
    return evaluate_checkpoint(run_dir, seq_len)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The Codex paper's unbiased pass@k from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_task(model_dir_or_llm, task, n: int = 200, k: int = 4, temperature: float = 0.8,
                  seed: int = 0, samples: int | None = None, max_tokens: int | None = None,
                  split: str = "test", shard: tuple[int, int] = (0, 1)) -> dict:
    """Held-out accuracy on a verifiable task through the engine: greedy (temperature 0)
    accuracy, format rate and mean reward; then `samples` (default k) completions per
    problem at `temperature` for pass@1 and the unbiased pass@k (k=0: greedy only).
    `task` is a Task or a name/path for `load_task`; the model a checkpoint dir or an LLM.
    shard (i, m): only the i-th of m contiguous slices of the n problems (a data-parallel
    rank's share; "n" in the result is the slice's size)."""
    import time

    from nanoseek.data.tasks import load_task
    from nanoseek.engine import LLM, SamplingParams

    task = load_task(task) if isinstance(task, (str, Path)) else task
    llm = model_dir_or_llm if isinstance(model_dir_or_llm, LLM) else LLM(model_dir_or_llm, max_num_seqs=256)
    samples = samples or k
    if k and samples < k:
        raise ValueError(f"samples={samples} must be >= k={k} for pass@{k}")
    examples = task.examples(split, n, seed)
    examples = examples[shard[0] * len(examples) // shard[1]:(shard[0] + 1) * len(examples) // shard[1]]
    max_tokens = max_tokens or task.max_tokens
    t0 = time.perf_counter()
    greedy = [c[0] for c in task.rollout(llm, examples, SamplingParams(temperature=0, max_tokens=max_tokens))]
    rewards = [task.reward(ex, c) for ex, c in zip(examples, greedy)]
    out = {"task": task.name, "split": split, "n": len(examples),
           "accuracy": _mean(r.correct for r in rewards),
           "format": _mean(r.components.get("format", 0.0) >= 1.0 for r in rewards),
           "mean_reward": _mean(r.total for r in rewards),
           "examples": [{"prompt": ex.prompt, "answer": ex.answer, "completion": c, "reward": r.total}
                       for ex, c, r in list(zip(examples, greedy, rewards))[:3]]}
    if k:
        params = SamplingParams(n=samples, temperature=temperature, seed=seed, max_tokens=max_tokens)
        sampled = task.rollout(llm, examples, params)
        correct = [sum(task.reward(ex, c).correct for c in cs) for ex, cs in zip(examples, sampled)]
        out.update({"k": k, "temperature": temperature, "samples_per_problem": samples,
                    "pass@1": _mean(c / samples for c in correct),
                    f"pass@{k}": _mean(pass_at_k(samples, c, k) for c in correct)})
    out["seconds"] = time.perf_counter() - t0
    return out


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0
