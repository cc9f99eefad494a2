"""The inference engine against transformers' `generate`, on one workload, in one run, for
DeepSeek-V3, V3.2 and V4 (--archs).

Workload: 64 requests with mixed prompt and output lengths (prompts are slices of the
embedded corpus, output lengths are fixed per request with ignore_eos so both sides emit
exactly the same tokens), all arriving together, greedy.

  * nanoseek: `LLM.generate` on the whole load (continuous batching, paged cache,
    chunked prefill, absorbed decode), with and without MTP speculative decoding (V3);
  * transformers: `AutoModelForCausalLM.from_pretrained` on the same checkpoint,
    `generate` with left padding, greedy, timed with two batching strategies (all 64
    requests in one batch; batches of 16 sorted by output length, each generating its
    longest) and each experts implementation it offers — the fastest is the baseline.
    Output tokens/s counts only the tokens each request asked for.

Architectures (--archs, comma-separated; default all three), each a byte-level model of the
same width and depth (hidden 128, 3 layers, 4 heads, q-LoRA 64, 8 routed experts of 64, vocab
256), each against transformers' own class for it on the same weights:

  * v3: tiny shrunk, MLA + MoE + one MTP layer, trained here for --train-seconds
    (DeepseekV3ForCausalLM); its keys carry no suffix (ratio, nanoseek_tok_s, ...);
  * v32: tiny-v32 shrunk, V3's MLA plus the lightning indexer (16 heads x 32, top-k 64 of a
    context of up to 256 tokens), no MTP (DeepseekV32ForCausalLM); keys end in _v32;
  * v4: tiny-v4 shrunk to layers sliding / CSA / HCA (window 16, m = 4, m' = 16, indexer
    top-k 16), hash MoE then learned MoE, no MTP, speculative=False (the engine does not
    speculate for V4) (DeepseekV4ForCausalLM); keys end in _v4.
  V3.2 and V4 keep their random initial weights (seed --seed) unless --arch-train-seconds
  trains them like V3.

transformers' V4 compressors pool windows by position in the padded row and keep the pad
tokens' entries, so left-padded V4 batches do not give the unpadded model's tokens; for V4
transformers also runs the requests one at a time (no padding). `ratio_v4` is against its
fastest run of any strategy; `ratio_v4_same_outputs` against its fastest unpadded run, whose
outputs `outputs_equal_transformers_v4` compares with nanoseek's
(`transformers_padded_outputs_equal_v4`: the padded run's share that still agrees).

Precision: each side runs in fp32, and in bf16 too where the CPU has fast bf16
(train/numerics/precision.py decides; `--precisions fp32,bf16` forces both); the fastest of each
side is compared and both precisions are printed. MTP runs in nanoseek's best precision.

MTP speculation (V3) decides per step whether to draft (engine/spec_policy.py: only while the
engine holds at most `spec_max_batch` requests); `mtp_speedup_always_draft` is the same
64-request load with drafting forced on every step (the policy's counterfactual). The MTP
speed-ups compare runs of the same engine that differ only in speculation, so on a shared
machine noise is as large as the effect: each side runs `--repeats` times, the sides
alternating (plain, MTP, forced, then the reverse order), and each figure is the ratio of
the sides' median times (`*_cpu`: the same runs by this process's CPU time, which a
loaded machine's wall clock blurs).

KV bytes per token (V3): nanoseek's from its cache tensors (bytes of one slot across layers),
transformers' from its `DynamicCache` tensors after generate (bytes / (batch x length));
both against the theoretical latent size (kv_lora_rank + qk_rope_head_dim) x layers x
dtype and the decompressed per-head K/V an MHA cache would hold. V3.2's and V4's cache bytes
against context length: benchmarks/bench_long_context.py.

MTP acceptance needs a trained checkpoint: without --checkpoint the script trains the V3
model on `pydoc_data.topics` for --train-seconds. A --checkpoint serves the architecture its
config names (its arch) in place of the one built here.

Threads: one by default (--threads); run with OMP_NUM_THREADS=1 on a shared machine.

    python benchmarks/bench_engine.py [--archs v3,v32,v4] [--checkpoint DIR] [--train-seconds 90]
        [--arch-train-seconds 0] [--requests 64] [--output-len 16 128] [--json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, json_only_stdout, log, transformers_variants  # noqa: E402
import nanoseek  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.config.model_config import CSA, HCA, SLIDING  # noqa: E402
from nanoseek.engine import LLM, SamplingParams  # noqa: E402
from nanoseek.engine.spec_policy import SpecPolicy  # noqa: E402
from nanoseek.engine.cache import PagedLatentCache  # noqa: E402
from nanoseek.model import CausalLM  # noqa: E402
from nanoseek.train.numerics.precision import fast_bf16  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARCHS = ("v3", "v32", "v4")
# what the three models share: width, depth, heads, q-LoRA, experts, a byte vocabulary
SHAPE = dict(vocab_size=256, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=64,
             moe_intermediate_size=64, n_routed_experts=8, max_position_embeddings=512,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
MLA = dict(intermediate_size=384, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           n_group=2, topk_group=1)  # V3's and V3.2's attention and first dense layer


def arch_config(arch: str):
    """The benchmark's model of `arch`: the tiny presets shrunk to SHAPE. Only V3 keeps an MTP
    layer (its speculation is measured); V4's three layers are one of each kind."""
    if arch == "v3":
        return preset("tiny", **SHAPE, **MLA, num_nextn_predict_layers=1, mtp_loss_weight=0.3)
    if arch == "v32":
        return preset("tiny-v32", **SHAPE, **MLA, num_nextn_predict_layers=0)
    return preset("tiny-v4", **SHAPE, intermediate_size=64, num_nextn_predict_layers=0,
                  layer_types=[SLIDING, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"])


def suffixed(results: dict, arch: str) -> dict:
    """V3's keys as they always were; V3.2's and V4's end in _v32 / _v4, except each
    transformers run's tok/s, whose brackets name the arch first: transformers_tok_s[v4,...]."""
    if arch == "v3":
        return results
    return {(k.replace("[", f"[{arch},", 1) if k.startswith("transformers_tok_s[") else f"{k}_{arch}"): v
            for k, v in results.items()}


def precisions(arg: str) -> tuple[list[str], str]:
    """The precisions both sides run in, and why."""
    if arg != "auto":
        return arg.split(","), "asked for"
    fast, why = fast_bf16("cpu")
    return (["fp32", "bf16"] if fast else ["fp32"]), (why if fast else f"bf16 skipped: {why}")


def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_tokens(checkpoint: str | None) -> torch.Tensor:
    """The corpus as bytes, or through the checkpoint's own tokenizer when it has one."""
    from nanoseek.text.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(Path(checkpoint)) if checkpoint else None
    ids = tok.encode(corpus_text()) if tok else list(corpus_text().encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long)


def train_small_model(data: torch.Tensor, seconds: float, seed: int = 0, cfg=None) -> CausalLM:
    """A byte-level model (default: V3's, MLA+MoE+MTP), trained with model.loss + AdamW for
    `seconds`; its `train_steps` says how far that got (MTP acceptance means little after a
    few steps). seconds=0 keeps the initial weights."""
    torch.manual_seed(seed)
    model = CausalLM(cfg or arch_config("v3")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    seq, batch, step, t0 = 128, 32, 0, time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(total=int(seconds), desc=f"training the {model.config.arch} model", unit="s", disable=seconds <= 0)
    while (elapsed := time.perf_counter() - t0) < seconds:
        for g in opt.param_groups:  # short warm-up, then linear decay over the time budget
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * max(0.1, 1 - elapsed / seconds)
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        out = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_biases()
        step += 1
        bar.n = min(int(elapsed), int(seconds))
        bar.set_postfix(step=step, lm=f"{out.lm_loss.item():.3f}",
                        **({} if out.mtp_loss is None else {"mtp": f"{out.mtp_loss.item():.3f}"}))
    bar.close()
    model.train_steps = step
    return model.eval()


def workload(data: torch.Tensor, n: int, seed: int, prompt_range, output_range):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen, olen = rng.randint(*prompt_range), rng.randint(*output_range)
        s = rng.randrange(0, len(data) - plen)
        reqs.append((data[s:s + plen].tolist(), olen))
    return reqs


def run_nanoseek(model, reqs, speculative: bool, always_draft: bool = False, **engine_kw):
    """always_draft: the policy's acceptance pause off too (spec_max_batch covers the load)."""
    llm = LLM(model, speculative=speculative, **engine_kw)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    llm.generate([p for p, _ in reqs[:4]], params[:4], use_tqdm=False)  # warm-up
    # the timed run must not hit the warm-up's prefixes, nor count its forwards/preemptions
    engine = llm.engine
    engine.reset_prefix_cache()
    engine.reset_stats(SpecPolicy(max_batch=engine.config.spec_max_batch,  # nor start paused by
                                  **({"min_acceptance": 0.0} if always_draft else {})))  # its drafts
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = [o.outputs[0].token_ids for o in outs]
    cache, cfg = engine.cache, engine.model.config
    latent = (sum(t[0, 0].numel() * t.element_size() for t in cache.kv[:cfg.num_hidden_layers])
              if isinstance(cache, PagedLatentCache) else None)  # V4's kinds: bench_long_context
    stats = engine.stats()
    return dict(seconds=dt, cpu_seconds=cpu, tokens=tokens, main_layers_bytes_per_token=latent,
                spec=engine.spec_stats.as_dict(), forwards=stats["forwards"], preemptions=stats["preemptions"])


def alternate(model, sides: dict, repeats: int) -> dict:
    """Each side {name: (requests, engine kwargs)} `repeats` times, in alternating order;
    a side's result is its last run with `seconds` and `cpu_seconds` the medians and
    `all_seconds` each run's."""
    names, times, cpu, last = list(sides), {k: [] for k in sides}, {k: [] for k in sides}, {}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            reqs, kw = sides[name]
            last[name] = run_nanoseek(model, reqs, **kw)
            times[name].append(last[name]["seconds"])
            cpu[name].append(last[name]["cpu_seconds"])
    return {k: dict(last[k], seconds=statistics.median(times[k]), cpu_seconds=statistics.median(cpu[k]),
                    all_seconds=times[k]) for k in names}


def cache_bytes(cache) -> int | None:
    """Bytes of the K/V transformers' cache holds (its layers' keys and values; V4's K=V rows
    once), None for a cache without them."""
    seen, held = set(), 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                held += t.numel() * t.element_size()
    return held or None


def hf_generate_batches(hf, reqs, batches):
    """Left-padded greedy generate per batch; returns (seconds, tokens per request, cache stats)."""
    out_tokens, kv = [None] * len(reqs), []
    t0 = time.perf_counter()
    for idx in batches:
        L = max(len(reqs[i][0]) for i in idx)
        new = max(reqs[i][1] for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            p = reqs[i][0]
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        with torch.no_grad():
            res = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        cache = res.past_key_values
        kv.append((cache_bytes(cache), len(idx) * cache.get_seq_length(), sum(len(reqs[i][0]) + reqs[i][1] for i in idx)))
        for r, i in enumerate(idx):
            out_tokens[i] = res.sequences[r, L:L + reqs[i][1]].tolist()
    dt = time.perf_counter() - t0
    if any(held is None for held, _, _ in kv):
        return dt, out_tokens, None
    held, slots, useful = map(sum, zip(*kv))
    return dt, out_tokens, dict(bytes_per_slot=held / slots, bytes_per_useful_token=held / useful)


UNPADDED = "one_at_a_time"


def hf_strategies(n: int, reqs, batch: int, arch: str) -> dict[str, list[list[int]]]:
    """transformers' batchings: one batch of all, batches of `batch` sorted by output length,
    and for V4 (whose compressors misread left padding) each request alone."""
    by_len = sorted(range(n), key=lambda i: reqs[i][1])
    out = {"one_batch": [list(range(n))],
           f"sorted_batches_of_{batch}": [by_len[i:i + batch] for i in range(0, n, batch)]}
    if arch == "v4":
        out[UNPADDED] = [[i] for i in range(n)]
    return out


def run_transformers(ckpt: str, reqs, batch: int, precs: list[str], arch: str = "v3"):
    """{(experts_implementation, strategy, precision): (seconds, tokens, cache stats)}."""
    import transformers
    transformers.logging.set_verbosity_error()
    strategies = hf_strategies(len(reqs), reqs, batch, arch)
    results = {}
    for pr in precs:
        for impl, hf in transformers_variants(ckpt, train=False, dtype=DTYPES[pr]):
            hf_generate_batches(hf, reqs[:4], [[0, 1, 2, 3]])  # warm-up
            for name, batches in strategies.items():
                dt, toks, kv = hf_generate_batches(hf, reqs, batches)
                results[(impl, name, pr)] = (dt, toks, kv)
                log(f"{arch} transformers [{impl}, {name}, {pr}]: {sum(o for _, o in reqs) / dt:,.1f} tok/s")
            del hf
    return results


def equal_share(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def build_model(arch: str, args, tmp: str, served=None):
    """(model, checkpoint dir transformers loads, corpus tokens) for `arch`: `served` (the
    --checkpoint's model) when it is of this arch, else the model built (and for V3 trained)
    here and saved."""
    if served is not None and served.config.arch == arch:
        return served, args.checkpoint, corpus_tokens(args.checkpoint)
    data = corpus_tokens(None)
    seconds = args.train_seconds if arch == "v3" else args.arch_train_seconds
    model = train_small_model(data, seconds, args.seed, arch_config(arch))
    ckpt = (f"{args.save_checkpoint}-{arch}" if arch != "v3" else args.save_checkpoint) \
        if args.save_checkpoint else str(Path(tmp) / arch)
    nanoseek.save_pretrained(model, ckpt)
    return model, ckpt, data


def bench_arch(arch: str, model, ckpt: str, data: torch.Tensor, args, precs: list[str]) -> dict:
    """One architecture's figures (unsuffixed keys): both sides on the same workload, and for
    a model with MTP layers (V3) the speculation comparisons."""
    cfg = model.config
    if int(data.max()) >= cfg.vocab_size:
        raise SystemExit(f"{ckpt}: token ids reach {int(data.max())} but vocab_size is {cfg.vocab_size} "
                         "(a checkpoint without tokenizer.json needs vocab_size >= 256 for the byte workload)")
    reqs = workload(data, args.requests, args.seed, args.prompt_len, args.output_len)
    n_out = sum(o for _, o in reqs)
    engine_kw = dict(kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.requests,
                     max_num_batched_tokens=max(512, 2 * args.requests))
    by_prec = {}
    for pr in precs:  # a model object is cast in place: bf16 loads its own copy
        by_prec[pr] = run_nanoseek(model if pr == "fp32" else ckpt, reqs, speculative=False,
                                   dtype=DTYPES[pr], **engine_kw)
        log(f"{arch} nanoseek [{pr}]: {n_out / by_prec[pr]['seconds']:,.1f} tok/s ({by_prec[pr]['forwards']} forwards)")
    our_prec = min(by_prec, key=lambda k: by_prec[k]["seconds"])
    plain = by_prec[our_prec]
    engine_kw.update(dtype=DTYPES[our_prec])
    src = model if our_prec == "fp32" else ckpt
    spec = None
    if len(model.mtp) > 0 and not cfg.is_v4:
        # one request at a time: decode is latency-bound, where speculation pays
        few, kw1 = reqs[:args.single_stream], dict(engine_kw, max_num_seqs=1)
        sides = {"plain": (reqs, dict(engine_kw, speculative=False)),
                 "spec": (reqs, dict(engine_kw, speculative=True, spec_max_batch=args.spec_max_batch)),
                 "forced": (reqs, dict(engine_kw, speculative=True, spec_max_batch=args.requests,
                                     always_draft=True)),
                 "one_plain": (few, dict(kw1, speculative=False)),
                 "one_spec": (few, dict(kw1, speculative=True))}
        runs = alternate(src, sides, args.repeats)
        spec, forced, one_plain, one_spec = (runs[k] for k in ("spec", "forced", "one_plain", "one_spec"))
        log(f"{arch} nanoseek + MTP: {n_out / spec['seconds']:,.1f} tok/s, acceptance "
            f"{spec['spec']['acceptance_rate']:.1%} ({spec['forwards']} forwards); one stream: "
            f"{one_plain['seconds'] / one_spec['seconds']:.2f}x faster with MTP "
            f"(medians of {args.repeats} alternating runs per side)")
        for k, v in runs.items():
            log(f"  {k}: " + ", ".join(f"{t:.3f}" for t in v["all_seconds"]) + " s")
    hf = run_transformers(ckpt, reqs, args.hf_batch, precs, arch)

    best = min(hf, key=lambda k: hf[k][0])
    hf_dt, _, hf_kv = hf[best]
    dtype_bytes = DTYPES[our_prec].itemsize
    L = cfg.num_hidden_layers
    r = {}
    r["ratio"] = hf_dt / plain["seconds"]
    r["nanoseek_tok_s"] = n_out / plain["seconds"]
    r["transformers_tok_s"] = n_out / hf_dt
    r["transformers_best"] = f"{best[0]}/{best[1]}"
    r["nanoseek_precision"] = our_prec
    r["transformers_precision"] = best[2]
    if spec:
        r["mtp_acceptance"] = spec["spec"]["acceptance_rate"]
        r["mtp_drafted"] = spec["spec"]["drafted"]
        r["mtp_speedup"] = runs["plain"]["seconds"] / spec["seconds"]
        r["mtp_speedup_always_draft"] = runs["plain"]["seconds"] / forced["seconds"]
        r["mtp_acceptance_always_draft"] = forced["spec"]["acceptance_rate"]
        r["nanoseek_mtp_tok_s"] = n_out / spec["seconds"]
        r["mtp_greedy_identical"] = (spec["tokens"] == plain["tokens"] == forced["tokens"]
                                     and one_spec["tokens"] == one_plain["tokens"])
        r["mtp_speedup_one_stream"] = one_plain["seconds"] / one_spec["seconds"]
        # the same runs timed by this process's CPU time: what a loaded machine's wall clock blurs
        r["mtp_speedup_cpu"] = runs["plain"]["cpu_seconds"] / spec["cpu_seconds"]
        r["mtp_speedup_one_stream_cpu"] = one_plain["cpu_seconds"] / one_spec["cpu_seconds"]
        r["mtp_acceptance_one_stream"] = one_spec["spec"]["acceptance_rate"]
        r["mtp_repeats"] = args.repeats
    # against transformers' fastest run in nanoseek's own precision: across precisions greedy
    # paths part at the first near-tie, which says nothing of either side. V4: its unpadded run
    # (left padding changes transformers' V4 outputs, module docstring)
    mine = [k for k in hf if k[2] == our_prec]
    exact = [k for k in mine if k[1] == UNPADDED] or mine
    same = min(exact, key=lambda k: hf[k][0])
    r["outputs_equal_transformers"] = equal_share(plain["tokens"], hf[same][1])
    r["outputs_compared_in"] = our_prec
    if same[1] == UNPADDED:
        unpadded_best = min((k for k in hf if k[1] == UNPADDED), key=lambda k: hf[k][0])
        padded = min((k for k in mine if k[1] != UNPADDED), key=lambda k: hf[k][0])
        r["ratio_same_outputs"] = hf[unpadded_best][0] / plain["seconds"]
        r["transformers_padded_outputs_equal"] = equal_share(plain["tokens"], hf[padded][1])
    if plain["main_layers_bytes_per_token"] is not None and hf_kv is not None and not cfg.is_v32:
        r["nanoseek_kv_bytes_per_token"] = plain["main_layers_bytes_per_token"]
        r["transformers_kv_bytes_per_token"] = hf_kv["bytes_per_slot"]
        r["transformers_kv_bytes_per_useful_token"] = hf_kv["bytes_per_useful_token"]
        r["latent_theory_bytes_per_token"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * dtype_bytes
        r["mha_decompressed_bytes_per_token"] = (cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
                                                 * L * dtype_bytes)
        assert PagedLatentCache.bytes_per_token(cfg, L, DTYPES[our_prec]) == r["nanoseek_kv_bytes_per_token"]
    r["requests"] = len(reqs)
    r["output_tokens"] = n_out
    r["nanoseek_preemptions"] = plain["preemptions"]
    r["train_steps"] = getattr(model, "train_steps", None)  # None: served --checkpoint
    for (impl, name, pr), (dt, _, _) in hf.items():
        r[f"transformers_tok_s[{impl},{name},{pr}]"] = n_out / dt
    log(f"{arch}: nanoseek {r['nanoseek_tok_s']:,.1f} tok/s [{our_prec}], transformers {r['transformers_tok_s']:,.1f} "
        f"tok/s [{r['transformers_best']}, {best[2]}], ratio {r['ratio']:.2f}, outputs equal "
        f"{r['outputs_equal_transformers']:.0%} (against {'/'.join(same)})")
    return r


def parse_archs(arg: str, p: argparse.ArgumentParser) -> list[str]:
    archs = [a.strip() for a in arg.split(",") if a.strip()]
    if not archs or not set(archs) <= set(ARCHS):
        p.error(f"--archs: {arg!r}; choose among {', '.join(ARCHS)}")
    return [a for a in ARCHS if a in archs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS),
                   help="comma-separated architectures to measure, each against its transformers class: v3 "
                        "(MLA + MoE + MTP, trained; keys unsuffixed), v32 (V3.2: + lightning indexer; keys _v32), "
                        "v4 (V4: sliding/CSA/HCA, hash MoE, mHC; speculative=False; keys _v4). Default: all three")
    p.add_argument("--checkpoint", help="a checkpoint dir, served for the arch its config names (a V3 one with "
                                        "MTP layers for the speculation figures; default: build each model here)")
    p.add_argument("--train-seconds", type=float, default=120, help="training of the V3 model")
    p.add_argument("--arch-train-seconds", type=float, default=0,
                   help="training of the V3.2 and V4 models (0: their random initial weights, seed --seed)")
    p.add_argument("--save-checkpoint", help="keep the V3 model here (reuse it with --checkpoint); V3.2's and "
                                             "V4's go to DIR-v32, DIR-v4")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--single-stream", type=int, default=8,
                   help="requests served one at a time for the latency-bound MTP comparison")
    p.add_argument("--hf-batch", type=int, default=16, help="batch size of transformers' sorted strategy")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch's default); tiny models run fastest on one")
    p.add_argument("--precisions", default="auto",
                   help="comma-separated, e.g. fp32,bf16 (auto: bf16 too where the CPU has fast bf16)")
    p.add_argument("--spec-max-batch", type=int, default=16,
                   help="MTP drafts only in steps with at most this many requests (EngineConfig.spec_max_batch)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per side of each MTP comparison, alternating; medians are compared")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    archs = parse_archs(args.archs, p)
    out = json_only_stdout(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    precs, why = precisions(args.precisions)
    log(f"precisions: {precs} ({why})")
    served = nanoseek.from_pretrained(args.checkpoint).eval() if args.checkpoint else None

    results, per_arch = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            model, ckpt, data = build_model(arch, args, tmp, served)
            per_arch[arch] = bench_arch(arch, model, ckpt, data, args, precs)
            del model
    # the headline figures of every arch first, then V3's details, then the others'
    for arch in archs:
        results.update(suffixed({k: per_arch[arch][k] for k in ("ratio", "nanoseek_tok_s", "transformers_tok_s",
                                                                 "outputs_equal_transformers")}, arch))
    for arch in archs:
        results.update(suffixed(per_arch[arch], arch))
    results["torch_threads"] = torch.get_num_threads()
    emit(results, args.json, out, skip_prefix="transformers_tok_s[", settings=vars(args))


if __name__ == "__main__":
    main()
