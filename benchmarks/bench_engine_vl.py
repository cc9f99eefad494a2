"""The engine on image+text requests against transformers' `generate`, on the same DeepSeek-VL
checkpoint (issue 29's goal: throughput ratio >= 2, outputs equal).

The model: a DeepSeek-VL written by transformers with random weights (seed --seed): SigLIP
(hidden 128, 2 layers, 64-pixel images in 8-pixel patches: 64 vision tokens per image) and a
DeepSeek-V3 language model (MLA, DeepSeekMoE: hidden 256, 4 layers, 8 routed experts of 128,
vocabulary 512), fp32. The workload: --requests requests arriving together, each an image
of its own and text around its placeholder run (all prompts of one length, so transformers
needs no padding), greedy, eos ignored on both sides; new tokens per request: --max-tokens
each (--outputs fixed, the default), or as bench_engine.py mixes them (--outputs mixed):
evenly spread from --max-tokens / 8 to --max-tokens, in a shuffled order.

  * nanoseek: `LLM(dir).generate` on the whole load, the images as pixel values;
  * transformers: `DeepseekVLForConditionalGeneration.from_pretrained(dir).generate`, with each
    experts implementation it offers and two batching strategies (the whole load in one batch;
    batches of 4 sorted by output length), each batch generating its longest request's tokens;
    the fastest is the baseline.

--lm picks the model: `mla` (the above), `llama` (the same SigLIP with a Llama language model,
GQA 4 query / 2 KV heads, hidden 256, 4 layers: the engine's paged K/V cache) or `ocr2` (a
DeepSeek-OCR-2 written by transformers: SAM at 256 pixels in 4-pixel patches, DeepEncoder V2
with 256 global queries, an MHA DeepSeekMoE language model of the same size as `mla`'s; each
request's picture is small enough to take the global view only: 257 vision tokens).

--split also times each side generating one token per request (its prefill, vision tower
included) and prints where the time goes: prefill, and a decode step as (run - one-token
run) / (new tokens - 1), for nanoseek and for transformers' fastest variant (needs --outputs
fixed: with mixed lengths the steps differ in size).

Output tokens/s counts the requested tokens. Each side runs once to warm up, then --repeats
times; the best time counts. nanoseek's prefix cache is emptied before each run (a repeat of
the same prompts would otherwise skip their prefill and vision tower). Last line: `ratio=... outputs_equal=... distinct_tokens=...` (the
different tokens in nanoseek's outputs: equal outputs that are one token repeated would say
little).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from common import EXPERTS_IMPLEMENTATIONS, log, machine_info

IMG, T = 5, 64
VISION = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, image_size=64, patch_size=8)
TEXT = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=512,
            moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            n_shared_experts=1, max_position_embeddings=512, eos_token_id=None, bos_token_id=None)


LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None,
             bos_token_id=None)
OCR2_SIZE, OCR2_PATCH, OCR2_T = 256, 4, 257  # global view only: 256 queries + the view separator


def ocr2_config():
    from transformers import DeepseekOcr2Config
    text = {k: v for k, v in TEXT.items() if k not in ("model_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                       "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
                                                       "first_k_dense_replace")}
    return DeepseekOcr2Config(
        vision_config=dict(
            sam_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=OCR2_SIZE,
                            patch_size=OCR2_PATCH, output_channels=64, downsample_channels=[64, 128], window_size=8,
                            global_attn_indexes=[1], mlp_dim=128),
            encoder_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=256, max_position_embeddings=1024, vocab_size=8)),
        text_config={**text, "mlp_layer_types": ["dense"] + ["sparse"] * (TEXT["num_hidden_layers"] - 1)},
        image_token_id=IMG)


def hf_class(lm: str):
    import transformers
    return (transformers.DeepseekOcr2ForConditionalGeneration if lm == "ocr2"
            else transformers.DeepseekVLForConditionalGeneration)


def checkpoint(path: str, seed: int, lm: str = "mla") -> None:
    from transformers import DeepseekVLConfig
    torch.manual_seed(seed)
    config = (ocr2_config() if lm == "ocr2" else
              DeepseekVLConfig(text_config=LLAMA if lm == "llama" else TEXT, vision_config=VISION, image_token_id=IMG))
    model = hf_class(lm)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def workload(n: int, seed: int, lm: str = "mla"):
    """n prompts [n, 8 + T + 24] (text, the image's run, text) and their images: pixels
    [n, 3, 64, 64], or for OCR-2 pictures of 120x90 (their global view only)."""
    g = torch.Generator().manual_seed(seed)
    before, after = torch.randint(10, 512, (n, 8), generator=g), torch.randint(10, 512, (n, 24), generator=g)
    ids = torch.cat([before, torch.full((n, OCR2_T if lm == "ocr2" else T), IMG), after], 1)
    if lm != "ocr2":
        return ids, torch.randn(n, 3, 64, 64, generator=g)
    from PIL import Image
    return ids, [Image.fromarray((torch.rand(90, 120, 3, generator=g) * 255).to(torch.uint8).numpy())
                 for _ in range(n)]


def hf_inputs(lm: str, images, rows: list[int]) -> dict:
    """transformers' image inputs for the requests `rows`."""
    if lm != "ocr2":
        return {"pixel_values": images[rows]}
    from nanoseek.model.vl.ocr2_processor import OCR2ImageProcessor
    out = OCR2ImageProcessor(size=OCR2_SIZE, tile_size=OCR2_SIZE * 3 // 4, patch_size=OCR2_PATCH)(
        [images[r] for r in rows])
    return {k: v for k, v in out.items()}


def output_lengths(n: int, longest: int, mixed: bool, seed: int) -> list[int]:
    if not mixed:
        return [longest] * n
    lengths = [max(1, round(longest / 8 + (longest - longest / 8) * i / max(n - 1, 1))) for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[i] for i in order]


def best_time(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def step_split(t_run: float, t_one: float, max_tokens: int) -> tuple[float, float]:
    """(prefill, one decode step) in seconds from a run's time and a one-token run's."""
    return t_one, (t_run - t_one) / (max_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outputs", choices=["mixed", "fixed"], default="fixed")
    ap.add_argument("--lm", choices=["mla", "llama", "ocr2"], default="mla",
                    help="the language model (and for ocr2 the whole model): see above")
    ap.add_argument("--experts", nargs="+", default=list(EXPERTS_IMPLEMENTATIONS), choices=EXPERTS_IMPLEMENTATIONS,
                    help="transformers' experts implementations to time (the fastest is the baseline)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--split", action="store_true",
                    help="also time one-token runs and print each side's prefill and decode step (see above)")
    args = ap.parse_args()
    if args.split and (args.outputs != "fixed" or args.max_tokens < 2):
        ap.error("--split needs --outputs fixed and --max-tokens >= 2: a decode step is "
                 "(run - one-token run) / (max_tokens - 1)")
    split: dict[str, tuple[float, float]] = {}
    torch.set_num_threads(args.threads)
    HFVL = hf_class(args.lm)

    from nanoseek.engine import LLM, SamplingParams
    ids, px = workload(args.requests, args.seed, args.lm)
    lengths = output_lengths(args.requests, args.max_tokens, args.outputs == "mixed", args.seed)
    new = sum(lengths)
    with tempfile.TemporaryDirectory() as path:
        checkpoint(path, args.seed, args.lm)
        llm = LLM(path, max_num_seqs=args.requests, max_num_batched_tokens=2048)
        prompts = [{"prompt_token_ids": r.tolist(), "images": [p]} for r, p in zip(ids, px)]

        def ours(lengths=lengths):  # each run from an empty prefix cache: transformers has none to reuse
            llm.engine.reset_prefix_cache()
            params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in lengths]
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

        t_ns, got = best_time(ours, args.repeats)
        log(f"nanoseek: {new / t_ns:.1f} tok/s ({t_ns:.2f} s)")
        if args.split:
            split["nanoseek"] = step_split(t_ns, best_time(lambda: ours([1] * len(lengths)), args.repeats)[0],
                                           args.max_tokens)
        theirs, runners = {}, {}
        for impl in (args.experts if args.lm != "llama" else ["dense"]):
            try:
                kw = {} if impl == "dense" else {"experts_implementation": impl}
                hf = HFVL.from_pretrained(path, **kw).eval()
            except Exception as e:  # an implementation this build does not offer
                log(f"transformers experts_implementation={impl}: unavailable ({type(e).__name__})")
                continue

            def hf_generate(batches, hf=hf, lengths=lengths):
                out = [None] * len(lengths)
                for rows in batches:
                    k = max(lengths[r] for r in rows)
                    with torch.no_grad():
                        gen = hf.generate(input_ids=ids[rows], **hf_inputs(args.lm, px, rows),
                                          attention_mask=torch.ones_like(ids[rows]), max_new_tokens=k,
                                          min_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0)
                    for r, g in zip(rows, gen[:, ids.shape[1]:].tolist()):
                        out[r] = g[:lengths[r]]
                return out

            by_length = sorted(range(len(lengths)), key=lambda r: lengths[r])
            strategies = {"one batch": [list(range(len(lengths)))],
                          "batches of 4 by length": [by_length[i:i + 4] for i in range(0, len(lengths), 4)]}
            for name, batches in strategies.items():
                theirs[f"{impl}, {name}"] = t = best_time(lambda b=batches: hf_generate(b), args.repeats)
                runners[f"{impl}, {name}"] = lambda b=batches, g=hf_generate: g(b, lengths=[1] * len(lengths))
                log(f"transformers ({impl}, {name}): {new / t[0]:.1f} tok/s ({t[0]:.2f} s)")
        impl = min(theirs, key=lambda k: theirs[k][0])
        t_hf, want = theirs[impl]
        if args.split:
            split["transformers"] = step_split(t_hf, best_time(runners[impl], args.repeats)[0], args.max_tokens)
            for side, (prefill, step) in split.items():
                log(f"{side}: prefill {prefill * 1e3:.1f} ms, decode step {step * 1e3:.2f} ms")
    equal = sum(a == b for a, b in zip(got, want))
    result = {"nanoseek_tok_s": round(new / t_ns, 1), "transformers_tok_s": round(new / t_hf, 1),
              "transformers_run": impl, "outputs": args.outputs, "ratio": round(t_hf / t_ns, 2),
              "outputs_equal": f"{equal}/{len(got)}", "distinct_tokens": len({t for r in got for t in r}),
              "requests": args.requests, "max_tokens": args.max_tokens, "lm": args.lm, "threads": args.threads,
              "machine": machine_info()}
    if split:
        result["split_ms"] = {side: {"prefill": round(p * 1e3, 1), "decode_step": round(d * 1e3, 2)}
                              for side, (p, d) in split.items()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"ratio={result['ratio']} outputs_equal={result['outputs_equal']} "
          f"distinct_tokens={result['distinct_tokens']} "
          f"nanoseek_tok_s={result['nanoseek_tok_s']} transformers_tok_s={result['transformers_tok_s']}")


if __name__ == "__main__":
    main()
