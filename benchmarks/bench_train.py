"""A full training step (forward, backward, clipping, AdamW) of nanoseek against
transformers' DeepseekV3ForCausalLM: same config, same weights, same batch, one process.

Each side runs in its best precision: fp32, and bf16 where the device has fast bf16
(train/numerics/precision.py decides; `--precisions fp32,bf16` forces both); the precision of each
side is printed. Both keep fp32 master weights and optimizer state. nanoseek's bf16 is its
training loop's: bf16 weight copies refreshed each step (train/numerics/bf16_weights.py);
transformers' is autocast, as its Trainer runs `bf16=True`. For a fair reading,
`transformers_bf16_copies_tok_s` also times transformers' fastest experts implementation
with nanoseek's copies (information only, not the baseline: transformers does not ship
them). MFU is against the measured matmul peak of the dtype each side used.

transformers never trains MTP modules nor computes V3's balance loss, so both sides run
the same work: MTP off, balance loss off; nanoseek's step keeps its aux-loss-free router
bias update (part of its recipe; a few microseconds). transformers is timed with every
experts implementation it offers and the fastest is the baseline. The two models' steps
alternate round by round and the median step time of each is used, so that load from
other processes on a shared machine hits both alike.

MFU = model FLOPs per token (6 x activated matmul parameters + causal attention, from
nanoseek.calc via nanoseek/train/numerics/mfu.py) x tokens/s / this machine's measured matmul peak.

    python benchmarks/bench_train.py [--preset tiny] [--batch 8] [--seq 256] [--steps 6]
                                     [--precisions auto|fp32,bf16] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nanoseek

from common import emit, json_only_stdout, log, transformers_variants  # noqa: E402
import nanoseek  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.model import CausalLM  # noqa: E402
from nanoseek.train.numerics.bf16_weights import BF16Weights, compute_precision  # noqa: E402
from nanoseek.train.loop import param_groups  # noqa: E402
from nanoseek.train.numerics.mfu import flops_per_token, measure_peak_flops  # noqa: E402
from nanoseek.train.numerics.precision import fast_bf16, peak_dtype  # noqa: E402
from nanoseek.train.pretrain import setup_threads  # noqa: E402


def precision_context(model, precision: str):
    """fp32: nothing; bf16: autocast; bf16-copies: BF16Weights (nanoseek's training loop)."""
    copies = BF16Weights(model) if precision == "bf16-copies" else None
    return compute_precision(precision.removesuffix("-copies"), torch.device("cpu"), copies)


def make_step(model, ids, is_hf: bool, precision: str = "fp32"):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    context = precision_context(model, precision)

    def step():
        with context:
            if is_hf:
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts itself
            else:
                loss = model.loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not is_hf:
            model.update_router_biases()
        return float(loss.detach())
    return step


def ours_mode(precision: str) -> str:
    """nanoseek's training loop runs bf16 as weight copies (train/loop.py Trainer)."""
    return "bf16-copies" if precision == "bf16" else precision


def timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def precisions(arg: str) -> tuple[list[str], str]:
    """The precisions both sides are screened in, and why."""
    if arg != "auto":
        return arg.split(","), "asked for"
    fast, why = fast_bf16("cpu")
    return (["fp32", "bf16"] if fast else ["fp32"]), (why if fast else f"bf16 skipped: {why}")


def screen(step) -> float:
    step()
    return min(timed(step) for _ in range(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    p.add_argument("--precisions", default="auto",
                   help="comma-separated, e.g. fp32,bf16 (auto: bf16 too where the CPU has fast bf16)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    out = json_only_stdout(args.json)

    threads = setup_threads()
    precs, why = precisions(args.precisions)
    log(f"precisions: {precs} ({why})")
    # the whole machine's peak per dtype, whatever --threads says
    peaks = {pr: measure_peak_flops("cpu", peak_dtype(pr)) for pr in precs}
    if args.threads:
        threads = args.threads
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    ours = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    fpt = flops_per_token(ours, args.seq)
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(ours, d)
        candidates = {}
        for impl, hf in transformers_variants(d, train=True):
            for pr in precs:
                step = make_step(hf, ids, True, pr)
                candidates[impl, pr] = (screen(step), hf, step)
                log(f"transformers [{impl}, {pr}]: {tokens / candidates[impl, pr][0]:,.0f} tok/s (screening)")
        best_impl, hf_prec = min(candidates, key=lambda k: candidates[k][0])
        hf_step = candidates[best_impl, hf_prec][2]
        # information only: transformers' fastest experts implementation with nanoseek's copies
        hf_copies_step = (make_step(candidates[best_impl, hf_prec][1], ids, True, "bf16-copies")
                          if "bf16" in precs else None)
        candidates.clear()
    # both start from the same weights (transformers loaded nanoseek's checkpoint above)
    ours_by_prec = {}
    for pr in precs:
        m = CausalLM(cfg).train()
        m.load_state_dict(ours.state_dict())
        ours_by_prec[pr] = (screen(make_step(m, ids, False, ours_mode(pr))), m)
        log(f"nanoseek [{pr}]: {tokens / ours_by_prec[pr][0]:,.0f} tok/s (screening)")
    our_prec = min(ours_by_prec, key=lambda k: ours_by_prec[k][0])
    our_step = make_step(ours_by_prec[our_prec][1], ids, False, ours_mode(our_prec))
    steps = [our_step, hf_step] + ([hf_copies_step] if hf_copies_step else [])
    for _ in range(args.warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(args.steps):  # alternate so background load hits every side alike
        for step, t in zip(steps, times):
            t.append(timed(step))
    m_ours, m_hf = statistics.median(times[0]), statistics.median(times[1])
    results = {
        "ratio": m_hf / m_ours,
        "nanoseek_tok_s": tokens / m_ours,
        "transformers_tok_s": tokens / m_hf,
        "nanoseek_precision": our_prec,
        "transformers_precision": hf_prec,
        "nanoseek_mfu": fpt * tokens / m_ours / peaks[our_prec],
        "transformers_mfu": fpt * tokens / m_hf / peaks[hf_prec],
        "transformers_experts_impl": best_impl,
        **({"transformers_bf16_copies_tok_s": tokens / statistics.median(times[2])}
           if hf_copies_step else {}),
        "flops_per_token": fpt,
        "peak_gflops": peaks[our_prec] / 1e9,
        "batch": args.batch, "seq": args.seq, "threads": threads,
    }
    emit(results, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
