"""Inference precision on one small trained model: fp32, bf16, FP8 weights (in fp32 and bf16).

For each variant, against fp32 (and FP8 also against bf16):
  * memory: bytes of parameters + buffers, measured on the model objects;
  * logits on held-out windows of the corpus: max |Δ|, relative L2 ||Δ|| / ||ref||, top-1
    agreement;
  * greedy generation through the engine (LLM, no speculation): per request the share of
    tokens identical up to the first divergence, and the share of requests whose whole
    continuation is identical;
  * output tokens/s for one stream and for a batch of 32 (short prompts, so decode dominates).

Without --checkpoint the script trains the byte-level model of bench_engine.py for
--train-seconds (a random-init model has near-tied logits everywhere, which exaggerates
any rounding's effect on greedy choices).

    python benchmarks/bench_precision.py [--checkpoint DIR] [--train-seconds 60] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import corpus_tokens, train_small_model  # noqa: E402
from common import emit, json_only_stdout, log  # noqa: E402
import nanoseek  # noqa: E402
from nanoseek.engine import LLM, SamplingParams  # noqa: E402
from nanoseek.engine.dtype import cast_model  # noqa: E402
from nanoseek.quant.fp8 import quant_error  # noqa: E402
from nanoseek.quant.model import model_bytes, quantization_backend, quantize_model_fp8  # noqa: E402

VARIANTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
            "fp8": (torch.float32, "fp8"), "fp8_bf16": (torch.bfloat16, "fp8")}


def variant(model, dtype, quantization, device):
    m = cast_model(copy.deepcopy(model), dtype).to(device)
    return quantize_model_fp8(m) if quantization == "fp8" else m


@torch.no_grad()
def logits_report(models: dict, ids: torch.Tensor) -> dict:
    logits = {k: m(ids).float().cpu() for k, m in models.items()}
    out = {}
    for name, ref_name in (("bf16", "fp32"), ("fp8", "fp32"), ("fp8_bf16", "fp32"), ("fp8_bf16", "bf16")):
        err = quant_error(logits[ref_name], logits[name])
        top1 = (logits[name].argmax(-1) == logits[ref_name].argmax(-1)).float().mean().item()
        tag = f"{name}_vs_{ref_name}"
        out.update({f"{tag}_max_abs": err["max_abs_error"], f"{tag}_rel_l2": err["rel_error"],
                    f"{tag}_top1": top1})
    return out


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(mean share of tokens equal up to the first divergence, share of identical sequences)."""
    prefix = []
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return sum(prefix) / len(prefix), sum(a == b for a, b in zip(ref, got)) / len(ref)


def generate(model, prompts, max_tokens: int, device) -> tuple[list[list[int]], float]:
    llm = LLM(model, device=device, speculative=False, kv_cache_memory="256MiB", max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    llm.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    return tokens, sum(map(len, tokens)) / dt


def timing_only(args) -> dict:
    """Where bf16 pays: the same engine timing on a wider random-init model."""
    from nanoseek.config import preset
    from nanoseek.model import CausalLM
    D = args.timing_hidden
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=256, hidden_size=D, intermediate_size=3 * D, moe_intermediate_size=D // 2,
                 num_attention_heads=max(2, D // 128), q_lora_rank=D // 2, kv_lora_rank=D // 4,
                 num_hidden_layers=3, num_nextn_predict_layers=0, n_routed_experts=8, n_group=2, topk_group=1,
                 max_position_embeddings=512)
    model = CausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (16,), generator=g).tolist() for _ in range(args.prompts)]
    res = {"hidden": D}
    for name, (dtype, q) in VARIANTS.items():
        log(f"timing {name} ...")
        m = variant(model, dtype, q, args.device).eval()
        res[f"{name}_bytes"] = model_bytes(m)
        _, res[f"{name}_tok_s_{args.prompts}"] = generate(m, prompts, args.max_tokens, args.device)
        _, res[f"{name}_tok_s_1"] = generate(m, prompts[:1], args.max_tokens * 2, args.device)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: train one)")
    ap.add_argument("--train-seconds", type=float, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32, help="requests for agreement and the batched timing")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timing-hidden", type=int, default=None,
                    help="only time fp32/bf16/fp8 on a random-init model of this hidden size (the tiny "
                         "preset's layout scaled: experts hidden/2 wide, heads hidden/128)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = json_only_stdout(args.json)
    torch.set_num_threads(args.threads)
    if args.timing_hidden:
        emit(timing_only(args), args.json, out, settings=vars(args))
        return
    data = corpus_tokens(args.checkpoint)
    split = int(0.9 * len(data))
    model = (nanoseek.from_pretrained(args.checkpoint) if args.checkpoint
             else train_small_model(data[:split], args.train_seconds))
    for moe in model.moe_layers():
        moe.aux_loss = None  # the last training step's loss (a graph node) would block deepcopy
    models = {k: variant(model, d, q, args.device).eval() for k, (d, q) in VARIANTS.items()}
    res = {f"{k}_bytes": model_bytes(m) for k, m in models.items()}
    res["fp8_backend"] = quantization_backend(models["fp8"], args.device)
    res["train_steps"] = getattr(model, "train_steps", None)  # None: --checkpoint
    g = torch.Generator().manual_seed(0)
    held = data[split:]
    starts = torch.randint(0, len(held) - 129, (8,), generator=g).tolist()
    ids = torch.stack([held[s:s + 128] for s in starts]).to(args.device)
    res.update(logits_report(models, ids))
    starts = torch.randint(0, len(held) - 17, (args.prompts,), generator=g).tolist()
    prompts = [held[s:s + 16].tolist() for s in starts]
    ref = None
    for name, m in models.items():
        log(f"generating with {name} ...")
        tokens, tps_batch = generate(m, prompts, args.max_tokens, args.device)
        _, tps_one = generate(m, prompts[:1], args.max_tokens * 2, args.device)
        res[f"{name}_tok_s_1"], res[f"{name}_tok_s_{args.prompts}"] = tps_one, tps_batch
        if ref is None:
            ref = tokens
        else:
            res[f"{name}_greedy_prefix_agreement"], res[f"{name}_greedy_sequence_match"] = agreement(ref, tokens)
    emit(res, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
