"""Whether the engine's stacked experts pay on this CPU (model/expert_stack.py): the same
engine, the same requests, with each MoE layer's routed experts run as two grouped GEMMs over
their stacked weights and as the loop over the experts, alternating in one process.

The model and load are bench_engine_vl.py's (--lm mla: DeepSeek-VL with a 4-layer MLA +
DeepSeekMoE language model, 8 routed experts of 128; --lm ocr2: DeepSeek-OCR-2, MHA
DeepSeekMoE): --requests requests with an image each, --max-tokens new tokens each, greedy.
With --checkpoint DIR, a text model instead (e.g. bench_engine.py --save-checkpoint's): its
--requests prompts of 16-127 random token ids, each generating 16-127 tokens (seeded).
Each variant runs once to warm up, then --repeats times, the two in turn (so a slow stretch
of a shared machine falls on both). Printed per variant: the whole run, the prefill step,
the median decode step, and one MoE layer's dispatch (routing excluded) at decode. Last line:
`run_ratio=...` (loop / grouped, medians) `decode_ratio=...` `dispatch_ratio=...`
`outputs_equal=...`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench_engine_vl import checkpoint, workload
from nanoseek.model.moe import MoE


def load(args):
    """(the engine, its prompts, their sampling parameters) for --lm or --checkpoint."""
    from nanoseek.engine import LLM, SamplingParams
    if args.checkpoint:
        engine = LLM(args.checkpoint, max_num_seqs=args.requests).engine
        g = torch.Generator().manual_seed(args.seed)
        vocab = engine.model.config.vocab_size

        def draw() -> int:
            return int(torch.randint(16, 128, (1,), generator=g))
        prompts = [{"prompt_token_ids": torch.randint(3, vocab, (draw(),), generator=g).tolist()}
                   for _ in range(args.requests)]
        return engine, prompts, [SamplingParams(temperature=0, max_tokens=draw(), ignore_eos=True) for _ in prompts]
    ids, px = workload(args.requests, args.seed, args.lm)
    with tempfile.TemporaryDirectory() as path:
        checkpoint(path, args.seed, args.lm)
        engine = LLM(path, max_num_seqs=args.requests, max_num_batched_tokens=4096).engine
    prompts = [{"prompt_token_ids": r.tolist(), "images": [p]} for r, p in zip(ids, px)]
    return engine, prompts, [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
                             for _ in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", choices=["mla", "ocr2"], default="mla")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", help="a text checkpoint directory instead of --lm's image+text model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine, prompts, params = load(args)
    layers = [m for m in engine.model.modules() if isinstance(m, MoE)]
    stacks = [m.expert_stack for m in layers]
    if not any(s is not None for s in stacks):
        raise SystemExit("no MoE layer of this model was stacked (model/expert_stack.py: stackable)")

    dispatch_times: list[float] = []
    dispatch = MoE.dispatch

    def timed_dispatch(self, x, weights, indices):
        t0 = time.perf_counter()
        out = dispatch(self, x, weights, indices)
        if x.shape[0] <= 2 * args.requests:  # a decode step's tokens (with MTP: two a sequence)
            dispatch_times.append(time.perf_counter() - t0)
        return out
    MoE.dispatch = timed_dispatch

    def run(grouped: bool) -> dict:
        for m, s in zip(layers, stacks):
            m.expert_stack = s if grouped else None
        engine.reset_prefix_cache()
        dispatch_times.clear()
        seqs = [engine.add_request(p, s) for p, s in zip(prompts, params)]
        steps = []
        t0 = time.perf_counter()
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        return {"run": time.perf_counter() - t0, "prefill": steps[0], "decode": statistics.median(steps[1:]),
                "dispatch": statistics.median(dispatch_times), "out": [list(s.output_token_ids) for s in seqs]}

    variants = {"grouped": True, "loop": False}
    for grouped in variants.values():
        run(grouped)  # warm-up
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            results[name].append(run(variants[name]))
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("run", "prefill", "decode", "dispatch")}
           for name, rs in results.items()}
    for name, m in med.items():
        print(f"{name:8s} run {m['run']:.3f} s  prefill {m['prefill'] * 1e3:.1f} ms  decode step "
              f"{m['decode'] * 1e3:.2f} ms  dispatch (one MoE layer, decode) {m['dispatch'] * 1e6:.0f} us")
    equal = results["grouped"][0]["out"] == results["loop"][0]["out"]
    g, lp = med["grouped"], med["loop"]
    print(f"run_ratio={lp['run'] / g['run']:.2f} decode_ratio={lp['decode'] / g['decode']:.2f} "
          f"dispatch_ratio={lp['dispatch'] / g['dispatch']:.2f} outputs_equal={equal}")


if __name__ == "__main__":
    main()
