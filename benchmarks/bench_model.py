"""Training throughput of the model (forward + backward) against transformers, and the
latent cache's bytes per token against decompressed K/V.

Same config, same weights (nanoseek saves, transformers loads), same batch, one run.
transformers is timed with every experts implementation it offers on CPU and the fastest
one is the baseline, so the ratio is against its best, not its default.

    python benchmarks/bench_model.py [--preset tiny] [--batch 8] [--seq 256] [--steps 5] [--json]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import emit, json_only_stdout, log, transformers_variants
import nanoseek
from nanoseek.config import preset
from nanoseek.model import CausalLM, ContiguousCache


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def nanoseek_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).lm_loss.backward()
    return step


def hf_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # HF shifts labels itself
    return step




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    out = json_only_stdout(args.json)

    torch.manual_seed(0)
    cfg = preset(args.preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)  # same loss as HF's
    ours = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    results: dict[str, float | str] = {}
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(ours, d)
        hf_times = {}
        for impl, hf in transformers_variants(d, train=True):
            hf_times[impl] = time_steps(hf_step(hf, ids), args.warmup, args.steps)
            log(f"transformers [{impl}]: {tokens / hf_times[impl]:,.0f} tok/s")
            del hf
    t_ours = time_steps(nanoseek_step(ours, ids), args.warmup, args.steps)
    best_impl = min(hf_times, key=hf_times.get)
    results["ratio"] = hf_times[best_impl] / t_ours
    results["nanoseek_tok_s"] = tokens / t_ours
    results["transformers_tok_s"] = tokens / hf_times[best_impl]
    results["transformers_experts_impl"] = best_impl

    # cache: what nanoseek holds per token against a decompressed per-head K/V cache
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq))
    cache = ContiguousCache(1, args.seq)
    with torch.no_grad():
        ours(ids, cache=cache)
    latent = cache.nbytes() / args.seq
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    decompressed = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 4
    results["latent_bytes_per_token"] = latent
    results["expected_latent_bytes_per_token"] = expected
    results["decompressed_kv_bytes_per_token"] = decompressed
    results["cache_reduction"] = decompressed / latent
    results["torch_threads"] = torch.get_num_threads()
    emit(results, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
