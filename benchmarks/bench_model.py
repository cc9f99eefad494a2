"""Training throughput of the model (forward + backward) against transformers, and the
latent cache's bytes per token against decompressed K/V.

Same config, same weights (nanoseek saves, transformers loads), same batch, one run.
transformers is timed with every experts implementation it offers on CPU and the fastest
one is the baseline, so the ratio is against its best, not its default.

Each architecture is measured the same way: V3 on --preset (DeepseekV3ForCausalLM), V3.2 on
tiny-v32 (DeepseekV32ForCausalLM) and V4 on tiny-v4 (DeepseekV4ForCausalLM), MTP off and the
balance loss 0 and the indexers' KL weight 0 (transformers trains no indexer: its indexers
run under no_grad), so both sides backpropagate the same next-token loss; with the weight 0
nanoseek skips the indexer's training target too.
The last line keeps V3's keys (ratio, nanoseek_tok_s, ...) and adds ratio_v32 and ratio_v4.

    python benchmarks/bench_model.py [--preset tiny] [--archs v3,v32,v4] [--batch 8] [--seq 256] [--steps 5] [--json]
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




ARCH_PRESETS = {"v32": "tiny-v32", "v4": "tiny-v4"}  # v3: --preset


def throughput(cfg, ids, warmup: int, steps: int, label: str) -> dict:
    """Forward + backward tokens/s of nanoseek and of transformers' fastest experts
    implementation on the same weights; the model is returned for what follows."""
    torch.manual_seed(0)
    ours = CausalLM(cfg).train()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    hf_times = {}
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(ours, d)
        for impl, hf in transformers_variants(d, train=True):
            hf_times[impl] = time_steps(hf_step(hf, ids), warmup, steps)
            log(f"{label} transformers [{impl}]: {tokens / hf_times[impl]:,.0f} tok/s")
            del hf
    t_ours = time_steps(nanoseek_step(ours, ids), warmup, steps)
    best = min(hf_times, key=hf_times.get)
    log(f"{label} nanoseek: {tokens / t_ours:,.0f} tok/s, {hf_times[best] / t_ours:.2f}x transformers [{best}]")
    return {"ratio": hf_times[best] / t_ours, "nanoseek_tok_s": tokens / t_ours,
            "transformers_tok_s": tokens / hf_times[best], "transformers_experts_impl": best,
            "model": ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--archs", default="v3,v32,v4", help="comma-separated: v3 (--preset), v32 (tiny-v32), v4 (tiny-v4)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    out = json_only_stdout(args.json)
    archs = args.archs.split(",")
    if not set(archs) <= {"v3", *ARCH_PRESETS}:
        p.error(f"--archs: {args.archs!r}; choose among v3, v32, v4")

    results: dict[str, float | str] = {}
    same_loss = dict(num_nextn_predict_layers=0, aux_loss_alpha=0.0)  # the loss HF computes
    cfg = preset(args.preset, **same_loss)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    ours, per_arch = None, {}
    if "v3" in archs:
        r = throughput(cfg, ids, args.warmup, args.steps, "v3")
        ours = r.pop("model")
        results.update(r)
    for arch in (a for a in ("v32", "v4") if a in archs):  # their tok/s go to the log (stderr)
        # nor the indexers' KL: transformers' indexers do not train (torch.no_grad)
        cfg_a = preset(ARCH_PRESETS[arch], **same_loss, indexer_loss_coef=0.0)
        per_arch[f"ratio_{arch}"] = throughput(cfg_a, ids % cfg_a.vocab_size, args.warmup, args.steps, arch)["ratio"]
    if ours is None:
        emit({**per_arch, "torch_threads": torch.get_num_threads()}, args.json, out, settings=vars(args))
        return

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
    results.update(per_arch)
    emit(results, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
