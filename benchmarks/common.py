"""What the benchmarks share: transformers loaded with each experts implementation it offers,
so every comparison is against transformers' fastest option, not its default."""

from __future__ import annotations

import json
import sys

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def transformers_variants(path, train: bool, dtype=None):
    """Yield (experts_implementation, DeepseekV3ForCausalLM) for each implementation this
    transformers build offers, loaded from the checkpoint directory `path` (in `dtype`,
    a torch dtype; None: the checkpoint's fp32)."""
    import transformers
    kw = {} if dtype is None else {"dtype": dtype}
    for impl in EXPERTS_IMPLEMENTATIONS:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl, **kw)
        except Exception as e:  # an implementation this build does not offer
            log(f"transformers experts_implementation={impl}: unavailable ({type(e).__name__})")
            continue
        yield impl, hf.train(train)


def log(*args) -> None:
    """Progress and intermediate figures: stderr, so that `--json` output is JSON alone."""
    print(*args, file=sys.stderr, flush=True)


def json_only_stdout(as_json: bool):
    """With --json, everything printed while the benchmark runs (its progress, a library's
    messages) goes to stderr; returns the real stdout, where `emit` writes the JSON."""
    real = sys.stdout
    if as_json:
        sys.stdout = sys.stderr
    return real


def emit(results: dict, as_json: bool, out, skip_prefix: str | None = None) -> None:
    """The results on `out`: JSON alone with --json, else one key=value line."""
    if as_json:
        print(json.dumps(results, indent=2), file=out)
        return
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()
                   if not (skip_prefix and k.startswith(skip_prefix))), file=out)
