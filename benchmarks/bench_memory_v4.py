"""Peak memory (RSS) of one 4k-token forward of `tiny-v4`: nanoseek against transformers'
DeepseekV4ForCausalLM, on the same weights.

Each side runs in its own fresh Python process, so neither sees the other's allocations or
the allocator's cached pages: the parent saves one checkpoint (nanoseek born, random init,
seed 0), and a worker process per side loads it in fp32, reads its resident set, runs one
forward of --batch x --seq tokens in eval mode under no_grad (no cache: transformers is
called with use_cache=False, so neither builds decoding state) and reports

  * peak_rss_mb:    the process's peak RSS over its whole life (imports, weights, forward);
  * forward_mb:     the forward's own peak: the peak RSS during the forward (Linux's VmHWM,
                    reset just before it through /proc/self/clear_refs) minus the RSS
                    before it: activations, attention scores, logits.

transformers runs once per experts implementation it offers, and the lowest peak is the
baseline (as bench_model.py takes its fastest). The last line: nanoseek's and transformers'
figures and `ratio` = transformers' peak RSS / nanoseek's (above 1: nanoseek uses less).

    python benchmarks/bench_memory_v4.py [--seq 4096] [--batch 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import EXPERTS_IMPLEMENTATIONS, emit, json_only_stdout, log


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: now, VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(side: str, ckpt: str, batch: int, seq: int, impl: str | None) -> dict:
    """One side's forward in this process; returns its memory figures."""
    import resource

    import torch
    torch.manual_seed(0)
    if side == "nanoseek":
        import nanoseek
        model = nanoseek.from_pretrained(ckpt).eval()
        vocab = model.config.vocab_size
        forward = model
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, experts_implementation=impl).eval()
        vocab = model.config.vocab_size

        def forward(ids):
            return model(input_ids=ids, use_cache=False).logits
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    before = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = forward(ids)
    seconds = time.perf_counter() - t0
    peak_forward = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is the life-long peak, which clear_refs does not reset
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_forward)
    return {"peak_rss_mb": peak / 1024, "forward_mb": (peak_forward - before) / 1024,
            "rss_before_forward_mb": before / 1024, "forward_s": seconds,
            "exact_forward_peak": exact, "logits_finite": bool(torch.isfinite(logits).all())}


def run_worker(side: str, ckpt: str, args, impl: str | None = None) -> dict | None:
    """The worker in a fresh process (same interpreter and threads); None if it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--ckpt", ckpt,
           "--batch", str(args.batch), "--seq", str(args.seq)] + (["--impl", impl] if impl else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"{side}{f' [{impl}]' if impl else ''}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-v4")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--worker", choices=["nanoseek", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.batch, args.seq, args.impl)))
        return
    out = json_only_stdout(args.json)

    import torch

    import nanoseek
    from nanoseek.config import preset
    from nanoseek.model import CausalLM
    cfg = preset(args.preset)
    if args.seq > cfg.max_position_embeddings:
        p.error(f"--seq {args.seq} exceeds {args.preset}'s max_position_embeddings ({cfg.max_position_embeddings})")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        nanoseek.save_pretrained(CausalLM(cfg), d)
        ours = run_worker("nanoseek", d, args)
        if ours is None:
            raise SystemExit("nanoseek's forward failed (see above)")
        log(f"nanoseek: peak RSS {ours['peak_rss_mb']:.0f} MB, forward {ours['forward_mb']:.0f} MB "
            f"({ours['forward_s']:.1f} s)")
        theirs = {}
        for impl in EXPERTS_IMPLEMENTATIONS:
            r = run_worker("transformers", d, args, impl)
            if r is not None:
                theirs[impl] = r
                log(f"transformers [{impl}]: peak RSS {r['peak_rss_mb']:.0f} MB, forward "
                    f"{r['forward_mb']:.0f} MB ({r['forward_s']:.1f} s)")
    if not theirs:
        raise SystemExit("no transformers experts implementation ran (see above)")
    best = min(theirs, key=lambda k: theirs[k]["peak_rss_mb"])
    hf = theirs[best]
    results = {"nanoseek_peak_rss_mb": ours["peak_rss_mb"], "transformers_peak_rss_mb": hf["peak_rss_mb"],
               "ratio": hf["peak_rss_mb"] / ours["peak_rss_mb"],
               "nanoseek_forward_mb": ours["forward_mb"], "transformers_forward_mb": hf["forward_mb"],
               "transformers_experts_impl": best, "tokens": args.batch * args.seq,
               "exact_forward_peak": ours["exact_forward_peak"] and hf["exact_forward_peak"],
               "torch_threads": torch.get_num_threads()}
    emit(results, args.json, out, settings={k: v for k, v in vars(args).items()
                                            if k not in ("worker", "ckpt", "impl")})


if __name__ == "__main__":
    main()
