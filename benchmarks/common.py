"""What the benchmarks share: transformers loaded with each experts implementation it offers,
so every comparison is against transformers' fastest option, not its default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    from machine import load_average, machine_info
except ImportError:  # imported as benchmarks.common (bench_agent.py)
    from benchmarks.machine import load_average, machine_info

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


_load_at_start: float | None = None  # the machine's load when the benchmark began


def json_only_stdout(as_json: bool):
    """With --json, everything printed while the benchmark runs (its progress, a library's
    messages) goes to stderr; returns the real stdout, where `emit` writes the JSON. Every
    benchmark calls it first, so it also notes the load average at the start."""
    global _load_at_start
    _load_at_start = load_average()
    real = sys.stdout
    if as_json:
        sys.stdout = sys.stderr
    return real


def run_record(settings: dict | None) -> dict:
    """What --json adds beside the results, so that a saved output says where it came from
    (benchmarks/write_results.py reads it): the script, its command line, its arguments and
    the machine."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = script.relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        shown = script.name
    return {"benchmark": script.stem, "command": ["python", shown, *sys.argv[1:]],
            "settings": {k: v for k, v in (settings or {}).items() if k != "json"},
            "machine": machine_info(_load_at_start)}


def emit(results: dict, as_json: bool, out, skip_prefix: str | None = None,
         settings: dict | None = None) -> None:
    """The results on `out`: with --json, JSON alone (the results, then `benchmark`,
    `command`, `settings` — the parsed arguments — and `machine`), else one key=value line."""
    if as_json:
        print(json.dumps({**results, **run_record(settings)}, indent=2), file=out)
        return
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()
                   if not (skip_prefix and k.startswith(skip_prefix))), file=out)
