"""Decode cost and cache bytes of one stream at long contexts: V3, V3.2 and V4 side by side.

The claim under test (DeepSeek-V4 report §2.3; V3.2 §2.1): V4's per-token decode cost and
cache bytes grow far slower with the context than V3's, because a V4 layer keeps only a
sliding window of n_win tokens plus one compressed entry per m (CSA) or m' (HCA) tokens,
where V3's MLA keeps and reads a latent row for every token. V3.2 keeps V3's latent rows
and adds one indexer key per token; its point is compute (attention over the top-k only).

Three tiny models of the same width, depth and vocabulary (presets tiny, tiny-v32, tiny-v4:
hidden 256, 4 layers, vocab 4096; random weights, seed 0; MTP off, since it plays no part
in decoding one stream) run one stream each. For every context length L the context (random
token ids) is prefilled in chunks of --chunk tokens through a `ContiguousCache`, then
--steps decode steps (after --warmup untimed ones) are timed, each feeding the greedy token
back. Reported per model and L: ms/token (the median step: the machine may be shared, and
the median ignores the steps another process delayed; the mean is in --json), the cache's
bytes (`cache.nbytes()` right after the prefill, i.e. for exactly L tokens) and
`nanoseek.calc.kv`'s figure for the same config, length and dtype (V4's measured bytes are
also split by kind: window, compressed entries, open windows, CSA's overlap half). Prefill
is timed too, but only to say where the run time goes.

What the figures mean on this code (read docs/long-context.md):
  * V3 decode attends over all L latent rows (absorbed MLA), so its cost per token is a
    fixed part (projections, MoE, head) plus a part linear in L.
  * V3.2 decode scores all L indexer keys per query (16 heads x 32 dims in tiny-v32) and
    attends over the gathered top-k latents only (model/attention.py `top_k_latents`): its
    part linear in L is the indexer's, about as wide as tiny V3's whole MLA (4 heads over a
    64 + 16 latent), so the tiny models cannot show V3.2's saving (real V3.2: 64 x 128 FP8
    indexer against 128 heads over 512 + 64).
  * V4's CSA layers score all L/m compressed entries with the indexer and attend over the
    top-k it picks, gathered (model/v4/attention.py, `CompressorState.gather_entries`); HCA
    layers attend over all L/m'; both are a quarter or less of V3's rows.

Threads: one by default. On a shared 2-core machine two torch threads wait on each other at
every op's barrier whenever another process holds a core: a V3 decode step measured 400 ms
with two threads against 10 ms with one, at a load average of 3. Pass --threads 2 on an
idle machine.

Run time (one thread, fp32, 2-core AMD EPYC): the prefill dominates and grows as L^2 (every
chunk attends over all earlier tokens). The defaults take ~8 minutes; V3.2's indexer
scores [chunk, 16 heads, L] per layer and its 64k prefill alone takes ~19 minutes, so by
default V3.2 stops at 16k (--v32-max-context 65536 runs it to 64k).

Memory: V3.2's indexer builds a [chunk, heads, L] fp32 tensor per layer during the prefill
(16 heads: 256 x 16 x 64k x 4 B = 1 GiB, twice with the ReLU), so keep --chunk at 256 or
below on a 24 GiB machine. The last line (and --json): v4_vs_v3_decode_64k,
v4_vs_v3_kv_64k and v32_vs_v3_decode_64k, V3's cost over the other's at the largest
context both ran (the key names that context: by default V3.2's is v32_vs_v3_decode_16k).

    python benchmarks/bench_long_context.py [--contexts 1024,4096,16384,65536] [--archs v3,v32,v4]
        [--v32-max-context 16384] [--steps 16] [--warmup 2] [--chunk 256] [--threads 1]
        [--dtype fp32|bf16] [--plot PATH] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import emit, json_only_stdout, log
from nanoseek.calc import kv as kvcalc
from nanoseek.config import preset
from nanoseek.model import CausalLM, ContiguousCache

ARCH_PRESETS = {"v3": "tiny", "v32": "tiny-v32", "v4": "tiny-v4"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAME_SHAPE = ("hidden_size", "num_hidden_layers", "vocab_size")


def build_configs(archs: list[str], max_len: int) -> dict:
    """One config per arch, MTP off, positions up to max_len; refuses models whose width,
    depth or vocabulary differ (the comparison would not be like for like)."""
    cfgs = {a: preset(ARCH_PRESETS[a], num_nextn_predict_layers=0,
                      max_position_embeddings=max(max_len, 4096)) for a in archs}
    for field in SAME_SHAPE:
        values = {a: getattr(c, field) for a, c in cfgs.items()}
        if len(set(values.values())) > 1:
            raise SystemExit(f"presets differ in {field}: {values}; the comparison needs equal shapes")
    return cfgs


def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ids [1, L] through the cache `chunk` tokens at a time; the last token's logits.
    MLA decompresses in the prefill (absorb off, as CausalLM.generate does)."""
    cache.absorb = False
    for s in range(0, ids.shape[1], chunk):
        logits = model(ids[:, s:s + chunk], cache=cache)[:, -1]
    cache.absorb = True
    return logits


def decode(model, cache, logits: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float]]:
    """`steps` greedy decode steps; (the last logits, each step's seconds)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
        times.append(time.perf_counter() - t0)
    return logits, times


def warm_up(model, cfg, chunk: int) -> None:
    """One short prefill and decode, untimed: the first forward of a process pays one-off
    costs (kernel selection, allocator growth) that would land on the first context."""
    cache = ContiguousCache(1, 2 * chunk + 4)
    ids = torch.randint(3, cfg.vocab_size, (1, 2 * chunk), generator=torch.Generator().manual_seed(1))
    decode(model, cache, prefill(model, cache, ids, chunk), 4)


def v4_breakdown(cache) -> dict[str, int]:
    """Bytes of a V4 cache by kind: window, compressed entries, and the compressors' carry
    (open window and CSA's overlap half), summed over layers."""
    out = {"window": 0, "entries": 0, "open_window": 0, "overlap": 0}

    def nb(t):
        return 0 if t is None else t.numel() * t.element_size()

    for st in cache.states.values():
        out["window"] += nb(st.window)
        for c in st.compressors.values():
            out["entries"] += nb(c.entries)
            out["open_window"] += nb(c.pending_kv) + nb(c.pending_score)
            out["overlap"] += nb(c.overlap_kv) + nb(c.overlap_score)
    return out


def run_one(model, cfg, L: int, args, dtype_name: str) -> dict:
    """Prefill L random tokens, then time the decode; figures for one (model, L)."""
    ids = torch.randint(3, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
    cache = ContiguousCache(1, L + args.warmup + args.steps)
    t0 = time.perf_counter()
    logits = prefill(model, cache, ids, args.chunk)
    prefill_s = time.perf_counter() - t0
    nbytes = cache.nbytes()
    parts = v4_breakdown(cache) if cfg.is_v4 else {}
    logits, _ = decode(model, cache, logits, args.warmup)
    _, times = decode(model, cache, logits, args.steps)
    uniform = kvcalc.uniform_dtypes(dtype_name)
    return {"ms_per_token": 1e3 * statistics.median(times), "ms_per_token_mean": 1e3 * statistics.mean(times),
            "prefill_s": prefill_s,
            "cache_bytes": nbytes, "calc_bytes": kvcalc.kv_cache_bytes(cfg, L, uniform),
            "calc_bytes_no_state": kvcalc.kv_cache_bytes(cfg, L, uniform, include_state=False),
            "parts": parts}


def label(L: int) -> str:
    return f"{L // 1024}k" if L % 1024 == 0 else str(L)


def print_table(rows: dict, runs: dict[str, list[int]]) -> None:
    print(f"{'arch':5} {'context':>8} {'ms/token':>9} {'cache MiB':>10} {'B/token':>9} "
          f"{'calc B/token':>13} {'calc/meas':>9} {'prefill s':>10}")
    for a, contexts in runs.items():
        for L in contexts:
            r = rows[a][L]
            print(f"{a:5} {label(L):>8} {r['ms_per_token']:9.2f} {r['cache_bytes'] / 2**20:10.2f} "
                  f"{r['cache_bytes'] / L:9.1f} {r['calc_bytes'] / L:13.1f} "
                  f"{r['calc_bytes'] / r['cache_bytes']:9.4f} {r['prefill_s']:10.1f}")
    for L in runs.get("v4", []):
        r = rows["v4"][L]
        print(f"v4 {label(L)} measured bytes by kind: " + ", ".join(f"{k} {v}" for k, v in r["parts"].items())
              + f"; calc {r['calc_bytes']}, without the open windows {r['calc_bytes_no_state']}")


NAMES = {"v3": "V3 (MLA)", "v32": "V3.2 (MLA + indexer)", "v4": "V4 (window + CSA/HCA)"}


def plot(rows: dict, runs: dict[str, list[int]], path: str, title: str) -> None:
    """context -> ms/token and context -> cache MiB, log-log, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for a, contexts in runs.items():
        ax_t.plot(contexts, [rows[a][L]["ms_per_token"] for L in contexts], "o-", label=NAMES[a])
        ax_m.plot(contexts, [rows[a][L]["cache_bytes"] / 2**20 for L in contexts], "o-", label=NAMES[a])
    ticks = sorted({L for contexts in runs.values() for L in contexts})
    for ax, y in ((ax_t, "decode ms/token (median)"), (ax_m, "cache MiB (one stream)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ticks, [label(L) for L in ticks])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot written to {path}")


def ratios(rows: dict, runs: dict[str, list[int]]) -> dict:
    """V3's cost over the other's (above 1: the other is cheaper), each at the largest context
    both ran; V4's decode growth: V3's added ms/token from the shortest to that context over
    V4's (the fixed per-token cost left out)."""
    out = {}
    if "v3" not in runs:
        return out
    for a, keys in (("v4", ("decode", "kv")), ("v32", ("decode",))):
        common = sorted(set(runs.get(a, [])) & set(runs["v3"]))
        if not common:
            continue
        L, tag = common[-1], label(common[-1])
        v3, other = rows["v3"][L], rows[a][L]
        out[f"{a}_vs_v3_decode_{tag}"] = v3["ms_per_token"] / other["ms_per_token"]
        if "kv" in keys:
            out[f"{a}_vs_v3_kv_{tag}"] = v3["cache_bytes"] / other["cache_bytes"]
            out[f"calc_{a}_vs_v3_kv_{tag}"] = v3["calc_bytes"] / other["calc_bytes"]
            if len(common) > 1:
                L0 = common[0]
                grow = [rows[x][L]["ms_per_token"] - rows[x][L0]["ms_per_token"] for x in ("v3", a)]
                out[f"{a}_ms_growth_{label(L0)}_to_{tag}"] = grow[1]
                out[f"v3_ms_growth_{label(L0)}_to_{tag}"] = grow[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,16384,65536", help="comma-separated context lengths")
    p.add_argument("--archs", default="v3,v32,v4", help="comma-separated: v3 (tiny), v32 (tiny-v32), v4 (tiny-v4)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per forward)")
    p.add_argument("--v32-max-context", type=int, default=16384,
                   help="V3.2 skips longer contexts (its 64k prefill alone takes ~19 min on one core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (read the docstring)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights, activations and cache")
    p.add_argument("--plot", default=None, help="write the log-log plot (PNG) to this path")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    out = json_only_stdout(args.json)
    archs = args.archs.split(",")
    if not archs or not set(archs) <= set(ARCH_PRESETS):
        p.error(f"--archs: {args.archs!r}; choose among v3, v32, v4")
    try:
        contexts = sorted({int(c) for c in args.contexts.split(",")})
    except ValueError:
        p.error(f"--contexts: {args.contexts!r} is not a comma-separated list of integers")
    if contexts[0] < 1 or args.steps < 1 or args.warmup < 0 or args.chunk < 1 or args.threads < 1:
        p.error("--contexts, --steps, --chunk and --threads must be positive, --warmup >= 0")
    torch.set_num_threads(args.threads)
    runs = {a: [L for L in contexts if a != "v32" or L <= args.v32_max_context] for a in archs}

    t_start = time.perf_counter()
    cfgs = build_configs(archs, contexts[-1] + args.warmup + args.steps)
    dtype = DTYPES[args.dtype]
    rows: dict[str, dict[int, dict]] = {}
    for a in archs:
        torch.manual_seed(0)
        model = CausalLM(cfgs[a]).eval().to(dtype)
        rows[a] = {}
        t_arch = time.perf_counter()
        with torch.no_grad():
            warm_up(model, cfgs[a], args.chunk)
            for L in runs[a]:
                rows[a][L] = r = run_one(model, cfgs[a], L, args, args.dtype)
                log(f"{a} {label(L)}: {r['ms_per_token']:.2f} ms/token, cache {r['cache_bytes'] / 2**20:.2f} MiB "
                    f"(calc {r['calc_bytes'] / 2**20:.2f}), prefill {r['prefill_s']:.1f} s")
        log(f"{a}: {time.perf_counter() - t_arch:.0f} s for contexts {runs[a]}")
        del model
    total_s = time.perf_counter() - t_start

    print_table(rows, runs)
    if args.plot:
        plot(rows, runs, args.plot,
             f"tiny V3 / V3.2 / V4 (hidden 256, 4 layers, random weights), {args.dtype}, one stream, "
             f"torch threads: {torch.get_num_threads()}")
    results: dict[str, float | int | str] = ratios(rows, runs)
    for a in archs:
        for L in runs[a]:
            r = rows[a][L]
            tag = f"{a}_{label(L)}"
            results[f"{tag}_ms_per_token"] = r["ms_per_token"]
            results[f"{tag}_ms_per_token_mean"] = r["ms_per_token_mean"]
            results[f"{tag}_cache_bytes"] = r["cache_bytes"]
            results[f"{tag}_calc_bytes"] = r["calc_bytes"]
            results[f"{tag}_prefill_s"] = r["prefill_s"]
    results["total_s"] = total_s
    results["torch_threads"] = torch.get_num_threads()
    headline = {k: v for k, v in results.items() if k.startswith(("v4_vs_v3", "v32_vs_v3"))}
    log(" ".join(f"{k}={v:.4g}" for k, v in results.items() if k.startswith(("calc_", "v4_ms", "v3_ms"))))
    if args.json:
        emit(results, True, out, settings=vars(args))
    else:
        log(f"total {total_s:.0f} s")
        emit(headline, False, out)


if __name__ == "__main__":
    main()
